"""Spatial analyses on one AnnData (plain functions)."""
from .svg import svg_spatialde

__all__ = ["svg_spatialde"]
