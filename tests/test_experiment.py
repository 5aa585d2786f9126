"""The Experiment: creation from raw inputs, folder format, lazy loading, saving, dispatch, errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import expkit as ek
from expkit.errors import ExpkitError, FormatError, InputError, SampleNotFoundError
from expkit.experiment import store

COLUMNS = ["sample", "modality", "batch", "group", "taxa", "location"]


def _table(rows, path: Path) -> Path:
    df = pd.DataFrame(rows)
    out = path / "samples.tsv"
    df.to_csv(out, sep="\t", index=False)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _file(folder: Path, modality: str, sample: str) -> Path:
    """The sample's file, as the manifest names it (a new name per save generation)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["modalities"][modality][sample]["file"]


def _assert_equal(a, b):
    assert a.shape == b.shape
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert (a.X != b.X).nnz == 0
    assert set(a.layers) == set(b.layers) and set(a.obsm) == set(b.obsm)
    for k in a.obsm:
        np.testing.assert_array_equal(np.asarray(a.obsm[k]), np.asarray(b.obsm[k]))
    assert set(a.uns) == set(b.uns)


@pytest.fixture(scope="module")
def dlpfc_table(shared_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("table")
    rows = [dict(sample=s, modality="spatial-bin", batch=f"b{i}", group="DLPFC", taxa="hsa",
                 location=str(shared_data / "dlpfc" / s), donor="Br8100") for i, s in enumerate(["151673", "151674"])]
    return _table(rows, base)


@pytest.fixture(scope="module")
def dlpfc_expm(dlpfc_table, shared_data, tmp_path_factory):
    before = _hashes(shared_data / "dlpfc")
    path = tmp_path_factory.mktemp("expm") / "dlpfc"
    expm = ek.create_experiment(dlpfc_table, path)
    assert _hashes(shared_data / "dlpfc") == before, "reading modified the raw input folder"
    return expm


def test_create_dlpfc(dlpfc_expm):
    expm = dlpfc_expm
    assert expm.modalities == ["spatial-bin"]
    assert expm.spatial_bin.samples == ["151673", "151674"]
    a = expm.spatial_bin["151673"]
    assert a.shape[0] == 3639
    for col in ("sample", "batch", "group", "modality", "taxa", "barcode", "donor"):
        assert col in a.obs
    assert a.obs_names[0].startswith("151673:")
    assert "spatial" in a.obsm and "spatial.array" in a.obsm
    assert "counts" in a.layers and "gene" in a.var
    assert a.var_names[0].startswith("ENSG")
    assert "151673" in a.uns["spatial"] and "lowres" in a.uns["spatial"]["151673"]["images"]
    text = repr(expm)
    assert "spatial_bin" in text and "151673" in text and "3639 x" in text and "<arr:f64(2)>" in text


def test_print_and_view_use_manifest_only(dlpfc_expm, monkeypatch):
    expm = ek.load_experiment(dlpfc_expm.path)

    def boom(*args, **kwargs):
        raise AssertionError("a sample file was read")

    monkeypatch.setattr(store, "read_h5ad", boom)
    text = repr(expm)
    assert "151674" in text and "obs" in text
    assert "spatial" in repr(expm.spatial_bin)


def test_save_load_roundtrip_and_copy(dlpfc_expm, tmp_path):
    src = dlpfc_expm.path
    copy = tmp_path / "moved" / "dlpfc"
    shutil.copytree(src, copy)
    for folder in (src, copy):
        other = ek.load_experiment(folder)
        for s in ["151673", "151674"]:
            _assert_equal(dlpfc_expm.spatial_bin[s], other.spatial_bin[s])
    manifest = json.loads((copy / "manifest.json").read_text())
    files = [e["file"] for m in manifest["modalities"].values() for e in m.values()]
    assert all(not Path(f).is_absolute() for f in files)
    assert manifest["format_version"] == store.FORMAT_VERSION
    assert manifest["modalities"]["spatial-bin"]["151673"]["summary"]["n_obs"] == 3639


def test_save_rewrites_only_changed_sample(dlpfc_expm, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    expm = ek.load_experiment(folder)
    f73, f74 = _file(folder, "spatial-bin", "151673"), _file(folder, "spatial-bin", "151674")
    ino74 = f74.stat().st_ino
    expm.spatial_bin.run(lambda a: a.obs.__setitem__("flag", 1), "151673")
    expm.save()
    assert f74.stat().st_ino == ino74, "the untouched sample was rewritten"
    new73 = _file(folder, "spatial-bin", "151673")
    assert new73 != f73 and new73.is_file() and not f73.exists(), "the changed sample is a new file, the old one gone"
    assert "flag" in ek.load_experiment(folder).spatial_bin["151673"].obs


def test_interrupted_save_leaves_previous_state(dlpfc_expm, tmp_path, monkeypatch):
    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    before = _hashes(folder)
    expm = ek.load_experiment(folder)
    for s in expm.spatial_bin:
        expm.spatial_bin[s].obs["new"] = 2
    calls = {"n": 0}
    real = store.write_h5ad

    def dying_writer(adata, tmp):
        calls["n"] += 1
        if calls["n"] == 2:  # the second sample dies half-way through its file
            tmp.write_bytes(b"\x89HDF partial")
            raise KeyboardInterrupt
        real(adata, tmp)

    monkeypatch.setattr(store, "write_h5ad", dying_writer)
    with pytest.raises(KeyboardInterrupt):
        expm.save()
    assert _hashes(folder) == before, "an interrupted save changed the folder"
    again = ek.load_experiment(folder)
    _assert_equal(again.spatial_bin["151673"], dlpfc_expm.spatial_bin["151673"])


def test_killed_save_temporaries_are_cleaned(dlpfc_expm, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    old = folder / "spatial-bin" / ".151673.h5ad.k1ll3d.tmp"  # what a save killed by the OS leaves
    young = folder / "spatial-bin" / ".151674.h5ad.runn1ng.tmp"  # another process's save, in progress
    for f in (old, young):
        f.write_bytes(b"\x89HDF partial")
    os.utime(old, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    expm = ek.load_experiment(folder)
    assert store.leftover_temporaries(folder) == [old, young]
    expm.spatial_bin.run(lambda a: a.obs.__setitem__("flag", 1), "151673")
    expm.save()
    assert not old.exists() and young.exists()
    assert "flag" in ek.load_experiment(folder).spatial_bin["151673"].obs


def test_x_equal_to_a_layer_is_written_once(dlpfc_expm, tmp_path):
    import h5py

    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    expm = ek.load_experiment(folder)
    m = expm.spatial_bin
    counts = m["151673"].layers["counts"].copy()
    m.log_normalize(run_on_samples=["151673"])  # X becomes a copy of layers["lognorm"]
    m["151674"].X = m["151674"].X * 2  # X equal to no layer: written as it is
    expm.save()
    with h5py.File(_file(folder, "spatial-bin", "151673"), "r") as f:
        assert "X" not in f and "lognorm" in f["layers"]
    with h5py.File(_file(folder, "spatial-bin", "151674"), "r") as f:
        assert "X" in f
    assert "expkit.X_is_layer" not in m["151673"].uns and m["151673"].X is not None  # the object is unchanged
    again = ek.load_experiment(folder).spatial_bin
    a, b = again["151673"], again["151674"]
    assert "expkit.X_is_layer" not in a.uns
    assert (a.X != a.layers["lognorm"]).nnz == 0 and a.X is not a.layers["lognorm"]
    assert (a.layers["counts"] != counts).nnz == 0
    assert (b.X != 2 * b.layers["counts"]).nnz == 0


def test_run_on_samples_semantics(dlpfc_expm):
    m = dlpfc_expm.spatial_bin
    n = lambda a: a.n_obs  # noqa: E731
    assert m.run(n, True, kind="read") == {"151673": 3639, "151674": 3673}
    assert m.run(n, "151674", kind="read") == {"151674": 3673}
    assert m.run(n, ["151674"], kind="read") == {"151674": 3673}
    with pytest.raises(SampleNotFoundError, match=r"available: \['151673', '151674'\]"):
        m.run(n, ["151999"])
    with pytest.raises(SampleNotFoundError, match="151999"):
        m["151999"]
    with pytest.raises(InputError):
        m.run(n, [])


def test_method_failure_names_sample_and_keeps_finished(dlpfc_expm):
    def fails_on_second(adata):
        if adata.obs["sample"].iloc[0] == "151674":
            raise ValueError("bad thing")
        adata.uns["done"] = True
        return 1

    with pytest.raises(ExpkitError, match=r"151674.*finished samples kept: \['151673'\]"):
        dlpfc_expm.spatial_bin.run(fails_on_second, True)
    assert dlpfc_expm.spatial_bin["151673"].uns["done"]
    del dlpfc_expm.spatial_bin["151673"].uns["done"]


def test_registered_method_is_a_few_lines(dlpfc_expm, monkeypatch):
    from expkit.experiment import methods

    monkeypatch.setitem(methods.METHODS, "count_obs", ("tests.test_experiment:_count_obs", None, "read"))
    assert "count_obs" in dir(dlpfc_expm.spatial_bin)
    assert dlpfc_expm.spatial_bin.count_obs(run_on_samples=["151673"], plus=1) == {"151673": 3640}


def _count_obs(adata, *, plus=0):
    return adata.n_obs + plus


def test_merge_inner_outer_and_integrated(dlpfc_expm, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    expm = ek.load_experiment(folder)
    a, b = expm.spatial_bin["151673"], expm.spatial_bin["151674"]
    inner = set(a.var_names) & set(b.var_names)
    outer = set(a.var_names) | set(b.var_names)
    assert len(inner) < len(outer)  # the two sections' gene sets differ
    md = expm.merge(join="outer")
    assert md["spatial-bin"].n_vars == len(outer)
    md = expm.merge(join="inner")
    merged = md["spatial-bin"]
    assert merged.n_vars == len(inner) and merged.n_obs == a.n_obs + b.n_obs
    assert merged.obs_names.is_unique
    assert set(merged.uns["spatial"]) == {"151673", "151674"}
    # counts of a spot survive the merge
    spot = a.obs_names[10]
    genes = merged.var_names[:50]
    np.testing.assert_array_equal(merged[spot, genes].X.toarray(), a[spot, genes].X.toarray())
    expm.save()
    again = ek.load_experiment(folder)
    assert "spatial-bin" in repr(again) and again.spatial_bin.integrated.n_obs == merged.n_obs
    res = again.spatial_bin.run(lambda ad: ad.n_obs, None, kind="read")
    assert res == {"integrated": merged.n_obs}


def test_add_and_remove_sample(dlpfc_expm, shared_data, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    expm = ek.load_experiment(folder)
    old = _file(folder, "spatial-bin", "151674")
    expm.remove_sample("151674")
    expm.add_sample("151674b", "spatial-bin", shared_data / "dlpfc" / "151674", batch="b9", taxa="hsa")
    expm.save()
    assert not old.exists()
    again = ek.load_experiment(folder)
    assert again.spatial_bin.samples == ["151673", "151674b"]
    assert again.spatial_bin["151674b"].obs_names[0].startswith("151674b:")
    assert (shared_data / "dlpfc" / "151674").is_dir()


def test_other_datasets(shared_data, tmp_path):
    rows = [
        dict(sample="mob11", modality="spatial-bin", batch="mob", group="bulb", taxa="mmu",
             location=str(shared_data / "mob_rep11" / "Rep11_MOB_counts_spots_x_genes.tsv.gz")),
        dict(sample="NP", modality="spatial-bin", batch="p1", group="normal", taxa="hsa",
             location=str(shared_data / "giotto" / "Visium_multisample_prostate"), select="list_ID=NP"),
        dict(sample="CP", modality="spatial-bin", batch="p2", group="cancer", taxa="hsa",
             location=str(shared_data / "giotto" / "Visium_multisample_prostate"), select="list_ID=CP"),
        dict(sample="xenium", modality="spatial-cell", batch="x", group="brain", taxa="mmu",
             location=str(shared_data / "xenium_mouse_brain")),
    ]
    expm = ek.create_experiment(_table(rows, tmp_path), tmp_path / "e")
    assert expm.spatial_bin["mob11"].n_obs == 262
    assert expm.spatial_bin["NP"].n_obs == 987 and expm.spatial_bin["CP"].n_obs == 1340
    assert expm.spatial_cell["xenium"].shape == (36602, 248)
    again = ek.load_experiment(tmp_path / "e")
    for mod, s in [("spatial_bin", "mob11"), ("spatial_bin", "CP"), ("spatial_cell", "xenium")]:
        _assert_equal(getattr(expm, mod)[s], getattr(again, mod)[s])
    assert "spatial_cell" in repr(again) and "mmu" in repr(again)


# ------------------------------------------------------------------------------------------------ bad input
def _bad(rows, tmp_path, match, exc=InputError, **kw):
    out = tmp_path / "expm"
    table = rows if isinstance(rows, pd.DataFrame) else _table(rows, tmp_path)
    with pytest.raises(exc, match=match):
        ek.create_experiment(table, out, **kw)
    assert not out.exists() or not any(out.iterdir()), "a failed create left files behind"


def _row(shared_data, **kw):
    row = dict(sample="151673", modality="spatial-bin", batch="b", group="g", taxa="hsa",
               location=str(shared_data / "dlpfc" / "151673"))
    row.update(kw)
    return row


def test_bad_table(shared_data, tmp_path):
    _bad([_row(shared_data), _row(shared_data)], tmp_path, "duplicated sample name")
    _bad(pd.DataFrame([{k: v for k, v in _row(shared_data).items() if k != "taxa"}]), tmp_path,
         r"missing column\(s\) \['taxa'\]")
    _bad([_row(shared_data, modality="proteome")], tmp_path, "unknown modality")
    _bad([_row(shared_data, taxa="dre")], tmp_path, "unknown taxa")
    _bad([_row(shared_data, location=str(tmp_path / "nothing"))], tmp_path, "does not exist")
    _bad([_row(shared_data, location="../../escape")], tmp_path, "escapes", allow_outside=False)
    with pytest.raises(InputError, match="does not exist"):
        ek.create_experiment(tmp_path / "no_table.tsv", tmp_path / "x")


def _visium_copy(shared_data, tmp_path) -> Path:
    dst = tmp_path / "raw151673"
    shutil.copytree(shared_data / "dlpfc" / "151673", dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def test_bad_raw_inputs(shared_data, tmp_path):
    raw = _visium_copy(shared_data, tmp_path)
    h5 = raw / "filtered_feature_bc_matrix_top5000genes.h5"
    h5.write_bytes(h5.read_bytes()[:5000])  # truncated HDF5
    _bad([_row(shared_data, location=str(raw))], tmp_path, "151673")

    raw2 = tmp_path / "r2"
    raw2.mkdir()
    raw2 = _visium_copy(shared_data, raw2)
    pos = raw2 / "spatial" / "tissue_positions_list.csv"
    lines = pos.read_text().splitlines()
    in_tissue = [l for l in lines if l.split(",")[1] == "1"]
    pos.write_text("\n".join(l for l in lines if l != in_tissue[0]) + "\n")  # a matrix barcode lost
    _bad([_row(shared_data, location=str(raw2))], tmp_path, in_tissue[0].split(",")[0])

    raw3 = tmp_path / "r3"
    raw3.mkdir()
    raw3 = _visium_copy(shared_data, raw3)
    pos = raw3 / "spatial" / "tissue_positions_list.csv"
    lines = pos.read_text().splitlines()
    idx = next(i for i, l in enumerate(lines) if l.split(",")[1] == "1")
    parts = lines[idx].split(",")
    parts[4] = "nan"
    lines[idx] = ",".join(parts)
    pos.write_text("\n".join(lines) + "\n")
    _bad([_row(shared_data, location=str(raw3))], tmp_path, "NaN|nan|finite")


def test_bad_folders(dlpfc_expm, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = store.FORMAT_VERSION + 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="upgrade expkit"):
        ek.load_experiment(folder)
    with pytest.raises(FormatError, match="manifest.json is missing"):
        ek.load_experiment(tmp_path)
    folder2 = tmp_path / "e2"
    shutil.copytree(dlpfc_expm.path, folder2)
    _file(folder2, "spatial-bin", "151674").write_bytes(b"not hdf5")
    expm = ek.load_experiment(folder2)
    with pytest.raises(FormatError, match="151674"):
        expm.spatial_bin["151674"]


def test_older_format_is_migrated(dlpfc_expm, tmp_path, monkeypatch):
    folder = tmp_path / "e"
    shutil.copytree(dlpfc_expm.path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="no migration"):
        ek.load_experiment(folder)
    monkeypatch.setitem(store.MIGRATIONS, 0, lambda m: {**m, "format_version": 1})
    assert ek.load_experiment(folder).spatial_bin.samples == ["151673", "151674"]


def test_import_is_light():
    code = "import sys, expkit; expkit.settings; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["False", "False"]


def test_settings_validation():
    with pytest.raises(InputError):
        ek.settings.device = "tpu"
    with pytest.raises(InputError):
        ek.settings.verbosity = "loud"


def test_images_stored_and_plotted_through_modality(dlpfc_expm):
    expm = ek.load_experiment(dlpfc_expm.path)
    manifest = json.loads((expm.path / "manifest.json").read_text())
    rel = manifest["modalities"]["spatial-bin"]["151673"]["images"]
    assert rel == "images/spatial-bin/151673.h5" and (expm.path / rel).is_file()
    store_ = expm.spatial_bin.image_store("151673")
    assert "lowres/r" in store_.channels()
    win = expm.spatial_bin.get_image(run_on_samples="151673", channels="lowres/r,g,b",
                                     xrange=(3000, 6000), yrange=(3000, 6000))["151673"]
    img = expm.spatial_bin["151673"].uns["spatial"]["151673"]["images"]["lowres"]
    assert win.array.shape[2] == 3 and win.array.shape[0] < img.shape[0] / 2
    import matplotlib

    matplotlib.use("Agg")
    fig = expm.spatial_bin.plot_spatial(run_on_samples=["151673", "151674"], channels="lowres/r,g,b",
                                        plot_embeddings={"basis": "spatial", "color": "sample"})
    assert len(fig.axes) >= 2


def test_reader_options_from_table_and_units(tmp_path):
    fixtures = Path(__file__).parent / "data" / "platforms"
    rows = [dict(sample="hd16", modality="spatial-bin", batch="a", group="g", taxa="hsa",
                 location=str(fixtures / "visium_hd"), **{"reader.bin_size": "16"}),
            dict(sample="hd8", modality="spatial-bin", batch="a", group="g", taxa="hsa",
                 location=str(fixtures / "visium_hd"), **{"reader.bin_size": "8"}),
            dict(sample="cosmx", modality="spatial-cell", batch="b", group="g", taxa="mmu",
                 location=str(fixtures / "cosmx"), **{"reader.pixel_size_um": "0.12028"}),
            dict(sample="merscope", modality="spatial-cell", batch="c", group="g", taxa="mmu",
                 location=str(fixtures / "merscope"))]
    expm = ek.create_experiment(_table(rows, tmp_path), tmp_path / "e")
    hd16, hd8 = expm.spatial_bin["hd16"], expm.spatial_bin["hd8"]
    assert hd16.uns["spatial"]["hd16"]["scalefactors"]["bin_size_um"] == 16
    assert hd8.n_obs > hd16.n_obs
    assert "reader.bin_size" not in hd16.obs
    assert expm.spatial_cell["cosmx"].uns["spatial.unit"] == "um"
    md = expm.merge()
    assert md["spatial-cell"].uns["spatial.unit"] == {"cosmx": "um", "merscope": "um"}
