"""Spatial analysis: neighbour graphs, spatial autocorrelation, spatially variable genes."""
from __future__ import annotations

from .autocorr import spatial_autocorr
from .graph import spatial_components, spatial_neighbors

__all__ = ["spatial_neighbors", "spatial_components", "spatial_autocorr"]
