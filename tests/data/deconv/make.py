"""Build the deconvolution fixtures from spacexr's inst/extdata (github:dmcable/spacexr, GPL-3).

Run once with SPACEXR=<a checkout's inst/extdata>; writes the .h5ad files next to this script.
"""
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

SRC = Path(os.environ.get("SPACEXR", "/tmp/spx/inst/extdata"))
OUT = Path(__file__).resolve().parent


def _dge(path):  # genes x cells csv -> cells x genes
    df = pd.read_csv(path, index_col=0)
    return df.T


def cerebellum():
    counts = _dge(SRC / "Reference/Vignette/dge.csv")
    meta = pd.read_csv(SRC / "Reference/Vignette/meta_data.csv", index_col=0)
    names = pd.read_csv(SRC / "Reference/Vignette/cell_type_dict.csv").set_index("Cluster")["Name"]
    ref = ad.AnnData(X=sp.csr_matrix(counts.to_numpy(np.float32)), obs=pd.DataFrame(index=counts.index.astype(str)),
                     var=pd.DataFrame(index=counts.columns.astype(str)))
    ref.obs["cell_type"] = pd.Categorical(names.reindex(meta.loc[ref.obs_names, "cluster"]).astype(str).to_numpy())
    ref.layers["counts"] = ref.X.copy()
    return ref


if __name__ == "__main__":
    cerebellum().write_h5ad(OUT / "cerebellum_reference.h5ad", compression="gzip")
