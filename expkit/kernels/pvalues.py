"""p-values in log space for the score tests: the chi-square survival function without underflow,
Satterthwaite's scaled chi-square, the Cauchy combination of per-kernel p-values and Benjamini-Hochberg
(numpy arrays in, natural-log p-values out)."""
from __future__ import annotations

import math

import numpy as np
from scipy import special

__all__ = ["chi2_logsf", "satterthwaite_logp", "cauchy_combine_logp", "bh_adjust_log"]


def _log_gammaincc_cf(a: np.ndarray, x: np.ndarray, n_iter: int = 300) -> np.ndarray:
    """``log Q(a, x)`` by the continued fraction of the upper incomplete gamma (modified Lentz),
    valid for ``x > a + 1``; no underflow."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = np.full_like(x, 1.0 / tiny)
    d = 1.0 / b
    h = d.copy()
    for i in range(1, n_iter + 1):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = b + an / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-16):
            break
    return -x + a * np.log(x) - special.gammaln(a) + np.log(h)


def chi2_logsf(x, df) -> np.ndarray:
    """``log P(chi2(df) > x)`` without underflow (scipy where representable, a continued fraction
    in the far tail)."""
    x = np.asarray(x, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    x, df = np.broadcast_arrays(x, df)
    a, h = df / 2.0, x / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = special.gammaincc(a, np.maximum(h, 0.0))
        out = np.log(q)
    out = np.where(h <= 0, 0.0, out)
    tail = (q < 1e-250) & (h > a + 1.0) & np.isfinite(h) & np.isfinite(a)
    if np.any(tail):
        out = out.copy()
        out[tail] = _log_gammaincc_cf(a[tail], h[tail])
    return np.where(np.isfinite(x) & np.isfinite(df) & (df > 0), out, np.nan)


def satterthwaite_logp(U, e, I):
    """log p of the scaled chi-square approximation ``U / kappa ~ chi2(nu)``."""
    U, e, I = (np.asarray(v, dtype=np.float64) for v in (U, e, I))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = I / (2.0 * e)
        nu = 2.0 * e ** 2 / I
        logp = chi2_logsf(U / kappa, nu)
    bad = ~((e > 0) & (I > 0))
    return np.where(bad, np.nan, logp), kappa, nu


def cauchy_combine_logp(logp: np.ndarray) -> np.ndarray:
    """log of the Cauchy combination ``P(Cauchy > mean_k tan((1/2 - p_k) pi))`` of per-kernel p-values
    (rows: genes, columns: kernels), stable for p-values far below the double range.

    ``tan((1/2 - p) pi) = cot(p pi)``, ~ ``1 / (p pi)`` for small p: those terms are handled in log
    space, and ``P(Cauchy > T) = atan(1 / T) / pi`` ~ ``1 / (pi T)`` for large ``T``.
    """
    logp = np.asarray(logp, dtype=np.float64)
    k = logp.shape[1]
    small = logp < -30.0                           # cot(p pi) = 1/(p pi) to ~1e-27 relative
    p = np.exp(np.where(small, 0.0, logp))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = np.where(small, 0.0, 1.0 / np.tan(p * math.pi))
        logterm = np.where(small, -logp - math.log(math.pi), -np.inf)
        mlog = logterm.max(1)
        has_big = np.isfinite(mlog)
        mref = np.where(has_big, mlog, 0.0)
        # T = (sum_big exp(logterm) + sum_rest terms) / k, scaled by exp(-mref)
        scaled = np.exp(logterm - mref[:, None]).sum(1) + terms.sum(1) * np.exp(-mref)
        logT = np.where(has_big, mref + np.log(np.maximum(scaled, 1e-300)) - math.log(k), np.nan)
        T = terms.sum(1) / k
        direct = np.log(np.clip(0.5 - np.arctan(T) / math.pi, 0.0, 1.0))
        # T > 1e15 from ordinary terms: use the tail form as well
        bigT = ~has_big & (T > 1e10)
        direct = np.where(bigT, np.log(np.arctan(1.0 / np.where(bigT, T, 1.0)) / math.pi), direct)
        out = np.where(has_big, np.log(np.arctan(np.exp(-np.minimum(logT, 700.0))) / math.pi), direct)
        out = np.where(has_big & (logT > 30.0), -logT - math.log(math.pi), out)
    return np.where(np.isnan(logp).any(1), np.nan, np.minimum(out, 0.0))


def bh_adjust_log(logp: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg on log p-values (NaN entries excluded from the correction and kept NaN)."""
    logp = np.asarray(logp, dtype=np.float64)
    out = np.full_like(logp, np.nan)
    ok = np.isfinite(logp) | (logp == -np.inf)
    ok &= ~np.isnan(logp)
    v = logp[ok]
    m = v.size
    if m == 0:
        return out
    order = np.argsort(v, kind="stable")
    adj = v[order] + math.log(m) - np.log(np.arange(1, m + 1))
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 0.0)
    out[ok] = res
    return out
