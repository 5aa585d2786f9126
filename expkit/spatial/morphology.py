"""Morphological embeddings of segmented objects (Phenocoder): image patches, a conditional VAE, encoding.

``image_patches`` (per sample) cuts a patch centred on every object (``obsm['spatial']``) out of the sample's
images, read window by window through the image store (per z-slice for 3-D stacks), and records the intensity
limits used for scaling; ``train_patch_cvae`` (joint over samples) trains the conditional convolutional VAE of
:mod:`expkit.kernels.phenocoder` and stores it in every sample; ``encode_patches`` (per sample) writes the
posterior means, optionally averaged over the objects within a radius (spatial message passing).
The intensity scaling is fixed once by ``image_patches`` (per sample, or global over the samples trained
together) and the model records it, so encoding uses exactly the scaling of training.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import __version__
from .._logging import logger
from .._settings import settings
from ..errors import InputError, KeyNotFoundError
from ..kernels import phenocoder as K
from ..kernels import spatial_graph as _sg
from ..kernels.device import resolve_device
from ..kernels.spacon import check_memory
from . import _patches as P

__all__ = ["image_patches", "train_patch_cvae", "encode_patches"]


def _sample(adata, sample=None):
    if sample is not None:
        return sample
    return str(adata.obs["sample"].iloc[0]) if "sample" in adata.obs and adata.n_obs else None


def _xy(adata, sample, what):
    if "spatial" not in adata.obsm:
        raise KeyNotFoundError(f"{what}, sample {sample!r}: obsm['spatial'] (object centres) not found")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise InputError(f"{what}, sample {sample!r}: obsm['spatial'] must be finite (n, 2) coordinates")
    return xy[:, :2]


# --------------------------------------------------------------------------------------------
# image_patches
# --------------------------------------------------------------------------------------------
def _z_groups(adata, channels, z_key, sample):
    """[(channel spec, object indices)]: one group, or one per z value (``{z}`` in ``channels``)."""
    if z_key is None:
        if "{z}" in channels:
            raise InputError(f"image_patches, sample {sample!r}: channels {channels!r} name '{{z}}' but z_key is None")
        return [(channels, np.arange(adata.n_obs))]
    if z_key not in adata.obs:
        raise KeyNotFoundError(f"image_patches, sample {sample!r}: obs[{z_key!r}] (z-slice) not found")
    if "{z}" not in channels:
        raise InputError(f"image_patches, sample {sample!r}: with z_key, channels must name the slice as "
                         f"'{{z}}' (e.g. 'stack_z{{z}}/dapi'), not {channels!r}")
    z = adata.obs[z_key].to_numpy()
    return [(channels.replace("{z}", str(v)), np.nonzero(z == v)[0]) for v in pd.unique(z)]


def image_patches(adata, *, channels: str = "fullres/r,g,b", patch_size=(32, 32), scale_per_sample: bool = True,
                  scale_percentile: float = 1.0, z_key: str | None = None, tile: int = 1024,
                  max_memory: int | None = None, sample: str | None = None, image_store=None,
                  key_added: str = "patches") -> dict:
    """Cut a ``patch_size`` (rows, cols; image pixels, multiples of 8) patch centred on every object.

    ``channels``: ``"image/c1,c2"`` (several, e.g. ``"IF/dapi,IF/actin"``: all from one image); for 3-D stacks
    stored one image per slice, a template with ``{z}`` and ``z_key`` the obs column of the slice (the patch
    of an object comes from its own slice). Objects are ``obsm['spatial']`` (x, y full-resolution units).
    Pixels beyond the image are 0. ``scale_percentile``: intensities are later scaled to [0, 1] between the
    ``p`` and ``100 - p`` percentiles per channel: of this sample (``scale_per_sample=True``) or of all
    samples trained together (False); the limits of this sample are recorded here.

    Writes ``obsm[key_added]`` (n x C*h*w, the image's dtype, unscaled) and ``uns[key_added] = {"params",
    "version", "shape", "channels", "lo", "hi"}``; returns ``{"n_objects", "shape", "lo", "hi", "seconds"}``.
    Refused with ResourceError when the patches would not fit in ``max_memory`` bytes (default: free memory).
    """
    t0 = time.perf_counter()
    what = "image_patches"
    h, w = (int(v) for v in patch_size)
    if h < 8 or w < 8 or h % 8 or w % 8:
        raise InputError(f"{what}: patch_size must be two multiples of 8, not {patch_size!r}")
    if not 0.0 <= float(scale_percentile) < 50.0:
        raise InputError(f"{what}: scale_percentile must lie in [0, 50), not {scale_percentile}")
    sample = _sample(adata, sample)
    xy = _xy(adata, sample, what)
    source = P.source_for(adata, image_store, sample, what)
    groups = _z_groups(adata, channels, z_key, sample)
    specs = [P.resolve(source, spec, sample, what) for spec, _ in groups]
    names = specs[0][2]
    if any(s[2] != names for s in specs):
        raise InputError(f"{what}, sample {sample!r}: every z-slice must have the channels {names}")
    check_memory(8 * adata.n_obs * len(names) * h * w, resolve_device(False), max_memory,
                 f"{what} on sample {sample!r}")
    out = None
    for (image, spec, _), (_, idx) in zip(specs, groups):  # a loop over z-slices
        got = P.read_patches(source, image, spec, len(names), xy[idx], (h, w), tile=int(tile))
        if out is None:
            out = np.zeros((adata.n_obs, len(names), h, w), dtype=got.dtype)
        out[idx] = got
    lo, hi = P.scale_limits(out, float(scale_percentile))
    adata.obsm[key_added] = out.reshape(adata.n_obs, -1)
    adata.uns[key_added] = {
        "params": {"channels": channels, "patch_size": [h, w], "scale_per_sample": bool(scale_per_sample),
                   "scale_percentile": float(scale_percentile), "z_key": z_key or "none", "tile": int(tile)},
        "version": __version__, "shape": [len(names), h, w], "channels": names, "lo": lo, "hi": hi}
    secs = time.perf_counter() - t0
    logger.info("image_patches sample %r: %d patches of %d x %d x %d in %.2f s", sample, adata.n_obs,
                len(names), h, w, secs)
    return {"n_objects": int(adata.n_obs), "shape": [len(names), h, w], "lo": lo, "hi": hi, "seconds": secs}


# --------------------------------------------------------------------------------------------
# train_patch_cvae
# --------------------------------------------------------------------------------------------
def _patch_entry(adata, key, sample, what):
    if key not in adata.obsm or not isinstance(adata.uns.get(key), dict):
        raise KeyNotFoundError(f"{what}, sample {sample!r}: obsm/uns[{key!r}] not found: run image_patches first")
    return adata.uns[key]


def _as_dict(adatas) -> dict:
    if isinstance(adatas, Mapping):
        if not adatas:
            raise InputError("train_patch_cvae needs at least one sample")
        return dict(adatas)
    return {_sample(adatas) or "sample": adatas}


def _conditions(adatas: dict, conditions, categories=None):
    """One-hot codes of the obs columns ``conditions`` (``"sample"``: the sample name when the column is
    absent) over ``categories`` ({column: [values]}, default: the values seen)."""
    cols = {}
    for c in conditions:
        vals = []
        for name, ad in adatas.items():
            if c in ad.obs:
                vals.append(ad.obs[c].astype(str).to_numpy())
            elif c == "sample":
                vals.append(np.full(ad.n_obs, str(name)))
            else:
                raise KeyNotFoundError(f"condition obs[{c!r}] not found in sample {name!r}")
        cols[c] = np.concatenate(vals) if vals else np.zeros(0, str)
    cats = categories or {c: sorted(pd.unique(v).tolist()) for c, v in cols.items()}
    blocks = []
    for c, v in cols.items():
        codes = pd.Categorical(v, categories=cats[c]).codes
        if (codes < 0).any():
            bad = sorted(set(v[codes < 0].tolist()))[:5]
            raise InputError(f"condition {c!r}: values {bad} were not seen in training (known: {cats[c]})")
        blocks.append(np.eye(len(cats[c]), dtype=np.float32)[codes])
    n = sum(ad.n_obs for ad in adatas.values())
    return (np.concatenate(blocks, 1) if blocks else np.zeros((n, 0), np.float32)), cats


def _scaled(adatas: dict, key: str, mode_global: bool, limits=None):
    """Scaled patches of all samples (n, C, h, w) and the limits used ({sample: (lo, hi)} or global)."""
    entries = {s: ad.uns[key] for s, ad in adatas.items()}
    shape = tuple(next(iter(entries.values()))["shape"])
    raw = {s: np.asarray(ad.obsm[key]).reshape((ad.n_obs,) + shape) for s, ad in adatas.items()}
    if mode_global:
        if limits is None:
            pct = next(iter(entries.values()))["params"]["scale_percentile"]
            limits = P.scale_limits(np.concatenate(list(raw.values())), pct)
        lo, hi = limits
        x = np.concatenate([P.apply_scale(r, lo, hi) for r in raw.values()])
        return x, {"global": [list(lo), list(hi)]}
    x = np.concatenate([P.apply_scale(raw[s], entries[s]["lo"], entries[s]["hi"]) for s in raw])
    return x, {s: [list(e["lo"]), list(e["hi"])] for s, e in entries.items()}


def _check_patches(adatas, key, what):
    entries = {s: _patch_entry(ad, key, s, what) for s, ad in adatas.items()}
    first = next(iter(entries.values()))
    for s, e in entries.items():
        for field in ("shape", "channels"):
            if list(e[field]) != list(first[field]):
                raise InputError(f"{what}: sample {s!r} has patch {field} {e[field]}, others {first[field]}")
        for p in ("scale_per_sample", "scale_percentile"):
            if e["params"][p] != first["params"][p]:
                raise InputError(f"{what}: sample {s!r} was cut with {p}={e['params'][p]}, others with "
                                 f"{first['params'][p]}: run image_patches with the same scaling on all")
    return first


def _check_training(what, n_latent_dim, n_dense_dim, epochs, batch_size, filters, schedule, beta, kl_warmup,
                    weight_decay, val_fraction) -> list:
    """The training settings checked (an InputError naming the bad one); returns ``filters`` as ints."""
    if int(n_latent_dim) < 1 or int(n_dense_dim) < 1 or int(epochs) < 1 or int(batch_size) < 1:
        raise InputError(f"{what}: n_latent_dim, n_dense_dim, epochs and batch_size must be positive")
    filters = [int(f) for f in filters]
    if len(filters) != 3 or min(filters) < 1:
        raise InputError(f"{what}: filters must be three positive widths, not {filters}")
    if schedule not in ("onecycle", "plateau"):
        raise InputError(f"{what}: schedule must be 'onecycle' or 'plateau', not {schedule!r}")
    if float(beta) < 0 or int(kl_warmup) < 0 or float(weight_decay) < 0:
        raise InputError(f"{what}: beta, kl_warmup and weight_decay must be >= 0")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise InputError(f"{what}: val_fraction must lie in [0, 1), not {val_fraction}")
    return filters


def train_patch_cvae(adatas, *, n_latent_dim: int = 16, n_dense_dim: int = 128, conditions=("sample",),
                     epochs: int = 60, batch_size: int = 64, lr: float = 1e-3, beta: float = 1.0,
                     val_fraction: float = 0.1, patience: int = 10, lr_patience: int = 2,
                     patches_key: str = "patches", seed: int | None = None, use_gpu: bool = False,
                     max_memory: int | None = None, filters=K.FILTERS, residual: bool = False,
                     augment: bool = True, kl_warmup: int = 5, schedule: str = "onecycle",
                     weight_decay: float = 1e-4, key_added: str = "phenocoder") -> dict:
    """Train Phenocoder's conditional convolutional VAE (:mod:`expkit.kernels.phenocoder`) on the patches
    of all samples given (``{sample: AnnData}`` or one AnnData), jointly.

    ``conditions``: obs columns one-hot coded as the condition (``"sample"`` works without a column; e.g.
    ``["sample", "z"]``); ``n_latent_dim``/``n_dense_dim``: latent and dense widths; ``filters``: the widths
    of the three stride-2 convolutions, ``residual``: a residual block at the coarsest level; ``beta``: the
    KL weight relative to the ELBO of a per-pixel Gaussian of standard deviation 0.03 (reached after
    ``kl_warmup`` epochs); ``augment``: random rotations by 90
    degrees and mirror images of the patches; ``epochs`` at most, with early stopping after ``patience``
    epochs without a better validation loss (``val_fraction`` of the patches held out, seeded);
    ``schedule``: ``"onecycle"`` (warm-up then cosine annealing of AdamW's ``lr`` over ``epochs``) or
    ``"plateau"`` (``lr`` halved after ``lr_patience`` epochs without improvement). Intensities are scaled as
    ``image_patches`` recorded (per sample, or with limits pooled over these samples), then standardised
    per channel by the network (statistics of the training patches, stored with the weights).

    Writes ``uns[key_added]`` in every sample: ``params``, ``config``, ``state`` (the weights as arrays),
    ``scaling`` (mode and limits), ``categories``, ``history``. Returns the history (``train``, ``val``,
    ``val_rec`` losses per epoch, ``lr``, ``best_epoch``, ``stopped_early``) and ``seconds``.
    """
    t0 = time.perf_counter()
    adatas = _as_dict(adatas)
    what = "train_patch_cvae"
    first = _check_patches(adatas, patches_key, what)
    filters = _check_training(what, n_latent_dim, n_dense_dim, epochs, batch_size, filters, schedule, beta,
                              kl_warmup, weight_decay, val_fraction)
    seed = settings.seed if seed is None else int(seed)
    conditions = [conditions] if isinstance(conditions, str) else list(conditions or [])
    device = resolve_device(use_gpu)
    n = sum(ad.n_obs for ad in adatas.values())
    shape = tuple(first["shape"])
    check_memory(K.estimate_memory(n, shape, int(batch_size), int(n_latent_dim), int(n_dense_dim), filters),
                 device, max_memory, f"{what} on samples {list(adatas)}")
    cond, cats = _conditions(adatas, conditions)
    mode_global = not first["params"]["scale_per_sample"]
    x, limits = _scaled(adatas, patches_key, mode_global)
    net, hist = K.train_cvae(x, cond, n_latent=int(n_latent_dim), n_dense=int(n_dense_dim), epochs=int(epochs),
                             batch_size=int(batch_size), lr=float(lr), beta=float(beta),
                             val_fraction=float(val_fraction), patience=int(patience),
                             lr_patience=int(lr_patience), seed=seed, filters=filters, residual=bool(residual),
                             augment=bool(augment), kl_warmup=int(kl_warmup), schedule=schedule,
                             weight_decay=float(weight_decay), device=device)
    entry = {"params": {"n_latent_dim": int(n_latent_dim), "n_dense_dim": int(n_dense_dim),
                        "conditions": conditions, "epochs": int(epochs), "batch_size": int(batch_size),
                        "lr": float(lr), "beta": float(beta), "val_fraction": float(val_fraction),
                        "patience": int(patience), "lr_patience": int(lr_patience), "patches_key": patches_key,
                        "seed": seed, "use_gpu": bool(use_gpu), "samples": list(adatas), "filters": filters,
                        "residual": bool(residual), "augment": bool(augment), "kl_warmup": int(kl_warmup),
                        "schedule": schedule, "weight_decay": float(weight_decay)},
             "version": __version__, "config": net.config(), "state": K.state_to_numpy(net),
             "scaling": {"global": bool(mode_global), "percentile": float(first["params"]["scale_percentile"]),
                         "channels": list(first["channels"]), "limits": limits},
             "categories": cats, "history": {k: v for k, v in hist.items() if k != "val_index"}}
    for ad in adatas.values():
        ad.uns[key_added] = entry
    secs = time.perf_counter() - t0
    logger.info("train_patch_cvae: %d patches, %d epochs (best %d), %.1f s", n, len(hist["train"]),
                hist["best_epoch"] + 1, secs)
    return {**hist, "seconds": secs}


# --------------------------------------------------------------------------------------------
# encode_patches
# --------------------------------------------------------------------------------------------
def _model(adata, model_key, sample, what):
    entry = adata.uns.get(model_key)
    if not isinstance(entry, dict) or "state" not in entry:
        raise KeyNotFoundError(f"{what}, sample {sample!r}: no model in uns[{model_key!r}]: run train_patch_cvae")
    return entry


def _check_scaling(entry, pentry, sample, what):
    sc = entry["scaling"]
    if list(pentry["channels"]) != list(sc["channels"]) or list(pentry["shape"]) != list(entry["config"]["shape"]):
        raise InputError(f"{what}, sample {sample!r}: patches {pentry['channels']} {pentry['shape']} differ from "
                         f"the model's {sc['channels']} {entry['config']['shape']}")
    if bool(not pentry["params"]["scale_per_sample"]) != bool(sc["global"]) or \
            float(pentry["params"]["scale_percentile"]) != float(sc["percentile"]):
        raise InputError(f"{what}, sample {sample!r}: the patches were scaled with scale_per_sample="
                         f"{pentry['params']['scale_per_sample']}, percentile {pentry['params']['scale_percentile']}"
                         f" but the model was trained with scale_per_sample={not sc['global']}, percentile "
                         f"{sc['percentile']}: the scaling must be the same at train and encode time")
    if sc["global"]:
        return sc["limits"]["global"]
    known = sc["limits"].get(sample)
    if known is not None and not np.allclose(known, [pentry["lo"], pentry["hi"]]):
        raise InputError(f"{what}, sample {sample!r}: its patches were re-cut with other intensity limits than "
                         f"the model was trained on; train again or cut them as before")
    return [pentry["lo"], pentry["hi"]]


def _message_passing(z, xy, radius, device):
    """Mean of the latents of the objects within ``radius`` (self included)."""
    r, c, _ = _sg.radius_edges(xy, float(radius), device)
    n = z.shape[0]
    a = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, n)) + sp.identity(n, format="csr")
    a.data[:] = 1.0
    deg = np.asarray(a.sum(1)).ravel()
    return (sp.diags(1.0 / deg) @ a @ z).astype(np.float32), float(deg.mean() - 1)


def encode_patches(adata, *, model_key: str = "phenocoder", patches_key: str = "patches",
                   message_passing_radius: float | None = None, use_gpu: bool = False, sample: str | None = None,
                   key_added: str = "pheno") -> dict:
    """Posterior means of the patches under the model in ``uns[model_key]`` -> ``obsm[key_added]``.

    The intensity scaling is the model's (checked against how the patches were cut: same channels, patch
    shape, per-sample or global scaling, percentile). ``message_passing_radius``: each object's latent
    replaced by the mean over the objects within that distance in ``obsm['spatial']`` units (itself
    included), a neighbourhood view of morphology. Also writes ``uns[key_added]`` (params); returns
    ``{"n_objects", "mean_neighbours"}``.
    """
    what = "encode_patches"
    sample = _sample(adata, sample)
    entry = _model(adata, model_key, sample, what)
    pentry = _patch_entry(adata, patches_key, sample, what)
    lo, hi = _check_scaling(entry, pentry, sample, what)
    if message_passing_radius is not None and not float(message_passing_radius) > 0:
        raise InputError(f"{what}: message_passing_radius must be positive or None")
    xy = _xy(adata, sample, what) if message_passing_radius is not None else None
    cond, _ = _conditions({sample or "sample": adata}, entry["params"]["conditions"], entry["categories"])
    device = resolve_device(use_gpu)
    net = K.net_from_state(entry["config"], entry["state"], device)
    x = P.apply_scale(np.asarray(adata.obsm[patches_key]).reshape((adata.n_obs,) + tuple(pentry["shape"])), lo, hi)
    z = K.encode(net, x, cond, device)
    mean_nb = 0.0
    if message_passing_radius is not None:
        z, mean_nb = _message_passing(z, xy, message_passing_radius, device)
    adata.obsm[key_added] = z.astype(np.float32)
    adata.uns[key_added] = {"params": {"model_key": model_key, "patches_key": patches_key,
                                       "message_passing_radius": "none" if message_passing_radius is None
                                       else float(message_passing_radius)}, "version": __version__}
    return {"n_objects": int(adata.n_obs), "mean_neighbours": mean_nb}
