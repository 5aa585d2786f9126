"""Tools on one AnnData: markers, integration, neighbour graphs, clustering, embeddings, cell-type annotation."""
from .annotate import CellTypeModel, annotate, train_celltype_model
from .integrate import integrate
from .leiden import leiden
from .markers import get_markers, markers
from .neighbors import knn
from .select_markers import select_markers
from .umap import umap

__all__ = ["markers", "get_markers", "integrate", "knn", "leiden", "umap", "annotate", "train_celltype_model",
           "CellTypeModel", "select_markers"]
