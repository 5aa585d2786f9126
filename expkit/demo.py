"""The demo: ``python -m expkit.demo [--out FOLDER]``.

Builds an experiment from the DLPFC demo data shipped with expkit (two cropped Visium sections with their
manual cortical layers), prints it, runs the spatial-domain workflow on every section (QC, normalisation,
HVGs, PCA, the spatial graph, Moran's I, SpatialDE2's score test, SpaGCN domains per section and shared by both
sections, domain markers), compares the domains with the manual layers (ARI),
writes figures (PNG) and the experiment folder, and re-opens the folder.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m expkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import adjusted_rand_score

    import expkit as ek

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="expkit-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def step(text: str) -> None:
        print(f"\n[{time.perf_counter() - t0:5.1f} s] {text}", flush=True)

    step("building the experiment from the raw Space Ranger folders")
    expm = ek.create_experiment(ek.datasets.dlpfc_demo(), out / "expm", overwrite=True)
    print(expm)
    m = expm.spatial_bin
    m.view("151673")
    for sample in m.samples:  # the manual layers, for comparison
        a = m[sample]
        a.obs["layer"] = ek.datasets.dlpfc_demo_truth(sample).reindex(a.obs["barcode"]).to_numpy()

    step("QC, normalisation, highly variable genes, PCA, spatial graph")
    m.qc(run_on_samples=True)
    m.log_normalize(run_on_samples=True)
    m.select_hvg(run_on_samples=True, n_top_genes=2000)
    m.scale_pca(run_on_samples=True, n_comps=30)
    m.spatial_neighbors(run_on_samples=True)

    step("spatially autocorrelated genes (Moran's I)")
    m.spatial_autocorr(run_on_samples=True, mode="moran")
    top = m["151673"].uns["moranI"].head(8)
    print(top[["gene", "I", "pval_norm_fdr_bh"]].to_string())

    step("spatially variable genes (SpatialDE2's score test on the raw counts)")
    m.spatial_svg_spatialde(run_on_samples=True, layer="counts")
    v = m["151673"].var
    svg = v.sort_values("spatialde.rank").head(8)
    print(f"  151673: {int((v['spatialde.padj'] < 0.05).sum())} of {int(v['spatialde.pval'].notna().sum())} genes "
          f"with padj < 0.05; the top 8:")
    print(svg[["gene", "spatialde.log10p", "spatialde.padj"]].to_string())

    step("SpaGCN spatial domains (7 per section, hexagon refinement, seed 0)")
    m.spatial_detect_domains_spagcn(run_on_samples=True, n_clusters=7, refine_shape="hexagon", seed=0)
    def ari(key: str, what: str) -> dict[str, float]:
        """ARI of obs[key] against the manual layers (labelled spots), per section."""
        out = {}
        for sample in m.samples:
            obs = m[sample].obs
            lab = obs["layer"].notna()
            out[sample] = adjusted_rand_score(obs.loc[lab, "layer"], obs.loc[lab, key])
            print(f"  {sample}: ARI of {what} vs manual layers = {out[sample]:.3f}")
        return out

    aris = ari("spagcn.refined", "refined domains")

    step("SpaGCN domains shared by both sections (one joint model, seed 0)")
    m.integrate_domains_spagcn(run_on_samples=True, n_clusters=7, refine_shape="hexagon", seed=0,
                               result_key="spagcn.joint")
    joint = ari("spagcn.joint.refined", "the joint domains")
    markers = m.spatial_markers_spagcn(run_on_samples=["151673"], domain_key="spagcn.joint.refined")["151673"]
    best = markers.groupby("group").head(1)[["group", "gene", "fold_change", "q"]]
    print("  the best marker of each joint domain (151673):")
    print(best.to_string(index=False))

    step("figures")
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    ek.pl.set_category_colors([m[s] for s in m.samples], "layer")
    for color, name in (("layer", "layers"), ("spagcn.refined", "spagcn_domains"),
                        ("spagcn.joint.refined", "spagcn_joint_domains"), (top["gene"].iloc[0], "top_moran_gene"),
                        (svg["gene"].iloc[0], "top_svg_gene")):
        fig = m.plot_spatial(run_on_samples=True, channels="lowres/r,g,b", layer="lognorm",
                             plot_embeddings={"basis": "spatial", "color": color})
        fig.savefig(figs / f"{name}.png", dpi=110)
        print(f"  wrote {figs / f'{name}.png'}")

    step("merge, save and re-open")
    expm.merge(join="inner")
    expm.save()
    expm = ek.load_experiment(out / "expm")
    print(expm)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; ARIs {', '.join(f'{k}: {v:.3f}' for k, v in aris.items())}"
          f" (joint: {', '.join(f'{k}: {v:.3f}' for k, v in joint.items())})")
    print(f"experiment folder: {out / 'expm'}\nfigures: {figs}")
    return out


if __name__ == "__main__":
    main()
