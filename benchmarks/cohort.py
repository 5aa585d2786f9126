"""A cohort of many samples: build it, run per-sample methods serially and on 2 Dask workers, measure memory.

The samples are resampled from the real Xenium mouse brain section (36,602 cells x 248 genes): sample k takes
``--cells`` cells drawn with a seeded RNG (without replacement), keeping their real counts and centroids. Built
and saved in batches (the builder never holds more than one batch), so building is bounded too.

Runs (each in a fresh process, so peak RSS is the run's own): for each cohort size, ``qc`` + ``log_normalize`` +
``spatial_neighbors`` over every sample with ``settings.max_loaded = 4`` and ``autosave``, serial, and with
``ek.executor("dask", n_workers=2)``; prints wall time, the driver's peak RSS, each worker's peak RSS and the
folder size. Usage: ``python benchmarks/cohort.py --sizes 10 100 --cells 10000``.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import ROOT, SHARED  # noqa: E402


def build(folder: Path, n: int, cells: int, batch: int = 10) -> None:
    import pandas as pd

    import expkit as ek
    from expkit.io import read_xenium

    ek.settings.progress = False
    full = read_xenium(SHARED / "xenium_mouse_brain", sample="xenium")
    e = ek.Experiment(folder, pd.DataFrame(columns=["sample", "modality", "batch", "group", "taxa", "location"]))
    rng = np.random.default_rng(0)
    for k in range(n):
        idx = np.sort(rng.choice(full.n_obs, size=min(cells, full.n_obs), replace=False))
        part = full[idx].copy()
        name = f"s{k:03d}"
        part.uns["spatial"] = {name: part.uns["spatial"]["xenium"]} if "xenium" in part.uns.get("spatial", {}) else {}
        e.add_sample(name, "spatial-cell", adata=part, batch=f"b{k % 4}", group="A" if k % 2 else "B", taxa="mmu")
        if (k + 1) % batch == 0 or k == n - 1:
            e.save()
            e.unload()


def run(folder: Path, mode: str) -> dict:
    import expkit as ek

    ek.settings.progress = False
    ek.settings.max_loaded, ek.settings.autosave = 4, True
    e = ek.load_experiment(folder)
    c = e.spatial_cell
    t0 = time.perf_counter()
    workers = {}
    if mode == "serial":
        c.qc(run_on_samples=True)
        c.log_normalize(run_on_samples=True)
        c.spatial_neighbors(run_on_samples=True, coord_type="generic", n_neighs=6)
        e.save()
    else:
        with ek.executor("dask", n_workers=2) as pool:
            for method, kw in (("qc", {}), ("log_normalize", {}), ("spatial_neighbors", {"coord_type": "generic", "n_neighs": 6})):
                getattr(c, method)(run_on_samples=True, **kw)
                e.save()
            workers = pool._pool.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    return {"mode": mode, "wall_s": round(wall, 1), "driver_peak_mib": round(resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024), "worker_peak_mib": [round(v) for v in workers.values()],
        "folder_mib": round(size, 1), "samples": len(c.samples)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--cells", type=int, default=10000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cohort_bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cohort.md")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:  # one measured run in its own process
        print(json.dumps(run(Path(args._child[0]), args._child[1])))
        return
    rows = []
    for n in args.sizes:
        base = args.work / f"cohort{n}"
        shutil.rmtree(base, ignore_errors=True)
        t = time.perf_counter()
        build(base, n, args.cells)
        built = time.perf_counter() - t
        for mode in ("serial", "dask"):
            folder = args.work / f"cohort{n}_{mode}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder)
            out = subprocess.run([sys.executable, __file__, "--_child", str(folder), mode], capture_output=True,
                                 text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["build_s"] = round(built, 1)
            rows.append(row)
            print(row, flush=True)
    lines = ["# A cohort of many samples (benchmarks/cohort.py)", "",
             f"Samples of {args.cells:,} cells resampled from the real Xenium mouse brain section; qc + log_normalize "
             "+ spatial_neighbors (kNN 6) on every sample, settings.max_loaded = 4 with autosave; 2-core CPU.", "",
             "| samples | mode | wall s | driver peak MiB | worker peak MiB | folder MiB | build s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['samples']} | {r['mode']} | {r['wall_s']} | {r['driver_peak_mib']} | "
              f"{', '.join(map(str, r['worker_peak_mib'])) or '-'} | {r['folder_mib']} | {r['build_s']} |" for r in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
