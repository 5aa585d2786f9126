"""Tools on one AnnData: markers, integration, neighbour graphs, clustering, embeddings."""
from .integrate import integrate
from .leiden import leiden
from .markers import get_markers, markers
from .neighbors import knn
from .umap import umap

__all__ = ["markers", "get_markers", "integrate", "knn", "leiden", "umap"]
