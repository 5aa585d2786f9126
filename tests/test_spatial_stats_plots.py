"""The statistics plots draw what the results hold and return Figures (Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from expkit.errors import KeyNotFoundError  # noqa: E402
from expkit.pl import stats as P  # noqa: E402
from expkit.spatial import stats_graph as sg  # noqa: E402
from expkit.spatial import stats_ripley as sr  # noqa: E402

from test_spatial_stats import load  # noqa: E402


def test_statistics_plots():
    import matplotlib.pyplot as plt

    a = load("dlpfc")
    with pytest.raises(KeyNotFoundError, match="run nhood_enrichment first"):
        P.plot_nhood_enrichment(a, cluster_key="label")
    ne = sg.nhood_enrichment(a, cluster_key="label", n_perms=50, seed=0)
    fig = P.plot_nhood_enrichment(a, cluster_key="label")
    img = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(img), ne["zscore"])
    sg.interaction_matrix(a, cluster_key="label")
    assert P.plot_interaction_matrix(a, cluster_key="label").axes
    co = sg.co_occurrence(a, cluster_key="label", interval=10)
    fig = P.plot_co_occurrence(a, cluster_key="label", clusters=["L1", "WM"])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 7 + 1
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_ydata(), co["occ"][0, 6])
    r = sr.ripley(a, cluster_key="label", mode="L", n_simulations=5, n_observations=200, seed=0)
    fig = P.plot_ripley(a, cluster_key="label", mode="L")
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), r["stat"].iloc[0].to_numpy())
    plt.close("all")
