"""Annotation, gene-set scores and marker selection: expkit against CellTypist, EnrichMap and ScMags.

    python benchmarks/annotation.py [--out benchmarks/results/annotation.md] [--peer-python /work/ctvenv/bin/python]
                                    [--save-peers FILE | --reuse-peers FILE]

The expkit half runs in the project venv; the peers run in a side venv (``--peer-python``; this same file is
run there with ``--peer DIR``), on the same files written to a temporary folder: labelled cells split into
train / held-out test (stratified, seed 0) for annotation; one STARmap section for gene-set scores and
markers. Figures: macro-F1 on the held-out cells, wall time and peak memory (benchmarks/_util.measure), the
Pearson correlation of gene-set scores, the overlap of selected markers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks._util import SHARED, measure  # noqa: E402

DATA = HERE.parent / "tests" / "data" / "annotation"
SETS = {"L2/3": ["Cux2", "Otof", "Lamp5", "Rasgrf2"], "L4": ["Rorb", "Rspo1", "Whrn", "Zmat4"],
        "L5": ["Fezf2", "Parm1", "Rab3c", "Bcl11b"], "L6": ["Foxp2", "Syt6", "Crym", "Pcp4", "Tle4"],
        "Oligo": ["Mbp", "Plp1", "Mobp", "Mog"], "Astro": ["Gja1", "Aqp4", "Aldh1l1", "Slc1a3", "Mfge8"],
        "Endo": ["Cldn5", "Itm2a", "Bsg", "Flt1"]}


# ----------------------------------------------------------------------------------------------- data
def _split(obs_labels, frac=0.3, seed=0):
    rng = np.random.default_rng(seed)
    test = np.zeros(len(obs_labels), dtype=bool)
    for lab in np.unique(obs_labels):  # a handful of labels
        idx = np.flatnonzero(obs_labels == lab)
        test[rng.choice(idx, size=max(1, int(round(frac * idx.size))), replace=False)] = True
    return test


def _datasets():
    import anndata as ad

    out = {}
    for name, file in (("hypothalamus scRNA (Moffitt 2018)", "hypothalamus_ref.h5ad"),
                       ("cerebellum snRNA (RCTD vignette)", "cerebellum_ref.h5ad"),
                       ("STARmap V1 cells (Wang 2018)", "starmap_v1.h5ad")):
        a = ad.read_h5ad(DATA / file)
        a.var_names_make_unique()
        lab = a.obs["cell_type"].astype(str).to_numpy()
        test = _split(lab)
        out[name] = (a[~test].copy(), a[test].copy())
    dl = SHARED / "dlpfc"
    if (dl / "151673").is_dir():
        import pandas as pd

        from expkit.io import read_visium

        pair = []
        for sid in ("151673", "151674"):
            a = read_visium(dl / sid, sample=sid)
            truth = pd.read_csv(dl / sid / f"{sid}_truth.txt", sep="\t", header=None, index_col=0)[1]
            a.obs["cell_type"] = truth.reindex(a.obs["barcode"].to_numpy()).to_numpy()
            a = a[a.obs["cell_type"].notna().to_numpy()].copy()
            a = ad.AnnData(a.layers["counts"] if "counts" in a.layers else a.X, obs=a.obs[["cell_type"]].copy(),
                           var=pd.DataFrame(index=a.var["gene_symbols"].astype(str).to_numpy()))
            a.var_names_make_unique()
            pair.append(a)
        out["DLPFC layers 151673 -> 151674 (spots)"] = tuple(pair)
    return out


# ----------------------------------------------------------------------------------------------- expkit
def _ours_annotation(datasets, folder: Path, results: list) -> dict:
    from sklearn.metrics import f1_score

    from expkit.tl.annotate import annotate

    rows = {}
    for name, (train, test) in datasets.items():
        q = test.copy()
        with measure(f"expkit annotate: {name}", results) as info:
            annotate(q, reference=train, label_key="cell_type", seed=0)
        f1 = f1_score(test.obs["cell_type"].astype(str), q.obs["celltype"].astype(str), average="macro")
        info["macroF1"] = round(f1, 4)
        rows[name] = {"f1": f1, "time": results[-1][1], "mem": results[-1][2], "n_train": train.n_obs,
                      "n_test": test.n_obs, "n_genes": train.n_vars,
                      "n_classes": int(train.obs["cell_type"].nunique())}
    return rows


def _starmap():
    import anndata as ad

    from expkit.kernels.stats import normalize_total

    a = ad.read_h5ad(DATA / "starmap_v1.h5ad")
    a.layers["counts"] = a.X.copy()
    a.X = normalize_total(a.X, 1e4)[1]
    return a


def _ours_scores(folder: Path, results: list) -> dict:
    from expkit.spatial.genesets import score_genesets

    a = _starmap()
    out = {}
    for label, kw in (("smooth, no correction", dict(covariates=None)),
                      ("smooth + spatial GAM (EnrichMap default)", dict(covariates=["spatial"]))):
        b = a.copy()
        with measure(f"expkit score_genesets: {label}", results):
            score_genesets(b, genesets=SETS, layer=None, weights="cv", background=None, smooth=True,
                           n_neighbors=6, key_added="s", **kw)
        out[label] = {"scores": np.column_stack([b.obs[f"s.{k.replace('/', '_')}"].to_numpy() for k in SETS]),
                      "time": results[-1][1], "mem": results[-1][2]}
    return out


def _ours_markers(folder: Path, results: list) -> dict:
    from expkit.tl.select_markers import select_markers

    a = _starmap()
    with measure("expkit select_markers (STARmap, 16 types)", results):
        select_markers(a, groupby="cell_type", n_candidates=10, n_markers=3, layer="counts")
    tab = a.uns["markers.sel"]["markers"]
    return {"markers": {g: d["gene"].tolist() for g, d in tab.groupby("group", sort=False)},
            "time": results[-1][1], "mem": results[-1][2]}


# ----------------------------------------------------------------------------------------------- peers
def _peer(folder: Path) -> None:
    """Run in the side venv: CellTypist, EnrichMap, ScMags on the files in ``folder``."""
    import anndata as ad
    import scanpy as sc

    out: dict = {"annotation": {}, "scores": {}, "markers": {}}
    results: list = []
    for train_file in sorted(folder.glob("ann*_train.h5ad")):
        i = train_file.name.split("_")[0]
        train, test = ad.read_h5ad(train_file), ad.read_h5ad(folder / f"{i}_test.h5ad")
        out["annotation"][i] = {}
        for b in (train, test):
            sc.pp.normalize_total(b, target_sum=1e4)
            sc.pp.log1p(b)
        for cfg, kw in (("default (LR, lbfgs)", {}), ("SGD + feature selection", dict(use_SGD=True,
                                                                                  feature_selection=True))):
            if kw.get("feature_selection") and train.n_vars <= 300:
                kw = dict(use_SGD=True)
                cfg = "SGD (genes <= 300: no feature selection)"
            out["annotation"][i][cfg] = _celltypist(train, test, kw, results)
    a = ad.read_h5ad(folder / "starmap_lognorm.h5ad")
    out["scores"] = _enrichmap(a, results)
    out["markers"] = _scmags(a, results)
    (folder / "peer.json").write_text(json.dumps(out))


def _celltypist(train, test, kw, results):
    import celltypist

    np.random.seed(0)
    with measure("celltypist train + annotate", results):
        model = celltypist.train(train, labels="cell_type", n_jobs=1, check_expression=False, **kw)
        pred = celltypist.annotate(test, model=model, majority_voting=False).predicted_labels
    return {"pred": pred["predicted_labels"].astype(str).tolist(), "truth": test.obs["cell_type"].astype(str).tolist(),
            "time": results[-1][1], "mem": results[-1][2]}


def _enrichmap(a, results):
    import enrichmap as em

    sets = {k.replace("/", "_"): v for k, v in SETS.items()}
    out = {}
    for label, corr in (("smooth, no correction", False), ("smooth + spatial GAM (EnrichMap default)", True)):
        b = a.copy()
        with measure(f"enrichmap score: {label}", results):
            em.tl.score(b, gene_set=sets, smoothing=True, correct_spatial_covariates=corr, n_neighbors=6)
        out[label] = {"scores": np.column_stack([b.obs[f"{k}_score"].to_numpy() for k in sets]).tolist(),
                      "time": results[-1][1], "mem": results[-1][2]}
    return out


def _scmags(a, results):
    import matplotlib
    import matplotlib.cm as cm

    if not hasattr(cm, "get_cmap"):  # scmags 1.7 calls cm.get_cmap, removed in matplotlib 3.9
        cm.get_cmap = matplotlib.colormaps.get_cmap
    import scmags as sm

    with measure("scmags filter + select (STARmap)", results):
        counts = a.layers["counts"]
        obj = sm.ScMags(counts, a.obs["cell_type"].astype(str).to_numpy(), gene_ann=np.asarray(a.var_names),
                        verbose=False)
        obj.filter_genes(nof_sel=10)
        obj.sel_clust_marker(nof_markers=3)
        markers = obj.get_markers()
    mk = {str(k)[2:] if str(k).startswith("C_") else str(k): [str(g) for g in np.ravel(v) if str(g) != "nan"]
          for k, v in zip(markers.index, markers.to_numpy())}
    return {"markers": mk, "time": results[-1][1], "mem": results[-1][2]}


# ----------------------------------------------------------------------------------------------- report
def _pearson(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return [float(np.corrcoef(a[:, j], b[:, j])[0, 1]) for j in range(a.shape[1])]


def _annotation_lines(ours, peer, names):
    from sklearn.metrics import f1_score

    lines = ["| data (train / test cells, genes, classes) | method | macro-F1 | time (s) | peak MiB |",
             "|---|---|---|---|---|"]
    for i, name in enumerate(names):
        o = ours[name]
        lines.append(f"| {name} ({o['n_train']} / {o['n_test']}, {o['n_genes']}, {o['n_classes']}) | expkit "
                     f"annotate | {o['f1']:.4f} | {o['time']:.2f} | {o['mem']:.0f} |")
        for cfg, r in peer["annotation"].get(f"ann{i}", {}).items():
            f1 = f1_score(r["truth"], r["pred"], average="macro")
            lines.append(f"| | celltypist {cfg} | {f1:.4f} (diff {o['f1'] - f1:+.4f}) | {r['time']:.2f} "
                         f"({r['time'] / o['time']:.1f}x) | {r['mem']:.0f} |")
    return lines


def _score_lines(ours, peer):
    lines = ["| setting | set | Pearson r (expkit vs enrichmap) |", "|---|---|---|"]
    for label, o in ours.items():
        p = peer["scores"][label]
        for k, r in zip(SETS, _pearson(o["scores"], p["scores"])):
            lines.append(f"| {label} | {k} | {r:.6f} |")
        lines.append(f"| {label} | time expkit / enrichmap | {o['time']:.2f} s / {p['time']:.2f} s |")
    return lines


def _marker_lines(ours, peer):
    pm = peer["markers"]["markers"]
    lines = ["| group | expkit | scmags | shared |", "|---|---|---|---|"]
    tot = shared = 0
    for g, genes in ours["markers"].items():
        other = pm.get(g, [])
        s = len(set(genes) & set(other))
        tot += len(genes)
        shared += s
        lines.append(f"| {g} | {', '.join(genes)} | {', '.join(other)} | {s} |")
    lines.append(f"| all | | | {shared} of {tot} ({100 * shared / max(tot, 1):.0f}%) |")
    lines.append(f"time expkit {ours['time']:.2f} s, scmags {peer['markers']['time']:.2f} s")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "annotation.md")
    parser.add_argument("--peer-python", default="/work/ctvenv/bin/python")
    parser.add_argument("--peer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reuse-peers", type=Path, help="a peer.json from an earlier run (skips the peers)")
    parser.add_argument("--save-peers", type=Path, help="keep the peers' results (json) here")
    args = parser.parse_args(argv)
    if args.peer is not None:
        _peer(args.peer)
        return 0
    results: list = []
    with tempfile.TemporaryDirectory(prefix="expkit-bench-annot-") as tmp:
        folder = Path(tmp)
        datasets = _datasets()
        for i, (train, test) in enumerate(datasets.values()):
            train.write_h5ad(folder / f"ann{i}_train.h5ad")
            test.write_h5ad(folder / f"ann{i}_test.h5ad")
        _starmap().write_h5ad(folder / "starmap_lognorm.h5ad")
        if args.reuse_peers is None:
            t0 = time.perf_counter()
            subprocess.run([args.peer_python, __file__, "--peer", str(folder)], check=True)
            print(f"peers done in {time.perf_counter() - t0:.0f} s", flush=True)
            if args.save_peers is not None:
                args.save_peers.write_text((folder / "peer.json").read_text())
        peer = json.loads((folder / "peer.json" if args.reuse_peers is None else args.reuse_peers).read_text())
        ours = _ours_annotation(datasets, folder, results)
        scores = _ours_scores(folder, results)
        markers = _ours_markers(folder, results)
    text = ["# Annotation, gene-set scores, marker selection: expkit vs CellTypist 1.7.1, EnrichMap 0.2.3, ScMags 1.7",
            "", f"`python benchmarks/annotation.py` on {time.strftime('%Y-%m-%d')}, 2-core CPU shared with other jobs "
            "(times are wall-clock, peak memory is RSS above the start of each step).", "",
            "Notes: expkit runs its defaults (feature selection on when > 300 genes, l2 = 1/n, i.e. C = 1, min 300 "
            "SGD steps, seed 0). CellTypist runs twice on the same log1p(CP10k) data: its default (one-vs-rest "
            "LogisticRegression, lbfgs, C = 1) and `use_SGD=True` (+ `feature_selection=True` when it allows, > 300 "
            "genes). Speed-ups in brackets are the peer's time over expkit's. The peers run first, expkit after, "
            "in one invocation; the machine's load (other jobs) varies, so single times are noisy.", "",
            "## Annotation (macro-F1 on held-out labelled cells; stratified 70/30 split, seed 0; DLPFC: train on one "
            "section, test on the other)", "", *_annotation_lines(ours, peer, list(datasets)), "",
            "## Gene-set scores (STARmap V1, 1,207 cells; CV weights, no control background, 6-NN smoothing)", "",
            *_score_lines(scores, peer), "", "## Marker selection (STARmap V1 cell types, 10 candidates, 3 markers)",
            "", *_marker_lines(markers, peer), ""]
    args.out.write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
