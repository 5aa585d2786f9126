"""The README's demo command runs on the data shipped with the package."""
from expkit import demo
import expkit as ek


def test_demo_runs(tmp_path, capsys):
    out = demo.main(["--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "151673" in text and "demo finished" in text and "ARI" in text
    expm = ek.load_experiment(out / "expm")
    assert expm.spatial_bin.samples == ["151673", "151674"]
    a = expm.spatial_bin["151673"]
    assert a.n_obs == 1207 and "spagcn.refined" in a.obs and "moranI" in a.uns
    assert "spagcn.joint.refined" in a.obs and (a.var["spatialde.padj"] < 0.05).sum() > 100
    assert expm.spatial_bin.integrated.n_obs == 1207 + 1244
    for name in ("layers", "spagcn_domains", "spagcn_joint_domains", "top_moran_gene", "top_svg_gene"):
        png = out / "figures" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 10_000
