"""rctd-py's full-mode weights on the test pseudo-spots (tests/test_deconvolution.py::_pseudo()).

Run from the repository root with the project venv: python tests/data/deconv/make_rctd_py.py
It needs the peer venv /work/dcvenv (rctd-py 0.4.0) and a Q-matrix file (RCTD_Q_MATRICES; offline one
is written by benchmarks/_deconv_qmat.py). Writes rctd_py_full.csv and rctd_py_sigma.txt here.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from test_deconvolution import _pseudo  # noqa: E402

if __name__ == "__main__":
    ref, spots = _pseudo()
    with tempfile.TemporaryDirectory() as tmp:
        spots.write_h5ad(Path(tmp) / "spots.h5ad")
        ref.write_h5ad(Path(tmp) / "reference.h5ad")
        env = dict(os.environ, MIN_CELLS="10")
        env.setdefault("RCTD_Q_MATRICES", "/tmp/rctd_q/q_matrices.npz")
        out = subprocess.run([os.environ.get("PEER_PY", "/work/dcvenv/bin/python"),
                              str(HERE.parents[1].parent / "benchmarks" / "_deconv_peers.py"), tmp,
                              str(Path(tmp) / "peers.npz"), "rctd"], env=env, check=True, capture_output=True, text=True)
        print(out.stdout)
        sigma = [ln for ln in out.stdout.splitlines() if ln.startswith("Chosen sigma")][0].split()[2]
        res = np.load(Path(tmp) / "peers.npz", allow_pickle=True)
        pd.DataFrame(res["rctd"], index=spots.obs_names, columns=list(res["types"])).round(8).to_csv(
            HERE / "rctd_py_full.csv")
        (HERE / "rctd_py_sigma.txt").write_text(sigma + "\n")
