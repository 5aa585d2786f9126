"""Many samples: provenance log, resume, bounded memory, executors (process pool, Dask LocalCluster), a save
killed by SIGKILL at random points, and two writers on one folder. Real data: the demo DLPFC sections shipped
with expkit (two cropped Visium sections, ~1,200 spots each), split into spatial blocks for more samples."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import expkit as ek
from expkit.experiment import saving, store


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An experiment of 4 samples: each demo section cut in two halves along array_row."""
    src = ek.create_experiment(ek.datasets.dlpfc_demo(), tmp_path_factory.mktemp("src") / "demo")
    out = ek.Experiment(tmp_path_factory.mktemp("many") / "expm", pd.DataFrame(
        columns=["sample", "modality", "batch", "group", "taxa", "location"]))
    for s in ("151673", "151674"):
        a = src.spatial_bin[s]
        rows = a.obsm["spatial.array"][:, 0] if "spatial.array" in a.obsm else a.obsm["spatial"][:, 1]
        cut = np.median(rows)
        for half, mask in (("a", rows <= cut), ("b", rows > cut)):
            part = a[mask].copy()
            part.uns["spatial"] = {f"{s}{half}": part.uns["spatial"][s]}
            out.add_sample(f"{s}{half}", "spatial-bin", adata=part, batch=s, group="top" if half == "a" else "bottom",
                           taxa="hsa")
    out.save()
    return out.path


@pytest.fixture
def folder(base, tmp_path):
    dst = tmp_path / "expm"
    shutil.copytree(base, dst)
    return dst


def _state(folder: Path) -> dict:
    e = ek.load_experiment(folder)
    return {s: (e.spatial_bin[s].obs["v"].iloc[0] if "v" in e.spatial_bin[s].obs else None)
            for s in e.spatial_bin.samples}


def test_history_records_every_call_and_is_saved(folder):
    e = ek.load_experiment(folder)
    m = e.spatial_bin
    m.qc(run_on_samples=True)
    m.log_normalize(run_on_samples=["151673a"], target_sum=1e4)
    with pytest.raises(Exception):
        m.select_hvg(run_on_samples=["151673a"], n_top_genes=-5)
    h = e.history()
    assert list(h["method"]) == ["qc", "log_normalize", "select_hvg"] and not h["saved"].any()
    assert h["status"].iloc[:2].eq("ok").all() and h["status"].iloc[2].startswith("failed")
    first = e.history(raw=True)[0]
    assert first["samples"] == m.samples and first["resolved"]["layer"] == "counts"
    assert "obs:qc.n_counts" in first["keys"]["151673a"] and first["versions"]["expkit"] == ek.__version__
    assert e.history(raw=True)[1]["params"] == {"target_sum": 1e4}
    e.save()
    again = ek.load_experiment(folder)
    h2 = again.history()
    assert len(h2) == 3 and h2["saved"].all() and (h2["generation"] == h2["generation"].iloc[0]).all()
    lines = (folder / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["method"] == "qc"


def test_resume_skips_samples_done_with_the_same_parameters(folder):
    e = ek.load_experiment(folder)
    m = e.spatial_bin
    m.qc(run_on_samples=["151673a", "151673b"])
    e.save()
    e = ek.load_experiment(folder)
    m = e.spatial_bin
    out = m.qc(run_on_samples=True, resume=True)
    assert sorted(out) == ["151674a", "151674b"]  # the two done before are skipped, unread
    assert ("spatial-bin", "151673a") not in e._adatas
    assert m.qc(run_on_samples=True, resume=True) == {}
    other = m.qc(run_on_samples=["151673a"], resume=True, key_added="qc2")  # other parameters: runs
    assert list(other) == ["151673a"]


def test_bounded_memory_unloads_clean_samples(folder, monkeypatch):
    monkeypatch.setattr(ek.settings, "max_loaded", 1)
    e = ek.load_experiment(folder)
    e.spatial_bin.get_image(run_on_samples=True, channels="lowres/r")  # read only: nothing changed
    assert len([k for k in e._adatas if k[0] == "spatial-bin"]) <= 1
    monkeypatch.setattr(ek.settings, "autosave", True)
    e.spatial_bin.qc(run_on_samples=True)
    assert len([k for k in e._adatas if k[0] == "spatial-bin"]) <= 2
    again = ek.load_experiment(folder)
    assert all("qc.n_counts" in again._manifest["modalities"]["spatial-bin"][s]["summary"]["obs"]
               for s in ("151673a", "151673b", "151674a"))


def _results(e, samples):
    return {s: (e.spatial_bin[s].obs.copy(), {k: e.spatial_bin[s].uns[k] for k in ("qc",)},
                e.spatial_bin[s].layers["lognorm"].copy()) for s in samples}


def _assert_same(a, b):
    for s in a:
        pd.testing.assert_frame_equal(a[s][0], b[s][0])
        assert (a[s][2] != b[s][2]).nnz == 0
        assert json.dumps(a[s][1], default=str, sort_keys=True) == json.dumps(b[s][1], default=str, sort_keys=True)


@pytest.mark.parametrize("kind", ["process", "dask"])
def test_executor_gives_the_serial_results(folder, tmp_path, kind):
    if kind == "dask":
        pytest.importorskip("dask.distributed", reason="pip install expkit[dask]")
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    serial = ek.load_experiment(folder)
    serial.spatial_bin.qc(run_on_samples=True)
    serial.spatial_bin.log_normalize(run_on_samples=True)
    samples = serial.spatial_bin.samples
    e = ek.load_experiment(other)
    with ek.executor(kind, n_workers=2):
        e.spatial_bin.qc(run_on_samples=True)
        e.save()  # the next method's workers read the saved files
        e.spatial_bin.log_normalize(run_on_samples=True)
    _assert_same(_results(serial, samples), _results(e, samples))
    assert e.history()["executor"].eq(kind).all()
    e.save()
    _assert_same(_results(serial, samples), _results(ek.load_experiment(other), samples))


def _save_and_exit(e) -> None:  # in a forked child: save what the parent changed, exit without clean-up
    e.save()
    os._exit(0)


def _changed(folder: Path, value: int):
    e = ek.load_experiment(folder)
    for s in e.spatial_bin.samples:
        e.spatial_bin[s].obs["v"] = value
    return e


def _small(a):
    small = a[:300, :400].copy()
    for entry in small.uns.get("spatial", {}).values():
        entry["images"] = {}
    return small


def test_save_killed_at_random_points_leaves_before_or_after(folder):
    ek.settings.progress = False
    ctx = mp.get_context("fork")
    e = ek.load_experiment(folder)
    e.spatial_bin.run(_small, True, kind="replace")  # small samples: 20 trials in seconds
    e.save()
    e = _changed(folder, 0)
    t = time.perf_counter()
    p = ctx.Process(target=_save_and_exit, args=(e,))
    p.start()
    p.join()
    span = time.perf_counter() - t  # a whole save, in a child
    rng = np.random.default_rng(0)
    outcomes = []
    for trial in range(1, 21):
        before = _state(folder)
        e = _changed(folder, trial)
        p = ctx.Process(target=_save_and_exit, args=(e,))
        p.start()
        t = time.perf_counter()
        time.sleep(float(rng.uniform(0.1, 1.3)) * span)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        if p.exitcode == 0:  # it finished first: kill sooner next time
            span = min(span, time.perf_counter() - t)
        after = _state(folder)  # loads, and every sample reads
        assert after == before or after == {s: trial for s in before}, (trial, before, after)
        outcomes.append(after != before)
    assert 0 < sum(outcomes) < 20, outcomes  # some kills landed before the commit, some after
    e = ek.load_experiment(folder)  # the folder works on: a save cleans what the killed ones left
    e.spatial_bin["151673a"].obs["w"] = 1
    e.save()
    names = {p.name for p in (folder / "spatial-bin").iterdir()}
    assert len([n for n in names if n.endswith(".h5ad")]) == 4, names


def test_two_writers_the_second_is_refused(folder):
    first, second = ek.load_experiment(folder), ek.load_experiment(folder)
    first.spatial_bin["151673a"].obs["v"] = 1
    second.spatial_bin["151674a"].obs["v"] = 2
    first.save()
    with pytest.raises(saving.ConcurrentWriteError, match="saved by another writer"):
        second.save()
    assert _state(folder)["151673a"] == 1 and _state(folder)["151674a"] is None
    # a live lock (another process saving) refuses; a lock of a dead process is taken over
    child = mp.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        info = {**saving._owner(), "pid": child.pid}
        (folder / saving.LOCK).write_text(json.dumps(info))
        again = ek.load_experiment(folder)
        again.spatial_bin["151673b"].obs["v"] = 3
        with pytest.raises(saving.ConcurrentWriteError, match=f"pid {child.pid}"):
            again.save()
    finally:
        child.kill()
        child.join()
    again.save()  # the owner is gone: stale, taken over
    assert _state(folder)["151673b"] == 3 and not (folder / saving.LOCK).exists()


def test_manifest_holds_the_table_and_old_folders_still_load(folder):
    manifest = json.loads((folder / store.MANIFEST).read_text())
    assert manifest["format_version"] == store.FORMAT_VERSION and len(manifest["table"]) == 4
    (folder / store.TABLE).write_text("garbage")  # the readable copy is not what is read
    assert ek.load_experiment(folder).spatial_bin.samples == ["151673a", "151673b", "151674a", "151674b"]
