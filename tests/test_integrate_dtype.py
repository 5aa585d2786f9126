"""expkit.tl.integrate(dtype="float32"): close to float64 and as close to harmonypy (DLPFC 151673 + 151674)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import anndata as ad  # noqa: E402
import torch  # noqa: E402

from expkit.errors import InputError  # noqa: E402
from expkit.tl.integrate import integrate  # noqa: E402

torch.set_num_threads(1)
REF = Path(__file__).parent / "data" / "scanpy_ref" / "dlpfc_pair_harmony.npz"


def _synthetic(n: int = 400) -> ad.AnnData:
    rng = np.random.default_rng(0)
    cluster = rng.integers(0, 2, n)
    batch = np.where(np.arange(n) < n // 2, "b1", "b2")
    z = rng.normal(size=(n, 5)) * 0.3
    z[:, 0] += np.where(cluster == 1, 4.0, -4.0)
    z[:, 1] += np.where(batch == "b2", 3.0, 0.0)
    a = ad.AnnData(np.zeros((n, 1), dtype=np.float32),
                   obs=pd.DataFrame({"batch": batch}, index=[f"c{i}" for i in range(n)]))
    a.obsm["pca"] = z
    return a


def test_float32_close_to_float64_synthetic():
    a, b = _synthetic(), _synthetic()
    integrate(a, seed=0, n_clusters=4)
    integrate(b, seed=0, n_clusters=4, dtype="float32")
    assert b.uns["pca.harmony"]["params"]["dtype"] == "float32"
    assert b.obsm["pca.harmony"].dtype == np.float64  # the input's dtype
    np.testing.assert_allclose(b.obsm["pca.harmony"], a.obsm["pca.harmony"], atol=1e-3)
    c = _synthetic()
    integrate(c, seed=0, n_clusters=4, dtype="float32")
    np.testing.assert_array_equal(b.obsm["pca.harmony"], c.obsm["pca.harmony"])  # deterministic
    with pytest.raises(InputError):
        integrate(_synthetic(), dtype="float16")


def test_float32_close_to_harmonypy(shared_data):
    from _de_helpers import dlpfc_pair_pca, knn_overlap

    if not REF.exists():
        pytest.skip(f"{REF} missing: run tests/reference/make_scanpy_de_refs.py")
    emb, batch, _ = dlpfc_pair_pca(shared_data)
    a = ad.AnnData(np.zeros((len(batch), 1), dtype=np.float32),
                   obs=pd.DataFrame({"batch": batch}, index=[f"c{i}" for i in range(len(batch))]))
    a.obsm["pca"] = emb
    integrate(a, seed=0, dtype="float32")
    theirs = np.load(REF)["matched"].astype(np.float64)
    mine = a.obsm["pca.harmony"][:, :theirs.shape[1]]
    # measured (seed 0): per-dim Pearson r min 0.99920, as float64
    corr = np.array([np.corrcoef(mine[:, j], theirs[:, j])[0, 1] for j in range(mine.shape[1])])
    assert corr.min() > 0.995
    assert knn_overlap(mine, theirs, 30) > 0.85
