"""Depth normalisation and log transform."""
from __future__ import annotations

from .._logging import logger
from ..errors import InputError
from ..kernels.stats import normalize_total
from ._utils import get_matrix, looks_like_counts, uns_entry


def log_normalize(adata, *, key_source: str | None = "counts", key_norm: str | None = "norm",
                  key_lognorm: str = "lognorm", target_sum: float | None = None, set_X: bool = True) -> dict:
    """Scale each observation's counts to ``target_sum`` and take ``log1p``.

    ``layers[key_norm]`` = counts * target_sum / total (float32 CSR; skipped when ``key_norm`` is None),
    ``layers[key_lognorm]`` = log1p of it (float32 CSR). ``target_sum=None`` uses the median of the
    non-zero totals (as scanpy's ``normalize_total``). Observations without counts stay zero. The
    source layer (the raw counts) is not modified.

    ``set_X=True`` (default) also sets ``X`` to a copy of the log-normalised values, which is what
    scanpy-style code expects after normalisation; the raw counts stay in ``layers[key_source]``. With
    ``set_X=False`` ``X`` is left as it was. ``uns[key_lognorm]`` records the params and the
    ``target_sum`` used. Returns ``{"target_sum": ...}``.
    """
    x = get_matrix(adata, key_source)
    if target_sum is not None and not target_sum > 0:
        raise InputError(f"log_normalize: target_sum must be positive, not {target_sum}")
    if not looks_like_counts(x):
        logger.warning(f"log_normalize: layer {key_source!r} does not look like raw counts (non-integer or "
                       "negative values)")
    norm, lognorm, used = normalize_total(x, target_sum)
    if key_norm is not None:
        adata.layers[key_norm] = norm
    else:
        del norm
    adata.layers[key_lognorm] = lognorm
    if set_X:
        adata.X = lognorm.copy()
    adata.uns[key_lognorm] = uns_entry({"key_source": key_source, "key_norm": key_norm, "target_sum": target_sum,
                                        "set_X": set_X}, target_sum=float(used))
    return {"target_sum": float(used)}
