"""The demo: ``python -m expkit.demo [--out FOLDER]``.

Builds an experiment from the DLPFC demo data shipped with expkit, prints it, merges the samples, saves and
re-opens the folder. Later steps of the workflow are added here as the package grows.
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

    import expkit as ek

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="expkit-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    expm = ek.create_experiment(ek.datasets.dlpfc_demo(), out / "expm", overwrite=True)
    print(expm)
    expm.spatial_bin.view("151673")
    expm.merge(join="inner")
    expm.save()
    expm = ek.load_experiment(out / "expm")
    print(expm)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; experiment folder: {out / 'expm'}")
    return out


if __name__ == "__main__":
    main()
