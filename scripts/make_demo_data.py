"""Build the small demo data shipped with expkit from the shared DLPFC sections.

    python scripts/make_demo_data.py [--shared ../shared/data]

Crops DLPFC 151673 and 151674 (10x Visium, spatialLIBD, Maynard et al. 2021) to the in-tissue spots with
array_col < 44 (a band crossing every cortical layer and the white matter) and each section's 3,000
most-expressed of its top-5000 genes, keeping the Space Ranger layout: a Cell Ranger v3 HDF5 matrix,
spatial/ (positions, scalefactors, the original lowres H&E image, unchanged) and the manual layer labels.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "expkit" / "datasets" / "dlpfc_demo"
MAX_COL, N_GENES = 44, 3000


def crop(src: Path, dst: Path, sample: str) -> None:
    with h5py.File(src / "filtered_feature_bc_matrix_top5000genes.h5", "r") as f:
        m = f["matrix"]
        X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=tuple(m["shape"][:]))
        barcodes = m["barcodes"][:]
        feats = {k: m["features"][k][:] for k in ("id", "name", "feature_type", "genome")}
    pos = pd.read_csv(src / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    keep_pos = pos[(pos[1] == 1) & (pos[3] < MAX_COL)]
    bc = barcodes.astype(str)
    cells = np.flatnonzero(np.isin(bc, keep_pos.index))
    X = X[:, cells]  # genes x cells
    totals = np.asarray(X.sum(axis=1)).ravel()
    genes = np.sort(np.argsort(-totals, kind="stable")[:N_GENES])
    X = sp.csc_matrix(X[genes, :])
    (dst / "spatial").mkdir(parents=True, exist_ok=True)
    with h5py.File(dst / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        kw = dict(compression="gzip", compression_opts=9)
        g.create_dataset("data", data=X.data.astype(np.int32), **kw)
        g.create_dataset("indices", data=X.indices.astype(np.int64), **kw)
        g.create_dataset("indptr", data=X.indptr.astype(np.int64), **kw)
        g.create_dataset("shape", data=np.array(X.shape, dtype=np.int32))
        g.create_dataset("barcodes", data=barcodes[cells])
        fg = g.create_group("features")
        for k, v in feats.items():
            fg.create_dataset(k, data=v[genes])
        fg.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    pos.loc[pos.index.isin(bc[cells])].to_csv(dst / "spatial" / "tissue_positions_list.csv", header=False)
    for name in ("scalefactors_json.json", "tissue_lowres_image.png"):
        shutil.copyfile(src / "spatial" / name, dst / "spatial" / name)
    truth = pd.read_csv(src / f"{sample}_truth.txt", sep="\t", header=None, index_col=0)
    truth.loc[truth.index.isin(bc[cells])].to_csv(dst / f"{sample}_truth.txt", sep="\t", header=False)
    print(f"{sample}: {len(cells)} spots x {len(genes)} genes -> {dst}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    for sample in ("151673", "151674"):
        crop(Path(args.shared) / "dlpfc" / sample, OUT / sample, sample)
    (OUT / "samples.tsv").write_text(
        "sample\tmodality\tbatch\tgroup\ttaxa\tlocation\tdonor\n"
        "151673\tspatial-bin\tBr8100-a\tDLPFC\thsa\t151673\tBr8100\n"
        "151674\tspatial-bin\tBr8100-b\tDLPFC\thsa\t151674\tBr8100\n")


if __name__ == "__main__":
    main()
