"""Raw-input readers (expkit.io) on the shared real datasets and on broken copies of them."""
from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from expkit.errors import InputError, ReaderError
import expkit.io as eio

DLPFC_H5 = "filtered_feature_bc_matrix_top5000genes.h5"


# ------------------------------------------------------------------------------------------- helpers

def _snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, size and mtime (ns) of every file under ``folder`` (plus the set of names)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size,
                                               st.st_mtime_ns)
        else:
            out[str(p.relative_to(folder))] = ("dir", 0, 0)
    return out


class untouched:
    """Context manager asserting that nothing under ``folder`` changed (bytes, mtimes, new files)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __enter__(self):
        self.before = _snapshot(self.folder)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            assert _snapshot(self.folder) == self.before, f"reader modified {self.folder}"
        return False


@pytest.fixture(scope="module")
def data(shared_data) -> Path:
    return shared_data


@pytest.fixture()
def visium_copy(data, tmp_path) -> Path:
    """A writable copy of the scanpy Space Ranger 1.0.0 fixture (100 spots, both images)."""
    dst = tmp_path / "visium"
    shutil.copytree(data / "visium_fixtures" / "scanpy_visium_1.0.0", dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def _positions(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None, dtype={0: str})


def _write_positions(folder: Path, df: pd.DataFrame) -> None:
    df.to_csv(folder / "spatial" / "tissue_positions_list.csv", header=False, index=False)


def _matrix_barcodes(folder: Path) -> list[str]:
    import h5py

    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as fh:
        return [b.decode() for b in fh["matrix/barcodes"][()]]


def _write_h5(path: Path, X_genes_x_cells: sp.csc_matrix, barcodes, ids, names=None, types=None,
              drop: tuple[str, ...] = ()) -> None:
    import h5py

    X = sp.csc_matrix(X_genes_x_cells)
    with h5py.File(path, "w") as fh:
        g = fh.create_group("matrix")
        for k, v in (("data", X.data.astype(np.int32)), ("indices", X.indices.astype(np.int64)),
                     ("indptr", X.indptr.astype(np.int64)), ("shape", np.array(X.shape, np.int32)),
                     ("barcodes", np.array(barcodes, dtype="S"))):
            if k not in drop:
                g.create_dataset(k, data=v)
        f = g.create_group("features")
        f.create_dataset("id", data=np.array(ids, dtype="S"))
        f.create_dataset("name", data=np.array(names if names is not None else ids, dtype="S"))
        f.create_dataset("feature_type", data=np.array(
            types if types is not None else ["Gene Expression"] * len(ids), dtype="S"))
        f.create_dataset("genome", data=np.array(["GRCh38"] * len(ids), dtype="S"))


def _dense(X) -> np.ndarray:
    return np.asarray(X.todense()) if sp.issparse(X) else np.asarray(X)


def _check_conventions(adata) -> None:
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert (adata.obs["barcode"].to_numpy() == adata.obs_names.to_numpy()).all()
    assert "gene_ids" in adata.var and "feature_types" in adata.var
    if "spatial" in adata.obsm:
        xy = adata.obsm["spatial"]
        assert xy.dtype == np.float64 and xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()
        assert "spatial.unit" in adata.uns
    if "spatial.array" in adata.obsm:
        assert adata.obsm["spatial.array"].dtype == np.int64


# ----------------------------------------------------------------------------------- 10x HDF5 / mtx

def test_read_10x_h5_dlpfc_matches_h5py(data):
    import h5py

    path = data / "dlpfc" / "151673" / DLPFC_H5
    with untouched(path.parent):
        adata = eio.read_10x_h5(path, sample="151673")
    _check_conventions(adata)
    assert adata.shape == (3639, 5000)
    with h5py.File(path, "r") as fh:
        g = fh["matrix"]
        ref = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]),
                            shape=tuple(g["shape"][()]))
        barcodes = [b.decode() for b in g["barcodes"][()]]
        ids = [b.decode() for b in g["features/id"][()]]
        names = [b.decode() for b in g["features/name"][()]]
    assert list(adata.obs_names) == barcodes
    assert list(adata.var_names) == ids and ids[0].startswith("ENSG")
    assert list(adata.var["gene_symbols"]) == names
    assert (adata.X != ref.T.tocsr().astype(np.float32)).nnz == 0
    assert adata.X.sum() == pytest.approx(float(ref.sum()))
    # the barcodes are those of the spatialLIBD per-spot table
    meta = pd.read_csv(data / "dlpfc" / "151673" / "metadata.tsv", sep="\t", usecols=["barcode"])
    assert set(meta["barcode"]) == set(barcodes)


def test_read_10x_h5_gex_only_xenium(data):
    path = data / "xenium_mouse_brain" / "cell_feature_matrix.h5"
    gex = eio.read_10x_h5(path, sample="xb")
    full = eio.read_10x_h5(path, sample="xb", gex_only=False)
    assert gex.shape == (36602, 248) and full.shape == (36602, 541)
    assert set(full.var["feature_types"]) >= {"Gene Expression", "Negative Control Probe"}
    assert (gex.var["feature_types"] == "Gene Expression").all()
    np.testing.assert_array_equal(_dense(full[:, gex.var_names].X[:200]), _dense(gex.X[:200]))


def test_read_10x_mtx_roundtrip_gz(data, tmp_path):
    """The MatrixMarket folder reader gives the same matrix as the HDF5 reader (gzipped files)."""
    ref = eio.read_10x_h5(data / "visium_fixtures" / "scanpy_visium_1.0.0" /
                          "filtered_feature_bc_matrix.h5", sample="s")
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(ref.X.T.astype(np.int64)))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        for i, s in zip(ref.var["gene_ids"], ref.var["gene_symbols"]):
            fh.write(f"{i}\t{s}\tGene Expression\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(ref.obs_names) + "\n")
    with untouched(folder):
        adata = eio.read_10x_mtx(folder, sample="s")
    _check_conventions(adata)
    assert list(adata.obs_names) == list(ref.obs_names)
    assert list(adata.var_names) == list(ref.var_names)
    assert (adata.X != ref.X).nnz == 0
    # auto-detection of the same folder
    assert eio.detect_reader(folder)[0] == "10x_mtx"


def test_read_10x_h5_probe_matrix_2_1_0(data):
    """The Space Ranger 2.1.0 fixture holds only a probe-level raw matrix (no spatial/ folder)."""
    folder = data / "visium_fixtures" / "scanpy_visium_2.1.0"
    adata = eio.read_10x_h5(folder / "raw_probe_bc_matrix.h5", sample="p")
    _check_conventions(adata)
    assert adata.shape == (4987, 1000)
    with pytest.raises(ReaderError, match="spatial/"):
        eio.read_visium(folder, sample="p")
    rna = eio.read_sample(folder, modality="rna", sample="p")
    assert rna.shape == (4987, 1000)
    with pytest.raises(ReaderError, match="needs spatial coordinates"):
        eio.read_sample(folder, modality="spatial-bin", sample="p")


# ------------------------------------------------------------------------------------------- Visium

def test_read_visium_dlpfc_151673(data):
    folder = data / "dlpfc" / "151673"
    with untouched(folder):
        adata = eio.read_visium(folder, sample="151673")
    _check_conventions(adata)
    assert adata.shape == (3639, 5000)
    h5 = eio.read_10x_h5(folder / DLPFC_H5)
    assert list(adata.obs_names) == list(h5.obs_names)
    assert (adata.obs["in_tissue"] == 1).all()
    # a known spot: positions row AAACAAGTATCTCCCA-1,1,50,102,8468,9791 -> x = pxl_col, y = pxl_row
    i = adata.obs_names.get_loc("AAACAAGTATCTCCCA-1")
    np.testing.assert_array_equal(adata.obsm["spatial"][i], [9791.0, 8468.0])
    np.testing.assert_array_equal(adata.obsm["spatial.array"][i], [50, 102])
    # ACGCCTGACACGCGCT-1 (pxl_row 2427, pxl_col 2811) is not in tissue: not in the filtered matrix
    assert "ACGCCTGACACGCGCT-1" not in adata.obs_names
    assert adata.uns["spatial.unit"] == "pixel"
    lib = adata.uns["spatial"]["151673"]
    assert set(lib) == {"images", "scalefactors", "metadata"}
    assert set(lib["images"]) == {"lowres"}  # no hires image in this folder: a real case
    img = lib["images"]["lowres"]
    assert img.dtype == np.uint8 and img.shape == (600, 600, 3)
    from PIL import Image

    np.testing.assert_array_equal(img, np.asarray(Image.open(folder / "spatial" /
                                                             "tissue_lowres_image.png").convert("RGB")))
    sf = lib["scalefactors"]
    assert sf["tissue_lowres_scalef"] == pytest.approx(0.045004502)
    assert lib["metadata"]["technology"] == "visium"
    assert lib["metadata"]["source_image_path"].endswith("tissue_lowres_image.png")
    # every spot falls inside the lowres image
    s = adata.obsm["spatial"] * sf["tissue_lowres_scalef"]
    assert (s >= 0).all() and (s[:, 0] < 600).all() and (s[:, 1] < 600).all()


def test_read_visium_scanpy_fixture_both_images(data):
    folder = data / "visium_fixtures" / "scanpy_visium_1.0.0"
    with untouched(folder):
        adata = eio.read_visium(folder, sample="s1")
    _check_conventions(adata)
    assert adata.shape == (100, 100)
    imgs = adata.uns["spatial"]["s1"]["images"]
    assert imgs["hires"].shape == (2000, 2000, 3) and imgs["hires"].dtype == np.uint8  # RGBA -> RGB
    assert imgs["lowres"].shape == (600, 600, 3)
    i = adata.obs_names.get_loc("AAACAAGTATCTCCCA-1")
    np.testing.assert_array_equal(adata.obsm["spatial"][i], [9811.0, 8513.0])
    assert adata.uns["spatial"]["s1"]["metadata"]["software_version"] == "spaceranger-1.0.0"
    light = eio.read_visium(folder, sample="s1", load_images=False)
    assert light.uns["spatial"]["s1"]["images"] == {}


def test_read_visium_writable_copy_untouched(visium_copy):
    """On a writable folder too, reading creates, changes or removes nothing."""
    with untouched(visium_copy):
        eio.read_visium(visium_copy, sample="s")
        eio.read_sample(visium_copy, modality="spatial-bin", sample="s")


def test_read_visium_space_ranger_2_header_and_outs(visium_copy, tmp_path):
    pos = _positions(visium_copy)
    pos.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                   "pxl_col_in_fullres"]
    (visium_copy / "spatial" / "tissue_positions_list.csv").unlink()
    pos.to_csv(visium_copy / "spatial" / "tissue_positions.csv", index=False)
    outs_parent = tmp_path / "run"
    outs_parent.mkdir()
    shutil.move(str(visium_copy), outs_parent / "outs")
    adata = eio.read_visium(outs_parent, sample="s")
    assert adata.n_obs == 100
    i = adata.obs_names.get_loc("AAACAAGTATCTCCCA-1")
    np.testing.assert_array_equal(adata.obsm["spatial"][i], [9811.0, 8513.0])


def test_read_visium_in_tissue_filter(visium_copy):
    pos = _positions(visium_copy)
    bc = _matrix_barcodes(visium_copy)[5]
    pos.loc[pos[0] == bc, 1] = 0
    _write_positions(visium_copy, pos)
    assert eio.read_visium(visium_copy, sample="s").n_obs == 99
    kept = eio.read_visium(visium_copy, sample="s", in_tissue_only=False)
    assert kept.n_obs == 100 and kept.obs.loc[bc, "in_tissue"] == 0


# ---------------------------------------------------------------------------------- Visium bad input

def test_visium_positions_missing_barcode(visium_copy):
    pos = _positions(visium_copy)
    bc = _matrix_barcodes(visium_copy)[3]
    _write_positions(visium_copy, pos[pos[0] != bc])
    with pytest.raises(ReaderError) as err:
        eio.read_visium(visium_copy, sample="s7")
    msg = str(err.value)
    assert "s7" in msg and "tissue_positions_list.csv" in msg and "1 of 100" in msg and bc in msg


def test_visium_nan_coordinates(visium_copy):
    pos = _positions(visium_copy)
    bcs = _matrix_barcodes(visium_copy)[:2]
    pos.loc[pos[0].isin(bcs), 5] = np.nan
    _write_positions(visium_copy, pos)
    with pytest.raises(ReaderError) as err:
        eio.read_visium(visium_copy, sample="s")
    msg = str(err.value)
    assert "2 spots" in msg and "NaN" in msg and bcs[0] in msg and "tissue_positions_list.csv" in msg


def test_visium_duplicated_barcode(visium_copy):
    pos = _positions(visium_copy)
    _write_positions(visium_copy, pd.concat([pos, pos.iloc[[10]]]))
    with pytest.raises(ReaderError, match="duplicated barcodes"):
        eio.read_visium(visium_copy, sample="s")


def test_visium_missing_scalefactors(visium_copy):
    (visium_copy / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(ReaderError, match="scalefactors_json.json") as err:
        eio.read_visium(visium_copy, sample="s3")
    assert "s3" in str(err.value)


def test_visium_malformed_scalefactors(visium_copy):
    (visium_copy / "spatial" / "scalefactors_json.json").write_text("{not json")
    with pytest.raises(ReaderError, match="malformed scale factors"):
        eio.read_visium(visium_copy, sample="s")


def test_visium_missing_positions_and_matrix(visium_copy):
    (visium_copy / "spatial" / "tissue_positions_list.csv").unlink()
    with pytest.raises(ReaderError, match="tissue positions file not found"):
        eio.read_visium(visium_copy, sample="s")
    (visium_copy / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(ReaderError, match="no count matrix"):
        eio.read_visium(visium_copy, sample="s")


def test_visium_array_coordinates_as_pixels(visium_copy):
    """Pixel columns replaced by array coordinates: the spot spacing check catches it."""
    pos = _positions(visium_copy)
    pos[4], pos[5] = pos[2], pos[3]
    _write_positions(visium_copy, pos)
    with pytest.raises(ReaderError, match="array .row, col. coordinates used as pixels"):
        eio.read_visium(visium_copy, sample="s")


def test_visium_wrong_scalefactor(visium_copy):
    """Scale factors of another image: spots land outside the lowres image."""
    import json

    path = visium_copy / "spatial" / "scalefactors_json.json"
    sf = json.loads(path.read_text())
    sf["tissue_lowres_scalef"] = sf["tissue_hires_scalef"]
    path.write_text(json.dumps(sf))
    with pytest.raises(ReaderError, match="outside the lowres image"):
        eio.read_visium(visium_copy, sample="s")
    assert eio.read_visium(visium_copy, sample="s", check=False).n_obs == 100


def test_visium_malformed_positions(visium_copy):
    path = visium_copy / "spatial" / "tissue_positions_list.csv"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",abc"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReaderError, match="non-numeric"):
        eio.read_visium(visium_copy, sample="s")


def test_visium_corrupt_image(visium_copy):
    (visium_copy / "spatial" / "tissue_lowres_image.png").write_bytes(b"not a png")
    with pytest.raises(ReaderError, match="tissue_lowres_image.png"):
        eio.read_visium(visium_copy, sample="s")


# --------------------------------------------------------------------------------------- HDF5 errors

def test_truncated_h5(visium_copy):
    path = visium_copy / "filtered_feature_bc_matrix.h5"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReaderError) as err:
        eio.read_10x_h5(path, sample="s9")
    msg = str(err.value)
    assert "s9" in msg and "filtered_feature_bc_matrix.h5" in msg and "corrupt or truncated" in msg
    with pytest.raises(ReaderError, match="corrupt or truncated"):
        eio.read_visium(visium_copy, sample="s9")


def test_h5_missing_dataset_and_duplicates(tmp_path):
    X = sp.random(5, 4, density=0.5, format="csc", random_state=0) * 10
    X.data = np.ceil(X.data)
    path = tmp_path / "m.h5"
    _write_h5(path, X, ["A-1", "B-1", "C-1", "D-1"], [f"G{i}" for i in range(5)], drop=("indptr",))
    with pytest.raises(ReaderError, match="matrix/indptr' is missing"):
        eio.read_10x_h5(path, sample="s")
    _write_h5(path, X, ["A-1", "B-1", "A-1", "D-1"], [f"G{i}" for i in range(5)])
    with pytest.raises(ReaderError, match="1 duplicated barcodes .*'A-1'"):
        eio.read_10x_h5(path, sample="s")
    _write_h5(path, X, ["A-1", "B-1", "C-1", "D-1"], [f"G{i}" for i in range(5)],
              types=["Gene Expression"] * 4 + ["Antibody Capture"])
    a = eio.read_10x_h5(path, sample="s")
    assert a.shape == (4, 4)
    np.testing.assert_array_equal(_dense(a.X), _dense(X.T)[:, :4])
    assert eio.read_10x_h5(path, gex_only=False).shape == (4, 5)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ReaderError, match="not a readable HDF5"):
        eio.read_10x_h5(tmp_path / "text.h5", sample="s")


def test_nonexistent_paths(tmp_path):
    missing = tmp_path / "nope"
    for call in (lambda: eio.read_10x_h5(missing / "a.h5", sample="s"),
                 lambda: eio.read_10x_mtx(missing, sample="s"),
                 lambda: eio.read_visium(missing, sample="s"),
                 lambda: eio.read_xenium(missing, sample="s"),
                 lambda: eio.read_table(missing / "t.tsv", sample="s"),
                 lambda: eio.read_h5ad(missing / "a.h5ad", sample="s"),
                 lambda: eio.read_sample(missing, modality="rna", sample="s")):
        with pytest.raises(ReaderError) as err:
            call()
        assert "nope" in str(err.value) and "'s'" in str(err.value)
    assert issubclass(ReaderError, InputError)


# ------------------------------------------------------------------------------------------- tables

def test_read_table_mob_inline_coordinates(data):
    path = data / "mob_rep11" / "Rep11_MOB_counts_spots_x_genes.tsv.gz"
    with untouched(path.parent):
        adata = eio.read_table(path, sample="mob")
    _check_conventions(adata)
    assert adata.shape == (262, 15928)
    assert "x" not in adata.var_names and "y" not in adata.var_names
    i = adata.obs_names.get_loc("GTTCCTGTGGTATTATGA")
    np.testing.assert_allclose(adata.obsm["spatial"][i], [7.948, 14.067])
    ref = pd.read_csv(path, sep="\t", index_col=0, nrows=3)
    np.testing.assert_array_equal(_dense(adata[ref.index, ref.columns[2:]].X), ref.iloc[:, 2:].to_numpy())
    # with the annotated spots table: layer becomes an obs column
    with_coords = eio.read_table(path, coords=data / "mob_rep11" / "Rep11_MOB_spots.tsv", sample="mob")
    assert with_coords.shape == (262, 15928)
    assert with_coords.obs["layer"].str.contains("Layer").all()
    np.testing.assert_allclose(with_coords.obsm["spatial"], adata.obsm["spatial"])


def test_read_table_giotto_prostate(data):
    folder = data / "giotto" / "Visium_multisample_prostate"
    with untouched(folder):
        adata = eio.read_table(folder / "expression_matrix.txt.gz", coords=folder / "spatial_locs.txt",
                               metadata=folder / "cell_metadata.txt", sample="prostate")
    _check_conventions(adata)
    assert adata.shape == (2327, 1255)
    assert adata.obs["list_ID"].value_counts().to_dict() == {"CP": 1340, "NP": 987}
    i = adata.obs_names.get_loc("NP-AAACAATCTACTAGCA-1")
    np.testing.assert_array_equal(adata.obsm["spatial"][i], [11334.0, -4450.0])
    np.testing.assert_array_equal(adata.obsm["spatial.array"][i], [3, 43])
    assert adata.var_names[0] == "A4GALT" and adata.var["gene_symbols"].iloc[0] == "A4GALT"
    # explicit orientation gives the same; the wrong one is an error naming the files
    same = eio.read_table(folder / "expression_matrix.txt.gz", coords=folder / "spatial_locs.txt",
                          orientation="genes x spots", sample="prostate")
    assert (same.X != adata.X).nnz == 0
    with pytest.raises(ReaderError, match="absent from the coordinate table"):
        eio.read_table(folder / "expression_matrix.txt.gz", coords=folder / "spatial_locs.txt",
                       orientation="spots x genes", sample="prostate")
    for sel, n in (("list_ID=NP", 987), ("list_ID=CP", 1340)):
        one = eio.read_sample(folder, modality="spatial-bin", sample=sel[-2:], select=sel)
        assert one.n_obs == n and (one.obs["list_ID"] == sel[-2:]).all()
        assert one.uns["io.reader"]["reader"] == "table"


def test_read_table_breast_cancer_mtx(data):
    folder = data / "breast_cancer_layers"
    with untouched(folder):
        adata = eio.read_table(folder / "matrix_genes_x_spots.mtx.gz", coords=folder / "spots.tsv",
                               genes=folder / "genes.tsv", sample="bc")
    _check_conventions(adata)
    assert adata.shape == (1031, 13360)
    i = adata.obs_names.get_loc("L1-ACATCACCTGCGCGCTCT")
    np.testing.assert_allclose(adata.obsm["spatial"][i], [-3.370232283464567, 4.195421259842519])
    sizes = {}
    for s in (1, 2, 3, 4):
        one = eio.read_sample(folder, modality="spatial-bin", sample=f"L{s}", select=f"slice={s}")
        sizes[s] = one.n_obs
        assert one.n_vars == 13360
    assert sizes == {1: 254, 2: 251, 3: 264, 4: 262}


def test_read_table_small_csv_both_orientations(tmp_path):
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.poisson(2, size=(6, 4)), index=[f"spot_{i}" for i in range(6)],
                          columns=["Actb", "Gapdh", "Mbp", "Plp1"])
    coords = pd.DataFrame({"cell": counts.index, "px": np.arange(6.0), "py": np.arange(6.0) * 2})
    counts.to_csv(tmp_path / "counts.csv")
    counts.T.to_csv(tmp_path / "counts_t.tsv", sep="\t")
    coords.to_csv(tmp_path / "xy.csv", index=False)
    a = eio.read_table(tmp_path / "counts.csv", coords=tmp_path / "xy.csv", x="px", y="py", unit="um")
    b = eio.read_table(tmp_path / "counts_t.tsv", coords=tmp_path / "xy.csv", x="px", y="py")
    c = eio.read_table(tmp_path / "counts_t.tsv")  # no coords: names decide the orientation
    for ad_ in (a, b, c):
        assert list(ad_.obs_names) == list(counts.index) and list(ad_.var_names) == list(counts.columns)
        np.testing.assert_array_equal(_dense(ad_.X), counts.to_numpy())
    np.testing.assert_array_equal(a.obsm["spatial"][:, 1], np.arange(6.0) * 2)
    assert a.uns["spatial.unit"] == "um" and "spatial" not in c.obsm
    with pytest.raises(ReaderError, match="coordinate columns"):
        eio.read_table(tmp_path / "counts.csv", coords=tmp_path / "xy.csv", sample="s")


def test_read_table_bad_inputs(tmp_path):
    good = "id\tx\ty\tG1\tG2\nA\t1\t2\t3\t4\nB\t5\t6\t7\t8\nC\t1\t1\t0\t1\n"
    (tmp_path / "nan.tsv").write_text(good.replace("5\t6", "5\tnan"))
    with pytest.raises(ReaderError, match="1 spots have NaN .*'B'"):
        eio.read_table(tmp_path / "nan.tsv", sample="s")
    (tmp_path / "bad.tsv").write_text(good.replace("\t7\t", "\tseven\t"))
    with pytest.raises(ReaderError, match="malformed count table: column 'G1'"):
        eio.read_table(tmp_path / "bad.tsv", sample="s")
    (tmp_path / "dup.tsv").write_text(good.replace("C\t", "A\t"))
    with pytest.raises(ReaderError, match="duplicated spot/cell identifiers"):
        eio.read_table(tmp_path / "dup.tsv", sample="s")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ReaderError, match="empty"):
        eio.read_table(tmp_path / "empty.tsv", sample="s")
    (tmp_path / "ok.tsv").write_text(good)
    (tmp_path / "xy.tsv").write_text("id\tx\ty\nA\t1\t2\nB\t5\t6\n")
    with pytest.raises(ReaderError, match="1 of 3 spots .* absent .*'C'"):
        eio.read_table(tmp_path / "ok.tsv", coords=tmp_path / "xy.tsv", sample="s")
    (tmp_path / "amb.tsv").write_text("id\tG1\tG2\nG3\t1\t2\nG4\t3\t4\n")
    with pytest.raises(ReaderError, match="orientation="):
        eio.read_table(tmp_path / "amb.tsv", sample="s")


# ------------------------------------------------------------------------------------------- Xenium

def test_read_xenium_mouse_brain(data):
    folder = data / "xenium_mouse_brain"
    with untouched(folder):
        adata = eio.read_xenium(folder, sample="xb")
    _check_conventions(adata)
    assert adata.shape == (36602, 248)
    assert adata.uns["spatial.unit"] == "um"
    i = adata.obs_names.get_loc("2")
    np.testing.assert_allclose(adata.obsm["spatial"][i], [1895.3047241210936, 2532.6268798828123])
    assert adata.obs.loc["2", "cell_area"] == pytest.approx(176.60609375)
    assert adata.obs.loc["2", "transcript_counts"] == 146
    for col in ("cell_area", "nucleus_area", "transcript_counts"):
        assert col in adata.obs
    same = eio.read_xenium(folder / "cell_feature_matrix.h5", sample="xb")
    assert same.shape == adata.shape
    assert eio.read_sample(folder, modality="spatial-cell", sample="xb").shape == (36602, 248)


def test_xenium_bad_cells_table(data, tmp_path):
    folder = tmp_path / "xen"
    folder.mkdir()
    shutil.copy(data / "xenium_mouse_brain" / "cell_feature_matrix.h5", folder)
    cells = pd.read_csv(data / "xenium_mouse_brain" / "cells.csv.gz")
    with pytest.raises(ReaderError, match="cells table not found"):
        eio.read_xenium(folder, sample="x")
    cells.iloc[1:].to_csv(folder / "cells.csv.gz", index=False)
    with pytest.raises(ReaderError, match="1 of 36602 matrix cells are absent .*'1'"):
        eio.read_xenium(folder, sample="x")
    bad = cells.copy()
    bad.loc[4, "x_centroid"] = np.inf
    bad.to_csv(folder / "cells.csv.gz", index=False)
    with pytest.raises(ReaderError, match="1 cells have NaN or infinite .*'5'"):
        eio.read_xenium(folder, sample="x")


# --------------------------------------------------------------------------------------------- h5ad

def test_read_h5ad_passthrough(data, tmp_path):
    path = data / "visium_fixtures" / "squidpy_test_data.h5ad"
    with untouched(path.parent):
        adata = eio.read_h5ad(path, sample="sq")
    assert adata.shape == (49, 1999)
    assert adata.obsm["spatial"].dtype == np.float64 and "barcode" in adata.obs
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ReaderError, match="bad.h5ad"):
        eio.read_h5ad(bad, sample="sq")
    assert eio.read_sample(path, modality="spatial-bin", sample="sq").n_obs == 49


# ------------------------------------------------------------------------------------- read_sample

def test_read_sample_detection_and_errors(data, tmp_path):
    assert eio.detect_reader(data / "dlpfc" / "151673")[0] == "visium"
    assert eio.detect_reader(data / "xenium_mouse_brain")[0] == "xenium"
    assert eio.detect_reader(data / "mob_rep11")[0] == "table"
    assert eio.detect_reader(data / "visium_fixtures" / "squidpy_test_data.h5ad")[0] == "h5ad"
    a = eio.read_sample(data / "dlpfc" / "151673", modality="spatial-bin", sample="151673")
    assert a.shape == (3639, 5000) and "151673" in a.uns["spatial"]
    with pytest.raises(ReaderError, match="supported layouts") as err:
        eio.read_sample(data / "gene_annotation", modality="rna", sample="g")
    assert "visium" in str(err.value) and "xenium" in str(err.value)
    mob = tmp_path / "small"
    mob.mkdir()
    (mob / "counts.tsv").write_text("spot\tx\ty\tlayer\tG1\tG2\nA\t1\t2\tGL\t3\t4\n"
                                    "B\t5\t6\tGL\t7\t8\nC\t1\t1\tMCL\t0\t1\n")
    small = eio.read_sample(mob, modality="spatial-bin", sample="m", select="layer=MCL")
    assert list(small.obs_names) == ["C"] and list(small.var_names) == ["G1", "G2"]
    with pytest.raises(ReaderError, match="no obs column 'nope'"):
        eio.read_sample(mob, modality="spatial-bin", sample="m", select="nope=1")
    with pytest.raises(ReaderError, match="matches no observation"):
        eio.read_sample(mob, modality="spatial-bin", sample="m", select="layer=cortex")
    with pytest.raises(InputError, match="column=value"):
        eio.read_sample(mob, modality="spatial-bin", sample="m", select="layer")
    with pytest.raises(InputError, match="unknown reader"):
        eio.read_sample(mob, modality="rna", sample="m", reader="csv")
    with pytest.raises(InputError, match="takes no option"):
        eio.read_sample(data / "dlpfc" / "151673", modality="rna", sample="m", reader="visium",
                        colour="red")
    prostate = data / "giotto" / "Visium_multisample_prostate"
    assert eio.read_sample(prostate, modality="spatial-bin", sample="NP", reader="table",
                           select="list_ID=NP").n_obs == 987
    with pytest.raises(ReaderError, match="looks like a 'visium' input"):
        eio.read_sample(data / "dlpfc" / "151673", modality="rna", sample="m", reader="h5ad")
    h5 = data / "dlpfc" / "151673" / DLPFC_H5
    assert eio.read_sample(h5, modality="rna", sample="m", reader="10x_h5").shape == (3639, 5000)
    with pytest.raises(ReaderError, match="needs spatial coordinates"):
        eio.read_sample(h5, modality="spatial-bin", sample="m", reader="10x_h5")


def test_read_10x_h5_v2_layout(tmp_path):
    import h5py

    X = sp.csc_matrix(np.array([[1, 0, 2], [0, 3, 0]], dtype=np.int32))  # 2 genes x 3 cells
    path = tmp_path / "v2.h5"
    with h5py.File(path, "w") as fh:
        g = fh.create_group("mm10")
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        g["shape"] = np.array(X.shape, np.int32)
        g["barcodes"] = np.array([b"A-1", b"B-1", b"C-1"])
        g["genes"] = np.array([b"ENSMUSG01", b"ENSMUSG02"])
        g["gene_names"] = np.array([b"Actb", b"Gapdh"])
    a = eio.read_10x_h5(path, sample="v2")
    _check_conventions(a)
    assert list(a.var_names) == ["ENSMUSG01", "ENSMUSG02"]
    assert list(a.var["gene_symbols"]) == ["Actb", "Gapdh"]
    np.testing.assert_array_equal(_dense(a.X), X.T.toarray())


def test_read_visium_mtx_matrix_folder(visium_copy):
    ref = eio.read_visium(visium_copy, sample="s")
    folder = visium_copy / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(ref.X.T))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        for i, s in zip(ref.var["gene_ids"], ref.var["gene_symbols"]):
            fh.write(f"{i}\t{s}\tGene Expression\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(ref.obs_names) + "\n")
    (visium_copy / "filtered_feature_bc_matrix.h5").unlink()
    a = eio.read_visium(visium_copy, sample="s")
    assert (a.X != ref.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], ref.obsm["spatial"])


@pytest.mark.filterwarnings("ignore:Element .* without encoding metadata")
def test_read_h5ad_not_anndata(tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5ad", "w") as fh:
        fh["x"] = np.arange(3)
    with pytest.raises(ReaderError, match="other.h5ad"):
        eio.read_h5ad(tmp_path / "other.h5ad", sample="s")


def test_import_expkit_io_is_light():
    import subprocess
    import sys

    code = ("import sys, expkit.io; "
            "print(any(m in sys.modules for m in ('torch', 'matplotlib', 'anndata', 'h5py')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_read_visium_parquet_positions(visium_copy):
    pytest.importorskip("pyarrow")
    pos = _positions(visium_copy)
    pos.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                   "pxl_col_in_fullres"]
    (visium_copy / "spatial" / "tissue_positions_list.csv").unlink()
    pos.to_parquet(visium_copy / "spatial" / "tissue_positions.parquet")
    a = eio.read_visium(visium_copy, sample="s")
    i = a.obs_names.get_loc("AAACAAGTATCTCCCA-1")
    np.testing.assert_array_equal(a.obsm["spatial"][i], [9811.0, 8513.0])


def test_results_write_to_h5ad(data, tmp_path):
    """What the readers return can be stored by the Experiment (h5ad round trip)."""
    import anndata as ad

    for loc, sel in (("dlpfc/151673", None), ("giotto/Visium_multisample_prostate", "list_ID=NP")):
        a = eio.read_sample(data / loc, modality="spatial-bin", sample="s", select=sel)
        a.write_h5ad(tmp_path / "rt.h5ad")
        b = ad.read_h5ad(tmp_path / "rt.h5ad")
        assert (a.X != b.X).nnz == 0
        np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])


def test_table_coordinates_without_identifiers_refused(data):
    """Giotto's mouse-brain DG locations file has no spot names: refuse to align by row order."""
    folder = data / "giotto" / "Visium_mouse_brain_DG"
    with untouched(folder):
        with pytest.raises(ReaderError, match="visium_DG_locs.txt.*no identifier column"):
            eio.read_sample(folder, modality="spatial-bin", sample="dg")
        rna = eio.read_table(folder / "visium_DG_expr.txt.gz", orientation="genes x spots", sample="dg")
    assert rna.shape == (624, 634)
