"""Small real datasets shipped with expkit (see ``README.md`` beside this file for provenance)."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def dlpfc_demo() -> Path:
    """The sample table of two cropped DLPFC Visium sections (151673, 151674; Maynard et al. 2021).

    Each section is the band of in-tissue spots with array_col < 44 (about 1,200 spots crossing every
    cortical layer) and its 3,000 most-expressed genes, in the Space Ranger layout with the lowres H&E image
    and the manual layer labels (``<id>_truth.txt``). Build an experiment with
    ``expkit.create_experiment(expkit.datasets.dlpfc_demo(), "expm/demo")``.
    """
    return HERE / "dlpfc_demo" / "samples.tsv"


def dlpfc_demo_truth(sample: str) -> "object":
    """The manual cortical layer of each labelled spot of a demo section, as a pandas Series by barcode."""
    import pandas as pd

    path = HERE / "dlpfc_demo" / sample / f"{sample}_truth.txt"
    return pd.read_csv(path, sep="\t", header=None, index_col=0).iloc[:, 0].rename("layer")
