"""Readers of Visium HD, Vizgen MERSCOPE and NanoString CosMx outputs on the small format-faithful
fixtures of tests/data/platforms (real counts; provenance in tests/data/platforms/make_fixtures.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import expkit.io as eio
from expkit.errors import ReaderError

FIX = Path(__file__).resolve().parent / "data" / "platforms"
HD = FIX / "visium_hd"
SQ8 = HD / "outs" / "binned_outputs" / "square_008um"
SQ16 = HD / "outs" / "binned_outputs" / "square_016um"
MER = FIX / "merscope"
COS = FIX / "cosmx"


# ------------------------------------------------------------------------------------------- helpers

def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under ``folder`` (plus the names of the folders)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                               p.stat().st_mtime_ns)
        else:
            out[str(p.relative_to(folder))] = ("dir", 0)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def _check_conventions(adata, unit: str) -> None:
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert (adata.obs["barcode"].to_numpy() == adata.obs_names.to_numpy()).all()
    for col in ("gene_ids", "gene_symbols", "feature_types"):
        assert col in adata.var
    xy = adata.obsm["spatial"]
    assert xy.dtype == np.float64 and xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()
    assert adata.uns["spatial.unit"] == unit
    if "spatial.array" in adata.obsm:
        assert adata.obsm["spatial.array"].dtype == np.int64


def _hd_positions(square: Path) -> pd.DataFrame:
    return pd.read_csv(square / "spatial" / "tissue_positions.csv", dtype={"barcode": str})


def _scalefactors(square: Path) -> dict:
    return json.loads((square / "spatial" / "scalefactors_json.json").read_text())


def test_inputs_byte_identical_after_reading():
    """No reader writes, renames or decompresses anything in its input folder."""
    before = _snapshot(FIX)
    eio.read_visium_hd(HD, sample="hd")
    eio.read_visium_hd(SQ16, sample="hd")
    eio.read_merscope(MER, sample="m")
    eio.read_cosmx(COS, sample="c", pixel_size_um=0.12028)
    for loc in (HD, MER, COS):
        eio.read_sample(loc, modality="spatial-cell", sample="s")
    assert _snapshot(FIX) == before


# ---------------------------------------------------------------------------------------- Visium HD

def test_visium_hd_8um_bins():
    a = eio.read_visium_hd(SQ8, sample="hd")
    _check_conventions(a, "pixel")
    assert a.shape == (48, 40)
    assert a.obs_names[0] == "s_008um_00001_00001-1"
    pos = _hd_positions(SQ8).set_index("barcode")
    bc = "s_008um_00004_00003-1"
    i = a.obs_names.get_loc(bc)
    np.testing.assert_array_equal(a.obsm["spatial"][i], pos.loc[bc, ["pxl_col_in_fullres",
                                                                     "pxl_row_in_fullres"]].to_numpy(float))
    np.testing.assert_array_equal(a.obsm["spatial.array"][i], [4, 3])
    sf = a.uns["spatial"]["hd"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(0.2738) and sf["bin_size_um"] == 8.0
    # neighbouring bins are one bin apart, in microns through microns_per_pixel
    j = a.obs_names.get_loc("s_008um_00004_00004-1")
    step_um = np.linalg.norm(a.obsm["spatial"][j] - a.obsm["spatial"][i]) * sf["microns_per_pixel"]
    assert step_um == pytest.approx(8.0)
    meta = a.uns["spatial"]["hd"]["metadata"]
    assert meta["technology"] == "visium_hd" and meta["bin_size_um"] == 8.0
    img = a.uns["spatial"]["hd"]["images"]["lowres"]
    assert img.dtype == np.uint8 and img.ndim == 3
    assert (a.obs["in_tissue"] == 1).all()
    assert list(a.var["gene_ids"][:1]) == [a.var_names[0]] and a.var_names[0].startswith("ENSG")


def test_visium_hd_counts_are_the_dlpfc_spots(shared_data):
    """Provenance: the 8 um bins carry the raw counts of DLPFC 151673 spots 100, 107, ..."""
    dl = eio.read_10x_h5(shared_data / "dlpfc" / "151673" / "filtered_feature_bc_matrix_top5000genes.h5")
    a = eio.read_visium_hd(SQ8, sample="hd")
    ref = dl[np.arange(100, 100 + 48 * 7, 7)][:, a.var_names]
    assert (a.X != ref.X).nnz == 0
    b = eio.read_visium_hd(HD, sample="hd", bin_size=16)
    assert b.X.sum() == a.X.sum()  # the 16 um bins sum the 8 um ones 2 x 2


def test_visium_hd_bin_size_selection():
    a = eio.read_visium_hd(HD, sample="hd")  # parent of outs/: 8 um by default
    assert a.shape == (48, 40) and a.uns["spatial"]["hd"]["metadata"]["bin_size_um"] == 8.0
    for loc, size in ((HD / "outs", 16), (HD / "outs" / "binned_outputs", "16um"),
                      (HD, "square_016um"), (SQ16, None), (SQ16, 16)):
        b = eio.read_visium_hd(loc, sample="hd", bin_size=size)
        assert b.shape == (12, 40) and b.obs_names[0].startswith("s_016um_")
        assert b.uns["spatial"]["hd"]["scalefactors"]["bin_size_um"] == 16.0
    with pytest.raises(ReaderError, match=r"sample 'hd'.*square_002um.*no 2 um bins.*\[8, 16\]"):
        eio.read_visium_hd(HD, sample="hd", bin_size=2)
    with pytest.raises(ReaderError, match="holds the 8 um bins"):
        eio.read_visium_hd(SQ8, sample="hd", bin_size=16)
    with pytest.raises(ReaderError, match="not a bin size"):
        eio.read_visium_hd(HD, sample="hd", bin_size="large")


def test_visium_hd_read_sample_and_detection():
    for loc in (HD, HD / "outs", HD / "outs" / "binned_outputs", SQ8,
                SQ8 / "filtered_feature_bc_matrix.h5"):
        assert eio.detect_reader(loc)[0] == "visium_hd", loc
    a = eio.read_sample(HD, modality="spatial-bin", sample="hd", bin_size=16)
    assert a.shape == (12, 40) and a.uns["io.reader"]["reader"] == "visium_hd"
    b = eio.read_sample(SQ8 / "filtered_feature_bc_matrix.h5", modality="spatial-bin", sample="hd")
    assert b.shape == (48, 40)
    c = eio.read_sample(SQ8, modality="spatial-bin", sample="hd", reader="visium_hd")
    assert c.shape == (48, 40)
    assert "visium_hd" in eio.READERS


def test_visium_hd_parquet_positions(tmp_path):
    pytest.importorskip("pyarrow")
    hd = _copy(HD, tmp_path)
    sq = hd / "outs" / "binned_outputs" / "square_008um"
    pos = _hd_positions(sq)
    pos.to_parquet(sq / "spatial" / "tissue_positions.parquet", index=False)
    (sq / "spatial" / "tissue_positions.csv").unlink()
    a = eio.read_visium_hd(hd, sample="hd")
    ref = eio.read_visium_hd(SQ8, sample="hd")
    np.testing.assert_array_equal(a.obsm["spatial"], ref.obsm["spatial"])
    np.testing.assert_array_equal(a.obsm["spatial.array"], ref.obsm["spatial.array"])
    assert list(a.obs_names) == list(ref.obs_names)


def _block_pyarrow(monkeypatch):
    for mod in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes "import pyarrow.parquet" fail


def test_visium_hd_parquet_engine_missing(tmp_path, monkeypatch):
    hd = _copy(HD, tmp_path)
    spatial = hd / "outs" / "binned_outputs" / "square_008um" / "spatial"
    try:
        import pyarrow  # noqa: F401

        _hd_positions(spatial.parent).to_parquet(spatial / "tissue_positions.parquet", index=False)
    except ImportError:
        # no engine here to write a real one: the reader must fail before reading the bytes
        (spatial / "tissue_positions.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    _block_pyarrow(monkeypatch)
    # with the CSV beside it, the CSV is read
    assert eio.read_visium_hd(hd, sample="hd").shape == (48, 40)
    (spatial / "tissue_positions.csv").unlink()
    with pytest.raises(ReaderError, match=r"sample 'hd', file '.*tissue_positions\.parquet'.*"
                                          r"pyarrow.*pip install expkit\[parquet\]"):
        eio.read_visium_hd(hd, sample="hd")
    with pytest.raises(ReaderError, match=r"expkit\[parquet\]"):
        eio.read_sample(hd, modality="spatial-bin", sample="hd")


def test_visium_hd_bad_inputs(tmp_path):
    hd = _copy(HD, tmp_path)
    sq = hd / "outs" / "binned_outputs" / "square_008um"
    csv = sq / "spatial" / "tissue_positions.csv"
    pos = _hd_positions(sq)
    # a matrix bin absent from the positions
    pos[pos["barcode"] != "s_008um_00002_00003-1"].to_csv(csv, index=False)
    with pytest.raises(ReaderError, match=r"1 of 48 matrix bins are absent from the tissue positions"
                                          r" file .*'s_008um_00002_00003-1'"):
        eio.read_visium_hd(hd, sample="hd")
    # NaN coordinates
    bad = pos.copy()
    bad.loc[bad["barcode"] == "s_008um_00003_00003-1", "pxl_row_in_fullres"] = np.nan
    bad.to_csv(csv, index=False)
    with pytest.raises(ReaderError, match=r"1 bins have NaN or infinite coordinates.*"
                                          r"'s_008um_00003_00003-1'"):
        eio.read_visium_hd(hd, sample="hd")
    # array (row, col) written in place of the pixels: bins one pixel apart instead of one bin
    bad = pos.copy()
    bad["pxl_row_in_fullres"], bad["pxl_col_in_fullres"] = bad["array_row"], bad["array_col"]
    bad.to_csv(csv, index=False)
    with pytest.raises(ReaderError, match="neighbouring bins.*array \\(row, col\\)"):
        eio.read_visium_hd(hd, sample="hd")
    assert eio.read_visium_hd(hd, sample="hd", check=False).shape == (48, 40)
    # duplicated barcode
    pd.concat([pos, pos.iloc[[5]]]).to_csv(csv, index=False)
    with pytest.raises(ReaderError, match="1 duplicated barcodes"):
        eio.read_visium_hd(hd, sample="hd")
    pos.to_csv(csv, index=False)
    # scale factors of another bin size
    sf_path = sq / "spatial" / "scalefactors_json.json"
    sf = _scalefactors(sq)
    sf_path.write_text(json.dumps({**sf, "bin_size_um": 16.0}))
    with pytest.raises(ReaderError, match="'bin_size_um' is 16.0 but the folder 'square_008um'"):
        eio.read_visium_hd(hd, sample="hd")
    sf_path.unlink()
    with pytest.raises(ReaderError, match="scalefactors_json.json.*not found"):
        eio.read_visium_hd(hd, sample="hd")
    sf_path.write_text(json.dumps(sf))
    csv.unlink()
    with pytest.raises(ReaderError, match="tissue_positions.parquet.*Visium HD tissue positions not "
                                          "found"):
        eio.read_visium_hd(hd, sample="hd")
    pos.to_csv(csv, index=False)
    (sq / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(ReaderError, match="no count matrix"):
        eio.read_visium_hd(hd, sample="hd")
    with pytest.raises(ReaderError, match="not a Visium HD output"):
        eio.read_visium_hd(tmp_path, sample="hd")


# ----------------------------------------------------------------------------------------- MERSCOPE

def _merscope_tables(folder: Path):
    mat = pd.read_csv(folder / "cell_by_gene.csv", dtype={"cell": str})
    meta = pd.read_csv(folder / "cell_metadata.csv", dtype={"Unnamed: 0": str})
    return mat, meta.rename(columns={"Unnamed: 0": "cell"})


def test_merscope():
    a = eio.read_merscope(MER, sample="m")
    _check_conventions(a, "um")
    mat, meta = _merscope_tables(MER)
    assert a.shape == (40, 30)
    assert list(a.obs_names) == list(mat["cell"])  # 38-digit ids kept exactly, as text
    assert len(a.obs_names[0]) == 39 and a.obs_names[0].isdigit()
    assert not any(g.startswith("Blank") for g in a.var_names)
    assert list(a.obsm["controls"].columns) == [f"Blank-{k}" for k in range(5)]
    np.testing.assert_array_equal(a.obsm["controls"].sum().to_numpy(),
                                  mat.filter(like="Blank-").sum().to_numpy())
    np.testing.assert_array_equal(a.obs["control_counts"].to_numpy(),
                                  mat.filter(like="Blank-").sum(axis=1).to_numpy())
    genes = [c for c in mat.columns[1:] if not c.startswith("Blank")]
    assert list(a.var_names) == genes and list(a.var["gene_symbols"]) == genes
    np.testing.assert_array_equal(a.X.toarray(), mat[genes].to_numpy(np.float32))
    cell = mat["cell"].iloc[7]
    row = meta.set_index("cell").loc[cell]
    i = a.obs_names.get_loc(cell)
    np.testing.assert_array_equal(a.obsm["spatial"][i], [row["center_x"], row["center_y"]])
    assert a.obs.loc[cell, "volume"] == pytest.approx(row["volume"])
    assert a.obs.loc[cell, "fov"] == row["fov"]
    assert a.uns["spatial"]["m"]["metadata"]["technology"] == "merscope"
    b = eio.read_merscope(MER / "cell_by_gene.csv", sample="m", keep_controls=False)
    assert "controls" not in b.obsm and (b.X != a.X).nnz == 0


def test_merscope_counts_are_xenium_cells(shared_data):
    """Provenance: the MERSCOPE fixture holds the counts of Xenium mouse brain cells 1001-1040."""
    x = eio.read_xenium(shared_data / "xenium_mouse_brain", sample="x")
    x.var_names = x.var["gene_symbols"].to_numpy()
    a = eio.read_merscope(MER, sample="m")
    ref = x[[str(k) for k in range(1001, 1041)]][:, a.var_names]
    assert (a.X != ref.X).nnz == 0
    np.testing.assert_allclose(a.obsm["spatial"], ref.obsm["spatial"])


def test_merscope_read_sample_and_variants(tmp_path):
    assert eio.detect_reader(MER)[0] == "merscope"
    assert eio.detect_reader(MER / "cell_by_gene.csv")[0] == "merscope"
    a = eio.read_sample(MER, modality="spatial-cell", sample="m")
    assert a.shape == (40, 30) and a.uns["io.reader"]["reader"] == "merscope"
    # VPT-style names: a region prefix, an 'EntityID' header, gzip
    import gzip

    folder = tmp_path / "region_0"
    folder.mkdir()
    with gzip.open(folder / "region_0_cell_by_gene.csv.gz", "wb") as fh:
        fh.write((MER / "cell_by_gene.csv").read_bytes())
    text = (MER / "cell_metadata.csv").read_text()
    (folder / "region_0_cell_metadata.csv").write_text("EntityID" + text)
    b = eio.read_sample(folder, modality="spatial-cell", sample="m")
    assert (b.X != a.X).nnz == 0 and list(b.obs_names) == list(a.obs_names)
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    # the h5ad written by the Experiment keeps the controls
    import anndata as ad

    a.write_h5ad(tmp_path / "m.h5ad")
    c = ad.read_h5ad(tmp_path / "m.h5ad")
    pd.testing.assert_frame_equal(c.obsm["controls"], a.obsm["controls"])


def test_merscope_bad_inputs(tmp_path):
    folder = _copy(MER, tmp_path)
    mat, meta = _merscope_tables(folder)
    meta_path = folder / "cell_metadata.csv"
    meta_path.unlink()
    with pytest.raises(ReaderError, match=r"sample 'm', file '.*cell_metadata.csv': MERSCOPE cell "
                                          r"metadata not found"):
        eio.read_merscope(folder, sample="m")
    with pytest.raises(ReaderError, match="cell metadata not found"):
        eio.read_sample(folder, modality="spatial-cell", sample="m")
    missing = mat["cell"].iloc[3]
    meta[meta["cell"] != missing].rename(columns={"cell": ""}).to_csv(meta_path, index=False)
    with pytest.raises(ReaderError, match=f"cell_metadata.csv.*1 of 40 matrix cells are absent "
                                          f"from the cell metadata.*'{missing}'"):
        eio.read_merscope(folder, sample="m")
    bad = meta.copy()
    bad.loc[bad["cell"] == missing, "center_y"] = np.nan
    bad.rename(columns={"cell": ""}).to_csv(meta_path, index=False)
    with pytest.raises(ReaderError, match=f"1 cells have NaN or infinite coordinates.*'{missing}'"):
        eio.read_merscope(folder, sample="m")
    meta.drop(columns=["center_x"]).rename(columns={"cell": ""}).to_csv(meta_path, index=False)
    with pytest.raises(ReaderError, match=r"required column\(s\) \['center_x'\] missing"):
        eio.read_merscope(folder, sample="m")
    meta.rename(columns={"cell": ""}).to_csv(meta_path, index=False)
    assert eio.read_merscope(folder, sample="m").shape == (40, 30)
    bad = mat.astype(object)
    bad.iloc[2, 4] = "n/a"
    bad.to_csv(folder / "cell_by_gene.csv", index=False)
    with pytest.raises(ReaderError, match=f"cell_by_gene.csv.*1 missing or non-finite counts .*row 4 "
                                          f".*'{mat['cell'].iloc[2]}'.*column '{mat.columns[4]}'"):
        eio.read_merscope(folder, sample="m")
    bad.iloc[2, 4] = "seven"
    bad.to_csv(folder / "cell_by_gene.csv", index=False)
    with pytest.raises(ReaderError, match="cell_by_gene.csv.*malformed cell_by_gene table"):
        eio.read_merscope(folder, sample="m")
    pd.concat([mat, mat.iloc[[0]]]).to_csv(folder / "cell_by_gene.csv", index=False)
    with pytest.raises(ReaderError, match="1 duplicated cell ids"):
        eio.read_merscope(folder, sample="m")


# -------------------------------------------------------------------------------------------- CosMx

def _cosmx_tables(folder: Path):
    return (pd.read_csv(folder / "Fixture_exprMat_file.csv"),
            pd.read_csv(folder / "Fixture_metadata_file.csv"))


def test_cosmx():
    a = eio.read_cosmx(COS, sample="c")
    _check_conventions(a, "pixel")
    expr, meta = _cosmx_tables(COS)
    cells = expr[expr["cell_ID"] != 0]
    assert a.shape == (30, 30)
    assert (expr["cell_ID"] == 0).sum() == 2 and not any(n.endswith("_0") for n in a.obs_names)
    assert list(a.obs_names) == [f"{f}_{c}" for f, c in zip(cells["fov"], cells["cell_ID"])]
    ctrl = [c for c in expr.columns if c.startswith(("NegPrb", "SystemControl"))]
    assert len(ctrl) == 8 and not set(ctrl) & set(a.var_names)
    assert list(a.obsm["controls"].columns) == ctrl
    np.testing.assert_array_equal(a.obsm["controls"].to_numpy(), cells[ctrl].to_numpy(np.float32))
    genes = [c for c in expr.columns[2:] if c not in ctrl]
    np.testing.assert_array_equal(a.X.toarray(), cells[genes].to_numpy(np.float32))
    row = meta[(meta["fov"] == 2) & (meta["cell_ID"] == 5)].iloc[0]
    i = a.obs_names.get_loc("2_5")
    np.testing.assert_array_equal(a.obsm["spatial"][i], [row["CenterX_global_px"],
                                                         row["CenterY_global_px"]])
    assert a.obs.loc["2_5", "Area"] == row["Area"] and a.obs.loc["2_5", "fov"] == 2
    assert a.obs.loc["2_5", "CenterX_local_px"] == row["CenterX_local_px"]
    assert a.uns["spatial"]["c"]["metadata"]["technology"] == "cosmx"
    um = eio.read_cosmx(COS / "Fixture_exprMat_file.csv", sample="c", pixel_size_um=0.12028)
    _check_conventions(um, "um")
    np.testing.assert_allclose(um.obsm["spatial"], a.obsm["spatial"] * 0.12028)
    assert um.uns["spatial"]["c"]["scalefactors"]["microns_per_pixel"] == 0.12028
    with pytest.raises(ReaderError, match="pixel_size_um=-1 must be a positive number"):
        eio.read_cosmx(COS, sample="c", pixel_size_um=-1)


def test_cosmx_counts_are_xenium_cells(shared_data):
    """Provenance: CosMx fixture cells are Xenium mouse brain cells 2001-2030 (centroid um / 0.12028)."""
    x = eio.read_xenium(shared_data / "xenium_mouse_brain", sample="x")
    x.var_names = x.var["gene_symbols"].to_numpy()
    a = eio.read_cosmx(COS, sample="c", pixel_size_um=0.12028)
    ref = x[[str(k) for k in range(2001, 2031)]][:, a.var_names]
    order = np.lexsort((ref.obsm["spatial"][:, 1], ref.obsm["spatial"][:, 0]))
    mine = np.lexsort((a.obsm["spatial"][:, 1], a.obsm["spatial"][:, 0]))
    np.testing.assert_allclose(a.obsm["spatial"][mine], ref.obsm["spatial"][order], atol=1e-3)
    assert (a.X[mine] != ref.X[order]).nnz == 0


def test_cosmx_text_cell_id_column(tmp_path):
    """Exports with a text cell id before fov/cell_ID read the same."""
    folder = _copy(COS, tmp_path)
    expr, _ = _cosmx_tables(folder)
    expr.insert(0, "cell", [f"c_1_{f}_{c}" for f, c in zip(expr["fov"], expr["cell_ID"])])
    expr.to_csv(folder / "Fixture_exprMat_file.csv", index=False)
    a, ref = eio.read_cosmx(folder, sample="c"), eio.read_cosmx(COS, sample="c")
    assert (a.X != ref.X).nnz == 0 and list(a.obs_names) == list(ref.obs_names)
    assert list(a.var_names) == list(ref.var_names)


def test_cosmx_read_sample():
    assert eio.detect_reader(COS)[0] == "cosmx"
    assert eio.detect_reader(COS / "Fixture_exprMat_file.csv")[0] == "cosmx"
    a = eio.read_sample(COS, modality="spatial-cell", sample="c", pixel_size_um=0.12028)
    assert a.shape == (30, 30) and a.uns["spatial.unit"] == "um"
    assert a.uns["io.reader"]["reader"] == "cosmx"
    fov1 = eio.read_sample(COS, modality="spatial-cell", sample="c", select="fov=1")
    assert fov1.n_obs == (a.obs["fov"] == 1).sum() > 0


def test_cosmx_bad_inputs(tmp_path):
    folder = _copy(COS, tmp_path)
    expr, meta = _cosmx_tables(folder)
    meta_path = folder / "Fixture_metadata_file.csv"
    meta_path.unlink()
    with pytest.raises(ReaderError, match=r"sample 'c', file '.*\*_metadata_file.csv': CosMx "
                                          r"metadata not found"):
        eio.read_cosmx(folder, sample="c")
    meta[~((meta["fov"] == 1) & (meta["cell_ID"] == 4))].to_csv(meta_path, index=False)
    with pytest.raises(ReaderError, match=r"Fixture_metadata_file.csv.*1 of 30 matrix cells are "
                                          r"absent from the metadata.*'1_4'"):
        eio.read_cosmx(folder, sample="c")
    bad = meta.copy()
    bad.loc[(bad["fov"] == 2) & (bad["cell_ID"] == 3), "CenterX_global_px"] = np.nan
    bad.to_csv(meta_path, index=False)
    with pytest.raises(ReaderError, match="1 cells have NaN or infinite coordinates.*'2_3'"):
        eio.read_cosmx(folder, sample="c")
    meta.drop(columns=["cell_ID"]).to_csv(meta_path, index=False)
    with pytest.raises(ReaderError, match=r"required column\(s\) \['cell_ID'\] missing from the "
                                          r"metadata"):
        eio.read_cosmx(folder, sample="c")
    meta.to_csv(meta_path, index=False)
    assert eio.read_cosmx(folder, sample="c").shape == (30, 30)
    expr_path = folder / "Fixture_exprMat_file.csv"
    expr.drop(columns=["fov"]).to_csv(expr_path, index=False)
    with pytest.raises(ReaderError, match=r"start with columns \['fov', 'cell_ID'\]"):
        eio.read_cosmx(folder, sample="c")
    pd.concat([expr, expr.iloc[[3]]]).to_csv(expr_path, index=False)
    with pytest.raises(ReaderError, match=r"1 duplicated cells \(fov, cell_ID\)"):
        eio.read_cosmx(folder, sample="c")
    expr[expr["cell_ID"] == 0].to_csv(expr_path, index=False)
    with pytest.raises(ReaderError, match="only background rows"):
        eio.read_cosmx(folder, sample="c")
