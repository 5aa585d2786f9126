"""Summaries of AnnData objects with dtype tags, as cached in the manifest and printed by ``print(expm)``."""
from __future__ import annotations

import pandas as pd
import scipy.sparse as sp

_SHORT = {"int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "uint16": "u16",
          "uint32": "u32", "uint64": "u64", "float16": "f16", "float32": "f32", "float64": "f64", "bool": "bool"}
SLOTS = ("obs", "var", "layers", "obsm", "varm", "obsp", "uns")


def dtype_tag(value) -> str:
    """A short tag for a column or array: ``<cat>``, ``<f32>``, ``<arr:f64(35)>``, ``<csr:f32>``."""
    if isinstance(value, pd.Series):
        if isinstance(value.dtype, pd.CategoricalDtype):
            return "<cat>"
        name = str(value.dtype)
        return f"<{_SHORT.get(name, 'o' if name in ('object', 'string', 'str') else name)}>"
    if isinstance(value, pd.DataFrame):
        return f"<df({value.shape[1]})>"
    if sp.issparse(value):
        return f"<{value.format}:{_SHORT.get(str(value.dtype), str(value.dtype))}>"
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        dt = _SHORT.get(str(value.dtype), "o")
        if len(value.shape) == 2:
            return f"<arr:{dt}({value.shape[1]})>"
        if len(value.shape) == 1:
            return f"<{dt}>"
        return f"<arr:{dt}{tuple(value.shape[1:])}>"
    return f"<{type(value).__name__}>"


def summarize(adata) -> dict:
    """Shape and, per slot, ``{key: tag}`` (uns keys have no tag)."""
    out = {"n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars)}
    out["X"] = dtype_tag(adata.X) if adata.X is not None else None
    out["obs"] = {str(k): dtype_tag(adata.obs[k]) for k in adata.obs.columns}
    out["var"] = {str(k): dtype_tag(adata.var[k]) for k in adata.var.columns}
    for slot in ("layers", "obsm", "varm", "obsp"):
        out[slot] = {str(k): dtype_tag(v) for k, v in getattr(adata, slot).items()}
    out["uns"] = {str(k): "" for k in adata.uns.keys()}
    return out


def merge_keys(summaries: list[dict]) -> dict[str, dict[str, str]]:
    """Union of keys over samples, keeping the first tag seen."""
    keys: dict[str, dict[str, str]] = {s: {} for s in SLOTS}
    for summary in summaries:
        for slot in SLOTS:
            for k, tag in summary.get(slot, {}).items():
                keys[slot].setdefault(k, tag)
    return keys


def format_keys(keys: dict[str, dict[str, str]], indent: str = "  ", width: int = 100) -> list[str]:
    """Lines like ``obs    : sample <cat> batch <cat>``, wrapped at ``width``."""
    lines = []
    for slot in SLOTS:
        items = [f"{k} {t}".strip() for k, t in keys.get(slot, {}).items()]
        if not items:
            continue
        head = f"{indent}{slot:<7}: "
        line = head
        for item in items:
            if len(line) + len(item) + 1 > width and line.strip() != head.strip():
                lines.append(line.rstrip())
                line = " " * len(head)
            line += item + " "
        lines.append(line.rstrip())
    return lines


def format_adata(adata, title: str) -> str:
    """``view(sample)`` text: a title, the shape and the keys with tags."""
    summary = summarize(adata)
    lines = [f"{title}: {summary['n_obs']} x {summary['n_vars']} (obs x var)"]
    if summary["X"]:
        lines.append(f"  X      : {summary['X']}")
    lines += format_keys(merge_keys([summary]))
    return "\n".join(lines)


def size_text(summary: dict) -> str:
    return f"{summary['n_obs']} x {summary['n_vars']}"


def as_html(text: str) -> str:
    import html

    return f"<pre style='font-size: 12px; line-height: 1.3'>{html.escape(text)}</pre>"
