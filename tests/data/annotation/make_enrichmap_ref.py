"""EnrichMap 0.2.3 scores on starmap_v1.h5ad, the reference of tests/test_genesets.py (run in a side venv).

    /work/ctvenv/bin/python tests/data/annotation/make_enrichmap_ref.py   # writes enrichmap_starmap.npz

X = log1p(counts scaled to 10,000 per cell) (scanpy), gene sets below, 6-NN smoothing, with and without
EnrichMap's spatial GAM correction. CV weights are EnrichMap's own (inferred).
"""
import json
from pathlib import Path

import anndata as ad
import enrichmap as em
import numpy as np
import scanpy as sc

HERE = Path(__file__).resolve().parent
SETS = {"L2_3": ["Cux2", "Otof", "Lamp5", "Rasgrf2"], "L4": ["Rorb", "Rspo1", "Whrn", "Zmat4"],
        "L5": ["Fezf2", "Parm1", "Rab3c", "Bcl11b"], "L6": ["Foxp2", "Syt6", "Crym", "Pcp4", "Tle4"],
        "Oligo": ["Mbp", "Plp1", "Mobp", "Mog"], "Astro": ["Gja1", "Aqp4", "Aldh1l1", "Slc1a3", "Mfge8"],
        "Endo": ["Cldn5", "Itm2a", "Bsg", "Flt1"]}

a = ad.read_h5ad(HERE / "starmap_v1.h5ad")
sc.pp.normalize_total(a, target_sum=1e4)
sc.pp.log1p(a)
out = {}
for name, corr in (("smooth", False), ("smooth_gam", True)):
    b = a.copy()
    em.tl.score(b, gene_set=SETS, smoothing=True, correct_spatial_covariates=corr, n_neighbors=6)
    out[name] = np.column_stack([b.obs[f"{k}_score"].to_numpy() for k in SETS])
np.savez_compressed(HERE / "enrichmap_starmap.npz", sets=np.asarray(json.dumps(SETS)), **out)
print({k: v.shape for k, v in out.items()})
