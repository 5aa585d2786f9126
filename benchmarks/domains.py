"""Spatial domains (SpaGCN, DeepST): wall time, peak memory and ARI of expkit.spatial's domain methods,
with SpaGCN 1.2.7's figures (../shared/reference/README.md, same CPU class) beside them.

    EXPKIT_SHARED_DATA=/work/shared/data OMP_NUM_THREADS=1 python benchmarks/domains.py [--seeds 0 1 2 3 4]
        [--sections 151673 151674] [--no-xenium] [--no-integrate] [--threads 1] [--gpu] [--out FILE]
        [--method spagcn|deepst]

DeepST (``--method deepst``): per section without and with the image features (200 + 200 epochs, 7 domains,
hexagon refinement, raw counts), the joint model of both sections per seed, and the Xenium brain
(36,602 cells, 12 domains, no refinement) for time and memory; the same time / peak / ARI columns.

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


def _read_dlpfc(sid: str):
    """A DLPFC section as read from its Space Ranger folder, and its manual layers in obs order."""
    import pandas as pd

    from expkit.io import read_visium

    folder = _shared() / "dlpfc" / sid
    ad = read_visium(folder, sample=sid)
    t = pd.read_csv(folder / f"{sid}_truth.txt", sep="\t", header=None, index_col=0)[1]
    return ad, t.reindex(ad.obs["barcode"].to_numpy()).to_numpy()


def _ari(truth, lab) -> float:
    import numpy as np
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    ok = pd.notna(truth)
    return float(adjusted_rand_score(truth[ok], np.asarray(lab)[ok]))


def _case(kind: str, arg, seed: int, threads: int, gpu: bool, q):
    import torch

    torch.set_num_threads(threads)
    from expkit import settings
    from expkit.spatial import integrate_domains_spagcn, spatial_detect_domains_spagcn

    settings.verbosity = "warning"
    shared = _shared()

    def read_dlpfc(sid):
        from test_domains import spagcn_protocol  # the reference's gene filter + log-normalisation

        ad, truth = _read_dlpfc(sid)
        return spagcn_protocol(ad), truth

    ari = _ari
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


def _deepst_case(kind: str, arg, seed: int, threads: int, gpu: bool, q):
    import torch

    torch.set_num_threads(threads)
    from expkit import settings
    from expkit.io import read_xenium
    from expkit.spatial import integrate_domains_deepst, spatial_detect_domains_deepst

    settings.verbosity, settings.progress = "warning", False
    shared = _shared()
    read, ari = _read_dlpfc, _ari
    out = {"kind": kind, "case": arg, "seed": seed}
    if kind == "xenium":
        ad = read_xenium(shared / "xenium_mouse_brain", sample="xenium")
        kw = dict(n_domains=12, refine_shape=None, use_gpu=gpu)
    elif kind == "integrate":
        data = {s: read(s) for s in arg}
        kw = dict(n_domains=7, use_gpu=gpu)
    else:
        ad, truth = read(arg)
        kw = dict(n_domains=7, use_image=kind == "image", image_key="lowres", use_gpu=gpu)
    warm = (ad if kind != "integrate" else data[arg[0]][0])[:300].copy()
    spatial_detect_domains_deepst(warm, n_domains=3, pre_epochs=5, epochs=5, refine_shape=None, use_gpu=gpu)
    _reset_hwm()
    base = _status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "integrate":
        integrate_domains_deepst({s: d[0] for s, d in data.items()}, seed=seed, **kw)
        out.update(ari_refined={s: ari(d[1], d[0].obs["deepst.integrated.refined"]) for s, d in data.items()},
                   ari_raw={s: ari(d[1], d[0].obs["deepst.integrated"]) for s, d in data.items()})
    else:
        res = spatial_detect_domains_deepst(ad, seed=seed, **kw)
        out.update(steps=res["steps"], res=res["res"], n_cells=ad.n_obs)
        if kind != "xenium":
            out.update(ari_raw=ari(truth, ad.obs["deepst.domain"]), ari_refined=ari(truth, ad.obs["deepst.refined"]))
    out.update(time=time.perf_counter() - t0, cpu=time.process_time() - c0, peak_mb=_status("VmHWM") - base)
    q.put(out)


def _deepst_main(a) -> list:
    import numpy as np

    rows = []
    print(f"{'DeepST case':<26}{'seed':>5}{'time s':>9}{'cpu s':>8}{'peak MiB':>10}{'ARI raw':>9}{'ARI ref':>9}")
    for kind in ("section", "image"):
        for sid in a.sections:
            got = []
            for seed in a.seeds:
                r = run_case("deepst", kind, sid, seed, a.threads, a.gpu)
                rows.append(r)
                got.append(r["ari_refined"])
                print(f"{sid + (' + image' if kind == 'image' else ''):<26}{seed:>5}{r['time']:>9.2f}{r['cpu']:>8.2f}"
                      f"{r['peak_mb']:>10.1f}{r['ari_raw']:>9.3f}{r['ari_refined']:>9.3f}   steps {r['steps']}",
                      flush=True)
            print(f"{sid}{' + image' if kind == 'image' else ''}: median refined ARI over seeds {a.seeds}: "
                  f"{np.median(got):.3f}", flush=True)
    if not a.no_integrate:
        got = {s: [] for s in a.sections}
        for seed in a.seeds:
            r = run_case("deepst", "integrate", list(a.sections), seed, a.threads, a.gpu)
            rows.append(r)
            for s in a.sections:
                got[s].append(r["ari_refined"][s])
            print(f"{'joint ' + '+'.join(a.sections):<26}{seed:>5}{r['time']:>9.2f}{r['cpu']:>8.2f}{r['peak_mb']:>10.1f}"
                  f"   refined {json.dumps({k: round(v, 3) for k, v in r['ari_refined'].items()})}", flush=True)
        print("joint: median refined ARI " + ", ".join(f"{s} {np.median(v):.3f}" for s, v in got.items()), flush=True)
    if not a.no_xenium:
        r = run_case("deepst", "xenium", "xenium_mouse_brain", 0, a.threads, a.gpu)
        rows.append(r)
        print(f"xenium_mouse_brain ({r['n_cells']} cells, 12 domains, no refinement): {r['time']:.2f} s "
              f"(cpu {r['cpu']:.2f} s), peak {r['peak_mb']:.1f} MiB, steps {r['steps']}", flush=True)
    return rows


def run_case(*args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    target = _case
    if args[0] == "deepst":
        target, args = _deepst_case, args[1:]
    p = ctx.Process(target=target, args=(*args, q))
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
    ap.add_argument("--method", choices=("spagcn", "deepst"), default="spagcn")
    a = ap.parse_args()
    if a.method == "deepst":
        rows = _deepst_main(a)
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1))
        return
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
