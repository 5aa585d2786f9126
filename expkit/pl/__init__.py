"""Plots (matplotlib). Every function returns the Figure; one-panel functions accept ``ax=``.

Importing this module imports matplotlib (``import expkit`` does not). See
:mod:`expkit.pl._utils` for the categorical palette rule shared by all plots.
"""
from __future__ import annotations

from ._utils import DEFAULT_PALETTE, NA_COLOR, category_colors, set_category_colors
from .basic import plot_embedding, plot_proportions, plot_qc
from .spatial import EMBEDDING_DEFAULTS, compose_channels, plot_spatial, plot_spatial_grid
from .stats import (plot_co_occurrence, plot_group_comparison, plot_interaction_matrix, plot_nhood_enrichment,
                    plot_ripley, plot_sample_embedding)

__all__ = [
    "plot_spatial",
    "plot_spatial_grid",
    "plot_embedding",
    "plot_proportions",
    "plot_qc",
    "category_colors",
    "set_category_colors",
    "compose_channels",
    "DEFAULT_PALETTE",
    "NA_COLOR",
    "EMBEDDING_DEFAULTS",
    "plot_nhood_enrichment",
    "plot_interaction_matrix",
    "plot_co_occurrence",
    "plot_ripley",
    "plot_sample_embedding",
    "plot_group_comparison",
]
