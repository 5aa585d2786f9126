"""SpaGCN spatial domains: wall time, peak memory and ARI of expkit.spatial.spatial_detect_domains_spagcn,
with SpaGCN 1.2.7's figures (../shared/reference/README.md, same CPU class) beside them.

    EXPKIT_SHARED_DATA=/work/shared/data OMP_NUM_THREADS=1 python benchmarks/domains.py [--seeds 0 1 2 3 4]
        [--sections 151673 151674] [--no-xenium] [--no-integrate] [--threads 1] [--gpu] [--out FILE]

Each case runs in a fresh process (after a small warm-up run, so imports and first-call costs are not
counted); time = the whole method (lengthscale search, PCA, graph convolution, initial clustering with
the resolution search, DEC training, refinement) from the log-normalised layer (SpaGCN protocol: genes in
>= 3 spots, no MT-/ERCC genes, median-scaled log1p; tests/test_domains.py:spagcn_protocol); peak
memory = the rise of the process high-water mark (VmHWM, reset after the data are loaded).
ARI: sklearn adjusted_rand_score against the manual layers (labelled spots), raw and refined labels.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# SpaGCN 1.2.7 (reference README): seed -> (ARI raw, ARI refined, method seconds)
SPAGCN = {
    "151673": {100: (0.468, 0.497, 14.5), 0: (0.525, 0.548, 24.0), 1: (0.521, 0.548, 21.4), 2: (0.436, 0.456, 16.7)},
    "151674": {100: (0.416, 0.436, 16.5)},
}


def _shared() -> Path:
    return Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _case(kind: str, arg, seed: int, threads: int, gpu: bool, q):
    import torch

    torch.set_num_threads(threads)
    import numpy as np
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    from expkit import settings
    from expkit.spatial import integrate_domains_spagcn, spatial_detect_domains_spagcn

    settings.verbosity = "warning"
    shared = _shared()

    def read_dlpfc(sid):
        from expkit.io import read_visium

        from test_domains import spagcn_protocol  # the reference's gene filter + log-normalisation

        ad = spagcn_protocol(read_visium(shared / "dlpfc" / sid, sample=sid))
        t = pd.read_csv(shared / "dlpfc" / sid / f"{sid}_truth.txt", sep="\t", header=None, index_col=0)[1]
        return ad, t.reindex(ad.obs["barcode"].to_numpy()).to_numpy()

    def ari(truth, lab):
        ok = pd.notna(truth)
        return float(adjusted_rand_score(truth[ok], np.asarray(lab)[ok]))

    out = {"kind": kind, "case": arg, "seed": seed}
    if kind == "section":
        ad, truth = read_dlpfc(arg)
        spatial_detect_domains_spagcn(ad[:400].copy(), seed=seed, max_epochs=5, use_gpu=gpu)  # warm-up
        _reset_hwm()
        base = _status("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        res = spatial_detect_domains_spagcn(ad, seed=seed, use_gpu=gpu)
        out.update(time=time.perf_counter() - t0, cpu=time.process_time() - c0, steps=res["steps"], peak_mb=_status("VmHWM") - base, l=res["l"], res=res["res"],
                   epochs=res["epochs"], ari_raw=ari(truth, ad.obs["spagcn.domain"]),
                   ari_refined=ari(truth, ad.obs["spagcn.refined"]))
    elif kind == "integrate":
        data, truths = {}, {}
        for sid in arg:
            data[sid], truths[sid] = read_dlpfc(sid)
        _reset_hwm()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        res = integrate_domains_spagcn(data, seed=seed, use_gpu=gpu)
        out.update(time=time.perf_counter() - t0, peak_mb=_status("VmHWM") - base,
                   ari_refined={s: ari(truths[s], data[s].obs["integrated.refined"]) for s in arg},
                   ari_raw={s: ari(truths[s], data[s].obs["integrated"]) for s in arg})
    else:  # xenium
        from expkit.io import read_xenium

        ad = read_xenium(shared / "xenium_mouse_brain", sample="xenium")
        spatial_detect_domains_spagcn(ad[:400].copy(), seed=seed, max_epochs=5, refine_shape=None, n_pcs=20,
                                      use_gpu=gpu)
        _reset_hwm()
        base = _status("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        res = spatial_detect_domains_spagcn(ad, seed=seed, n_clusters=12, refine_shape=None, use_gpu=gpu)
        out.update(time=time.perf_counter() - t0, cpu=time.process_time() - c0, steps=res["steps"], peak_mb=_status("VmHWM") - base, n_cells=ad.n_obs,
                   l=res["l"], res=res["res"], epochs=res["epochs"], n_edges=res["n_edges"],
                   n_domains=res["n_domains"])
    q.put(out)


def run_case(*args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sections", nargs="+", default=["151673", "151674"])
    ap.add_argument("--no-xenium", action="store_true")
    ap.add_argument("--no-integrate", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    print(f"{'case':<22}{'seed':>5}{'time s':>9}{'cpu s':>7}{'peak MiB':>10}{'l':>8}{'res':>7}{'ep':>5}"
          f"{'ARI raw':>9}{'ARI ref':>9}   SpaGCN 1.2.7 (raw / refined / s)")
    for sid in a.sections:
        for seed in a.seeds:
            r = run_case("section", sid, seed, a.threads, a.gpu)
            rows.append(r)
            ref = SPAGCN.get(sid, {}).get(seed)
            refs = f"{ref[0]:.3f} / {ref[1]:.3f} / {ref[2]:.1f}" if ref else "-"
            print(f"{sid:<22}{seed:>5}{r['time']:>9.2f}{r['cpu']:>7.2f}{r['peak_mb']:>10.1f}{r['l']:>8.2f}{r['res']:>7.3f}"
                  f"{r['epochs']:>5}{r['ari_raw']:>9.3f}{r['ari_refined']:>9.3f}   {refs}   steps {r['steps']}", flush=True)
        import numpy as np

        mine = [r["ari_refined"] for r in rows if r["kind"] == "section" and r["case"] == sid
                and r["seed"] in range(5)]
        refs = [v[1] for v in SPAGCN.get(sid, {}).values()]
        print(f"{sid} median refined ARI over seeds 0-4: {np.median(mine) if mine else float('nan'):.3f} "
              f"(SpaGCN median over its seeds {sorted(SPAGCN.get(sid, {}))}: "
              f"{np.median(refs) if refs else float('nan'):.3f})", flush=True)
    if not a.no_integrate:
        r = run_case("integrate", list(a.sections), 100, a.threads, a.gpu)
        rows.append(r)
        print(f"integrate {'+'.join(a.sections)} seed 100: {r['time']:.2f} s, peak {r['peak_mb']:.1f} MiB, "
              f"ARI refined {json.dumps({k: round(v, 3) for k, v in r['ari_refined'].items()})}, "
              f"raw {json.dumps({k: round(v, 3) for k, v in r['ari_raw'].items()})}", flush=True)
    if not a.no_xenium:
        r = run_case("xenium", "xenium_mouse_brain", 0, a.threads, a.gpu)
        rows.append(r)
        print(f"xenium_mouse_brain ({r['n_cells']} cells, 12 domains, no refinement): {r['time']:.2f} s "
              f"(cpu {r['cpu']:.2f} s, steps {r['steps']}), "
              f"peak {r['peak_mb']:.1f} MiB, l = {r['l']:.3f}, res = {r['res']}, epochs {r['epochs']}, "
              f"{r['n_edges']} graph edges", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
