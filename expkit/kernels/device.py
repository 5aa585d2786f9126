"""Device resolution and array movement, the one place that knows about CUDA."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch

from .._settings import settings

_warned = False


def resolve_device(use_gpu: bool | str | None = None) -> torch.device:
    """Return the torch device a kernel should run on.

    ``use_gpu=True`` asks for CUDA and falls back to the CPU with one warning when it is absent.
    ``use_gpu=None`` follows ``settings.device`` ("auto" means CPU unless asked). A string is a device name.
    """
    global _warned
    if isinstance(use_gpu, str):
        want = use_gpu
    elif use_gpu is None:
        want = "cuda" if settings.device == "cuda" else "cpu"
    else:
        want = "cuda" if use_gpu else ("cpu" if settings.device != "cuda" else "cuda")
    if want.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(want)
        if not _warned:
            warnings.warn("CUDA was asked for but is not available: running on the CPU.", RuntimeWarning,
                          stacklevel=3)
            _warned = True
        return torch.device("cpu")
    return torch.device("cpu")


def as_tensor(x, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense tensor on ``device`` from a numpy array, a scipy sparse matrix or a tensor."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    if sp.issparse(x):
        x = x.toarray()
    return torch.as_tensor(np.asarray(x), dtype=dtype).to(device)


def sparse_as_tensor(x, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A torch sparse CSR tensor from a scipy sparse matrix (no densification)."""
    x = sp.csr_matrix(x)
    return torch.sparse_csr_tensor(
        torch.as_tensor(x.indptr, dtype=torch.int64), torch.as_tensor(x.indices, dtype=torch.int64),
        torch.as_tensor(x.data, dtype=dtype), size=x.shape).to(device)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def seed_everything(seed: int | None) -> int:
    """Seed torch (CPU and CUDA) and return the seed used (``settings.seed`` when None)."""
    seed = settings.seed if seed is None else int(seed)
    torch.manual_seed(seed)
    return seed


@contextmanager
def single_thread(device: torch.device):
    """Run a loop of small tensor operations on one CPU thread: with more, OpenMP's waiting worker
    threads take CPU from the main thread (4x slower with 2 threads on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# many independent problems in parts, side by side on the CPU
# --------------------------------------------------------------------------------------------
MIN_PART = 32                    # a CPU batch of at least twice this many problems runs as two parts


def parts(n: int, chunk: int, device: torch.device) -> list:
    """Contiguous ranges of at most ``chunk`` problems; on the CPU of at most ``chunk // 2`` (two run side
    by side in :func:`run_parallel`: the memory of one chunk) and at least two when ``n >= 2 MIN_PART``.
    Fixed by ``n`` and ``chunk``: the same split on every machine, whatever its cores."""
    if device.type == "cpu":
        n_parts = -(-n // max(chunk // 2, 1))
        if n >= 2 * MIN_PART:
            n_parts = max(n_parts, 2)
    else:
        n_parts = -(-n // chunk)
    cuts = np.linspace(0, n, n_parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


MAX_WORKERS = 2


def _cpu_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                               # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def run_parallel(fn, jobs: list, device: torch.device) -> list:
    """``[fn(j) for j in jobs]``; on the CPU, when torch runs one intra-op thread (as inside
    :func:`expkit.kernels.device.single_thread`), in up to ``MAX_WORKERS`` Python threads (at most the
    cores available): torch releases the GIL inside its operations, so two parts use two cores without
    OpenMP's spinning workers. Each part computes the same as alone: results do not depend on the threads."""
    one_thread = torch.get_num_threads() == 1
    workers = min(len(jobs), _cpu_workers()) if device.type == "cpu" and one_thread else 1
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, jobs))
