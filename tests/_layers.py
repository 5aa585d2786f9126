"""The DLPFC sections with their manual cortical layers, and the ARI against them (shared by the domain tests)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score


def read_dlpfc_layers(shared_data, sid: str, **read_kw):
    """(AnnData read by expkit.io.read_visium, manual layer per spot in obs order; NaN where unlabelled)."""
    from expkit.io import read_visium

    folder = shared_data / "dlpfc" / sid
    adata = read_visium(folder, sample=sid, **read_kw)
    truth = pd.read_csv(folder / f"{sid}_truth.txt", sep="\t", header=None, index_col=0)[1]
    return adata, truth.reindex(adata.obs["barcode"].to_numpy()).to_numpy()


def ari(truth, labels) -> float:
    """Adjusted Rand index over the labelled spots."""
    ok = pd.notna(truth)
    return float(adjusted_rand_score(truth[ok], np.asarray(labels)[ok]))
