"""Spatial analysis functions on one AnnData (imported lazily: ``import expkit`` does not load torch)."""
from .domain_markers import spatial_markers_spagcn, spatial_metagene
from .domains import integrate_domains_spagcn, spatial_detect_domains_spagcn

__all__ = ["spatial_detect_domains_spagcn", "integrate_domains_spagcn", "spatial_markers_spagcn", "spatial_metagene"]
