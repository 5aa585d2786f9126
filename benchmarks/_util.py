"""Shared helpers of the benchmark scripts: timing with peak memory, and the shared data location."""
from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def _peak_rss():
    """Yield a one-item list that holds, once the block ends, the peak resident memory (MiB) while it ran."""
    peak = [rss_mb()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_mb())


def timed(fn):
    """``(fn(), seconds, peak MiB above the start)``, printing nothing (for scripts whose stdout is data)."""
    start = rss_mb()
    with _peak_rss() as peak:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, dt, peak[0] - start


@contextmanager
def measure(label: str, results: list | None = None):
    """Print wall time and the peak resident memory above the starting point while the block ran."""
    start_rss = rss_mb()
    info: dict = {}
    with _peak_rss() as peak:
        t0 = time.perf_counter()
        try:
            yield info
        finally:
            dt = time.perf_counter() - t0
    extra = " ".join(f"{k}={v}" for k, v in info.items())
    print(f"{label:<48} {dt:8.2f} s   peak +{peak[0] - start_rss:8.1f} MiB  {extra}", flush=True)
    if results is not None:
        results.append((label, dt, peak[0] - start_rss, info))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
