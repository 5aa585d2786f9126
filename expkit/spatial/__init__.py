"""Spatial analysis functions on one AnnData (imported lazily: ``import expkit`` does not load torch)."""
from .domains import integrate_domains_spagcn, spatial_detect_domains_spagcn

__all__ = ["spatial_detect_domains_spagcn", "integrate_domains_spagcn"]
