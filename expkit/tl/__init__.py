"""Tools on one AnnData: markers, integration (neighbors, leiden, umap are added by their modules)."""
from .integrate import integrate
from .markers import get_markers, markers

__all__ = ["markers", "get_markers", "integrate"]
