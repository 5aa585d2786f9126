"""The table of methods lifted onto every modality accessor.

Each entry: method name on the accessor -> (``"module:function"``, modalities or None for all, kind).
kind "sample": the function takes one AnnData and is called per sample (or on the integrated data when
``run_on_samples=None``); kind "joint": the function takes ``{sample: AnnData}`` and returns
``{sample: result}`` (methods that model several samples at once); kind "derive": the function returns a new
AnnData that becomes a sample of another modality (``func.derived_modality``), e.g. cells made from bins.
Adding a method to the package is one line here; the dispatcher does the rest.
"""
from __future__ import annotations

ALL = None
SPATIAL = ("spatial-bin", "spatial-cell")

METHODS: dict[str, tuple[str, tuple[str, ...] | None, str]] = {
    # preprocessing
    "qc": ("expkit.pp:qc", ALL, "sample"),
    "filter": ("expkit.pp:filter", ALL, "replace"),
    "log_normalize": ("expkit.pp:log_normalize", ALL, "sample"),
    "select_hvg": ("expkit.pp:select_hvg", ALL, "sample"),  # on the integrated data pass batch_key="batch"
    "scale_pca": ("expkit.pp:scale_pca", ALL, "sample"),
    # neighbours, clustering, embedding
    "knn": ("expkit.tl:knn", ALL, "sample"),
    "leiden": ("expkit.tl:leiden", ALL, "sample"),
    "umap": ("expkit.tl:umap", ALL, "sample"),
    # markers and batch integration
    "markers": ("expkit.tl:markers", ALL, "sample"),
    "get_markers": ("expkit.tl:get_markers", ALL, "read"),
    "integrate": ("expkit.tl:integrate", ALL, "sample"),  # usually run_on_samples=None (the integrated data)
    # spatial graphs and statistics
    "spatial_neighbors": ("expkit.spatial:spatial_neighbors", SPATIAL, "sample"),
    "spatial_components": ("expkit.spatial:spatial_components", SPATIAL, "sample"),
    "spatial_autocorr": ("expkit.spatial:spatial_autocorr", SPATIAL, "sample"),
    "spatial_svg_spatialde": ("expkit.spatial:svg_spatialde", SPATIAL, "sample"),
    # spatial domains (SpaGCN), domain markers and metagenes
    "spatial_detect_domains_spagcn": ("expkit.spatial.domains:spatial_detect_domains_spagcn", SPATIAL, "sample"),
    "integrate_domains_spagcn": ("expkit.spatial.domains:integrate_domains_spagcn", SPATIAL, "joint"),
    "spatial_markers_spagcn": ("expkit.spatial.domain_markers:spatial_markers_spagcn", SPATIAL, "sample"),
    "spatial_metagene": ("expkit.spatial.domain_markers:spatial_metagene", SPATIAL, "sample"),
    # spatial domains (DeepST)
    "spatial_detect_domains_deepst": ("expkit.spatial.deepst:spatial_detect_domains_deepst", SPATIAL, "sample"),
    "integrate_domains_deepst": ("expkit.spatial.deepst:integrate_domains_deepst", SPATIAL, "joint"),
    # niches / domains from expression + neighbourhood at several resolutions (nested), island filtering
    "spatial_domains": ("expkit.spatial.niches:spatial_domains", SPATIAL, "joint"),
    "spatial_filter_islands": ("expkit.spatial.niches:spatial_filter_islands", SPATIAL, "sample"),
    # Visium HD bins -> cells: new samples of spatial-cell, linked to their bins sample
    "bins_to_cells": ("expkit.spatial.bins_to_cells:bins_to_cells", ("spatial-bin",), "derive"),
    # cell types: reference annotation, marker selection, gene-set scores, domain labels
    "annotate": ("expkit.tl.annotate:annotate", ALL, "sample"),
    "select_markers": ("expkit.tl.select_markers:select_markers", ALL, "sample"),
    "deconvolve": ("expkit.spatial.deconvolution:deconvolve", SPATIAL, "sample"),
    "score_genesets": ("expkit.spatial.genesets:score_genesets", SPATIAL, "sample"),
    "label_domains": ("expkit.spatial.label_domains:label_domains", SPATIAL, "sample"),
    # spatial label statistics (squidpy 1.8's definitions) and statistics across samples
    "nhood_enrichment": ("expkit.spatial.stats_graph:nhood_enrichment", SPATIAL, "sample"),
    "co_occurrence": ("expkit.spatial.stats_graph:co_occurrence", SPATIAL, "sample"),
    "interaction_matrix": ("expkit.spatial.stats_graph:interaction_matrix", SPATIAL, "sample"),
    "centrality": ("expkit.spatial.stats_graph:centrality", SPATIAL, "sample"),
    "ripley": ("expkit.spatial.stats_ripley:ripley", SPATIAL, "sample"),
    "label_moran": ("expkit.spatial.stats_shape:label_moran", SPATIAL, "sample"),
    "label_hull": ("expkit.spatial.stats_shape:label_hull", SPATIAL, "sample"),
    "label_connectivity": ("expkit.spatial.stats_shape:label_connectivity", SPATIAL, "sample"),
    "spatial_graph_stats": ("expkit.spatial.cohort:spatial_graph_stats", SPATIAL, "joint-read"),
    "sample_embedding": ("expkit.spatial.stats_cohort:sample_embedding", SPATIAL, "table"),
    "compare_groups": ("expkit.spatial.stats_cohort:compare_groups", SPATIAL, "table"),
    "plot_nhood_enrichment": ("expkit.pl.stats:plot_nhood_enrichment", SPATIAL, "read"),
    "plot_interaction_matrix": ("expkit.pl.stats:plot_interaction_matrix", SPATIAL, "read"),
    "plot_co_occurrence": ("expkit.pl.stats:plot_co_occurrence", SPATIAL, "read"),
    "plot_ripley": ("expkit.pl.stats:plot_ripley", SPATIAL, "read"),
    # learned spatial embeddings: SpaCon (expression + connectivity), Phenocoder (object image patches)
    "add_connectivity": ("expkit.spatial.connectome:add_connectivity", SPATIAL, "sample"),
    "spatial_connectome_embed": ("expkit.spatial.connectome:spatial_connectome_embed", SPATIAL, "sample"),
    "spatial_connectome_cluster": ("expkit.spatial.connectome:spatial_connectome_cluster", SPATIAL, "sample"),
    "image_patches": ("expkit.spatial.morphology:image_patches", SPATIAL, "sample"),
    "train_patch_cvae": ("expkit.spatial.morphology:train_patch_cvae", SPATIAL, "joint"),
    "encode_patches": ("expkit.spatial.morphology:encode_patches", SPATIAL, "sample"),
    # images: processing into the image store, per-spot image features
    "image_process": ("expkit.spatial.image_process:image_process", SPATIAL, "sample"),
    "image_segment": ("expkit.spatial.image_segment:image_segment", SPATIAL, "sample"),
    "image_features": ("expkit.spatial.image_features:image_features", SPATIAL, "sample"),
    # images and plots
    "get_image": ("expkit.io.images:get_image", SPATIAL, "read"),
    "plot_spatial": ("expkit.pl.spatial:plot_spatial", SPATIAL, "joint-read"),
    "plot_embedding": ("expkit.pl.basic:plot_embedding", ALL, "read"),
    "plot_qc": ("expkit.pl.basic:plot_qc", ALL, "read"),
    "plot_proportions": ("expkit.pl.basic:plot_proportions", ALL, "joint-read"),
}
