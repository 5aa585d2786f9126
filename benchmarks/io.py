"""I/O benchmark: create from raw, save, load + print, first access, on the shared real data.

    python benchmarks/io.py
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import SHARED, max_rss_mb, measure  # noqa: E402

import expkit as ek  # noqa: E402

ek.settings.progress = False
logging.getLogger("expkit").setLevel(logging.WARNING)

SETS = {
    "DLPFC 2 sections": [
        dict(sample=s, modality="spatial-bin", batch=s, group="DLPFC", taxa="hsa", location=str(SHARED / "dlpfc" / s))
        for s in ("151673", "151674")],
    "Xenium brain (36,602 cells)": [
        dict(sample="xenium", modality="spatial-cell", batch="x", group="brain", taxa="mmu",
             location=str(SHARED / "xenium_mouse_brain"))],
    "mouse olfactory bulb (table)": [
        dict(sample="mob11", modality="spatial-bin", batch="m", group="bulb", taxa="mmu",
             location=str(SHARED / "mob_rep11" / "Rep11_MOB_counts_spots_x_genes.tsv.gz"))],
}


def main() -> None:
    for name, rows in SETS.items():
        print(f"\n== {name}")
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "samples.tsv"
            pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
            with measure("create_experiment (read raw + map genes + save)"):
                expm = ek.create_experiment(table, Path(tmp) / "expm")
            first = rows[0]
            acc = first["modality"].replace("-", "_")
            for s in getattr(expm, acc):
                getattr(expm, acc)[s]
            with measure("save (all samples rewritten)"):
                expm.save()
            with measure("load_experiment + print"):
                again = ek.load_experiment(Path(tmp) / "expm")
                text = repr(again)
            with measure("first access of one sample") as info:
                a = getattr(again, acc)[first["sample"]]
                info["shape"] = f"{a.n_obs}x{a.n_vars}"
            size = sum(p.stat().st_size for p in (Path(tmp) / "expm").rglob("*") if p.is_file()) / 2**20
            print(f"{'folder size':<48} {size:8.1f} MiB   ({len(text.splitlines())} summary lines)")
    print(f"\nprocess peak RSS: {max_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
