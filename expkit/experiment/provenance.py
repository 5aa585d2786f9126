"""Provenance of method calls (the entries of ``history.jsonl``) and what ``resume=True`` skips.

An entry: ``time``, ``method``, ``kind``, ``modality``, ``samples``, ``params`` (as given), ``resolved`` (every
parameter of the function with its default filled in), ``fingerprint`` (a hash of ``resolved``; arrays and
tables by content), ``seed``, ``device``, ``seconds``, ``host``, ``versions`` (expkit, Python and the main
dependencies), ``status`` ("ok" or "failed: ..."), ``keys`` ({sample: the keys the call added or replaced, as
"slot:key"}) and ``executor``.

``resume=True`` skips a sample when the log (saved or since the last save) has an "ok" entry of the same method
on the same modality with the same fingerprint for it, and the sample still has every key that entry wrote
(checked on the manifest's cached summary, so a skipped sample is never read).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import platform
import socket
import time
from functools import lru_cache

import numpy as np
import pandas as pd

from .. import __version__
from .._settings import settings

SLOTS = ("obs", "var", "obsm", "obsp", "layers", "varm", "uns")
_DEPENDENCIES = ("numpy", "scipy", "pandas", "anndata", "mudata", "torch", "scikit-learn", "h5py")


@lru_cache(maxsize=1)
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"expkit": __version__, "python": platform.python_version()}
    for name in _DEPENDENCIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _json_safe(value, depth: int = 0):
    """A JSON value for the log: numbers, strings, lists, dicts as they are; arrays, frames and objects as a
    short description with a content hash."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)) and depth < 4 and len(value) <= 1000:
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, dict) and depth < 4 and len(value) <= 1000:
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"ndarray": list(value.shape), "dtype": str(value.dtype), "sha1": _sha1(value)}
    if isinstance(value, (pd.DataFrame, pd.Series)):
        frame = value.to_frame() if isinstance(value, pd.Series) else value
        digest = hashlib.sha1(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes()).hexdigest()
        return {type(value).__name__: list(value.shape), "sha1": digest}
    if hasattr(value, "n_obs") and hasattr(value, "obs_names"):  # an AnnData (e.g. a reference)
        return {"AnnData": [int(value.n_obs), int(value.n_vars)],
                "sha1": hashlib.sha1("".join(map(str, value.obs_names[:1000])).encode()).hexdigest()}
    if callable(value):
        return {"callable": f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"}
    return {type(value).__name__: repr(value)[:200]}


def _sha1(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    try:
        return hashlib.sha1(a.view(np.uint8)).hexdigest()
    except (TypeError, ValueError):  # object arrays
        return hashlib.sha1(repr(a.tolist()).encode()).hexdigest()


def resolved(func, kwargs: dict) -> dict:
    """Every keyword parameter of ``func`` with the value it will get (given, else the default); the seed
    default (None) is resolved to ``settings.seed``."""
    out = {}
    for name, p in inspect.signature(func).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in ("adata", "adatas", "image_store", "integrated"):
            continue
        if name in kwargs:
            out[name] = kwargs[name]
        elif p.default is not p.empty:
            out[name] = p.default
    for name, v in kwargs.items():
        out.setdefault(name, v)
    if "seed" in out and out["seed"] is None:
        out["seed"] = settings.seed
    return {k: _json_safe(v) for k, v in out.items() if k not in ("image_store", "integrated")}


def fingerprint(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def snapshot(adata) -> dict:
    """Key -> identity of the value, per slot (obs / var columns by name only)."""
    if adata is None:
        return {}
    out = {"obs": {str(k): None for k in adata.obs.columns}, "var": {str(k): None for k in adata.var.columns}}
    for slot in ("obsm", "obsp", "layers", "varm", "uns"):
        out[slot] = {str(k): id(v) for k, v in getattr(adata, slot).items()}
    return out


def changed_keys(before: dict, adata) -> list[str]:
    """``slot:key`` of the keys added, or (for the mapping slots) whose value was replaced."""
    after = snapshot(adata)
    keys = []
    for slot, items in after.items():
        old = before.get(slot, {})
        keys += [f"{slot}:{k}" for k, ident in items.items() if k not in old or (ident is not None and old[k] != ident)]
    return keys


def entry(*, name, kind, modality, samples, given, params, seconds, status, keys, executor="serial") -> dict:
    seed = params.get("seed", settings.seed)
    use_gpu = params.get("use_gpu")
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": name, "kind": kind, "modality": modality,
            "samples": ["integrated" if s is None else s for s in samples],
            "params": {k: _json_safe(v) for k, v in given.items()}, "resolved": params,
            "fingerprint": fingerprint(params), "seed": seed,
            "device": "cuda" if use_gpu else settings.device if settings.device != "auto" else "cpu",
            "seconds": round(float(seconds), 3), "host": socket.gethostname(), "versions": versions(),
            "status": status, "keys": keys, "executor": executor}


def done_samples(expm, modality: str, name: str, fp: str, targets: list) -> set:
    """The targets ``resume=True`` skips (module doc)."""
    from . import saving

    log = saving.read_history(expm.path) + list(expm._history)
    done = set()
    for e in log:
        if e.get("method") != name or e.get("modality") != modality or e.get("fingerprint") != fp:
            continue
        if e.get("status") != "ok":
            continue
        for s, keys in (e.get("keys") or {}).items():
            if s in targets and _has_keys(expm, modality, s, keys):
                done.add(s)
    return done


def _has_keys(expm, modality: str, sample: str, keys: list[str]) -> bool:
    if (modality, sample) in expm._adatas:
        summary = {slot: dict.fromkeys(v) for slot, v in snapshot(expm._adatas[(modality, sample)]).items()}
    else:
        summary = expm._manifest.get("modalities", {}).get(modality, {}).get(sample, {}).get("summary", {})
    for key in keys:
        slot, _, k = key.partition(":")
        if k not in (summary.get(slot) or {}):
            return False
    return True
