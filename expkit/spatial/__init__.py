"""Spatial analysis: neighbour graphs, spatial autocorrelation, spatially variable genes, spatial domains (SpaGCN, DeepST),
tissue images (processing, nuclei, per-spot features), Visium HD bins -> cells, niches."""
from __future__ import annotations

from .autocorr import spatial_autocorr
from .bins_to_cells import bins_to_cells
from .cohort import spatial_graph_stats
from .deconvolution import deconvolve
from .deepst import integrate_domains_deepst, spatial_detect_domains_deepst
from .domain_markers import spatial_markers_spagcn, spatial_metagene
from .domains import integrate_domains_spagcn, spatial_detect_domains_spagcn
from .genesets import score_genesets
from .graph import spatial_components, spatial_neighbors
from .image_features import image_features
from .image_process import image_process
from .image_segment import image_segment, objects_to_adata
from .label_domains import label_domains
from .niches import spatial_domains, spatial_filter_islands
from .stats_cohort import compare_groups, sample_embedding
from .stats_graph import centrality, co_occurrence, interaction_matrix, nhood_enrichment
from .stats_ripley import ripley
from .stats_shape import label_connectivity, label_hull, label_moran
from .svg import svg_spatialde

__all__ = ["spatial_neighbors", "spatial_components", "spatial_autocorr", "svg_spatialde",
           "spatial_detect_domains_spagcn", "integrate_domains_spagcn", "spatial_markers_spagcn", "spatial_metagene",
           "spatial_detect_domains_deepst", "integrate_domains_deepst", "image_process", "image_segment",
           "objects_to_adata", "image_features", "bins_to_cells", "spatial_domains", "spatial_filter_islands",
           "score_genesets", "label_domains", "nhood_enrichment", "co_occurrence", "interaction_matrix", "centrality",
           "ripley", "label_moran", "label_hull", "label_connectivity", "spatial_graph_stats", "sample_embedding",
           "compare_groups", "deconvolve"]
