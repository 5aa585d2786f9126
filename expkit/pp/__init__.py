"""Preprocessing: quality control, filtering, normalisation, highly variable genes, scaling and PCA.

Plain functions on one AnnData (see ``docs/architecture.md``)::

    qc(adata)                 # obs qc.n_counts, qc.n_genes, qc.pct_mito, qc.pct_ribo; var qc.n_cells, ...
    adata = filter(adata, min_counts=500, max_pct_mito=20, min_cells=3)   # returns a new AnnData
    log_normalize(adata)      # layers norm, lognorm (X = lognorm)
    select_hvg(adata)         # var vst.* (Seurat v3)
    scale_pca(adata)          # obsm/varm/uns pca
"""
from .hvg import select_hvg
from .normalize import log_normalize
from .pca import scale_pca
from .qc import filter, gene_flags, qc

__all__ = ["qc", "filter", "gene_flags", "log_normalize", "select_hvg", "scale_pca"]
