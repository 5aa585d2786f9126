"""Per-crop image features: square crops around many centres of one image, summarised in batches.

Arrays in, arrays out (no AnnData, no I/O); the same code runs on the CPU and on CUDA. Crops are
gathered with index arithmetic (an index grid offset per centre, torch advanced indexing), never with a
Python loop over crops; the loops are over batches of crops, GLCM distances and angles only.

Geometry (the pixel convention of :mod:`expkit.io.images`: pixel ``[row, col]`` is centred at image
coordinate ``(col, row)``): a crop of side ``s`` around the centre ``(col, row)`` holds the pixels
``r0 .. r0 + s - 1`` with ``r0 = floor(row - (s - 1) / 2 + 0.5)`` (likewise for columns), i.e. the ``s``
pixels best covering ``[row - s/2, row + s/2]``. A crop reaching outside the image is filled by
**reflection** about the border pixels (numpy's ``"reflect"`` mode: ``-1 -> 1``, ``H -> H - 2``, applied
periodically for crops larger than the image) and flagged in ``outside``: its features are computed
from mirrored tissue rather than from a zero band, but should be treated with care.

Feature families (float64 inside, float32 out):

* ``"summary"``: per channel the mean, the standard deviation (population, ``ddof=0``) and the
  quantiles 0.1, 0.5, 0.9 of the crop's pixels (linear interpolation, numpy's default).
* ``"histogram"``: per channel the fractions of the crop's pixels in ``bins`` equal bins over the
  channel's value range: 0..255 (uint8), 0..65535 (uint16), the image's min..max per channel (float),
  or ``value_range``. The last bin is closed (numpy's ``histogram``); values outside go to the end bins.
  Integer images are binned in exact integer arithmetic: ``bin = (v - lo) * bins // (hi - lo)``.
* ``"texture"``: grey-level co-occurrence (Haralick) features of a grey image, the luminance
  ``0.299 r + 0.587 g + 0.114 b`` for 3 channels (taken as r, g, b in the given order), the channel for
  one, the channel mean otherwise, quantised to ``levels`` grey levels over the value range,
  ``q = min(levels - 1, floor(levels * (grey - lo) / (hi - lo)))`` (exact integer arithmetic for integer
  images). For each distance ``d`` (default 1, 2) and angle 0, pi/4, pi/2, 3 pi/4 the pixel pairs
  ``(r, c), (r + round(d sin a), c + round(d cos a))`` inside the crop (scikit-image's offsets) are counted
  into a symmetric GLCM normalised to sum 1, and the scikit-image ``graycoprops`` properties are taken:
  contrast ``sum P (i-j)^2``, dissimilarity ``sum P |i-j|``, homogeneity ``sum P / (1 + (i-j)^2)``,
  correlation ``sum P (i - mu_i)(j - mu_j) / (sd_i sd_j)`` (1 where a standard deviation is 0, as
  scikit-image does) and ASM ``sum P^2``. Each property is **averaged over the four angles** per distance
  (rotation invariant), so the family has 5 x len(distances) features.
* ``"segmentation"`` (not a default): from a label image on the intensity image's pixel grid (0 =
  background), per crop the number of distinct objects, the fraction of the crop's pixels they cover, the
  mean and standard deviation (``ddof=0``) of their areas inside the crop (objects cut by the crop count
  with their pixels inside it; NaN without objects) and per channel the mean intensity over all object
  pixels (NaN without objects). The squidpy flavor (:mod:`expkit.kernels.squidpy_features`) averages the
  objects' mean intensities instead, as squidpy does.

Feature names: ``"<channel>.mean|std|q10|q50|q90"``, ``"<channel>.hist<k>"`` and
``"<grey>.glcm.<prop>.d<d>"`` (props ``contrast, dissimilarity, homogeneity, correlation, asm``),
``"<labels>.count|fraction|area_mean|area_std"`` and ``"<channel>.objects_mean"``, each preceded by
``prefix`` (e.g. ``"s2:"`` for one of several crop scales).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError
from .device import resolve_device, single_thread
from .squidpy_features import label_tensor, object_stats

__all__ = ["FAMILIES", "ALL_FAMILIES", "GLCM_PROPS", "QUANTILES", "check_families", "crop_starts", "default_value_range",
           "feature_names", "crop_features"]

FAMILIES = ("summary", "histogram", "texture")  # the default families
ALL_FAMILIES = FAMILIES + ("segmentation",)
QUANTILES = (0.1, 0.5, 0.9)
ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "correlation", "asm")
_LUMA = (299, 587, 114)  # luminance weights x 1000, so integer images quantise exactly
_BUDGET = 1 << 22  # pixel values per batch of crops (x 8 bytes per float64 copy)


def check_families(features, valid: Sequence[str] = None) -> tuple[str, ...]:
    """The feature families asked for (a string or a sequence of strings), validated against ``valid``
    (default: this module's families) and put in ``valid``'s order."""
    valid = tuple(ALL_FAMILIES if valid is None else valid)
    if isinstance(features, str):
        features = [features]
    feats = tuple(dict.fromkeys(str(f) for f in features))
    bad = [f for f in feats if f not in valid]
    if bad or not feats:
        raise InputError(f"unknown image feature families {bad or list(features)}; valid: {list(valid)}")
    return tuple(f for f in valid if f in feats)


def default_value_range(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (lo, hi): the dtype's range for uint8/uint16 (any integer: 0..max), else min..max."""
    a = np.asarray(image)
    c = a.shape[2]
    if a.dtype == np.uint8:
        return np.zeros(c), np.full(c, 255.0)
    if a.dtype == np.uint16:
        return np.zeros(c), np.full(c, 65535.0)
    flat = a.reshape(-1, c).astype(np.float64)
    if flat.shape[0] == 0:
        return np.zeros(c), np.ones(c)
    return np.nanmin(flat, axis=0), np.nanmax(flat, axis=0)


def crop_starts(centres: np.ndarray, side: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First row and column of each crop and whether it leaves an image of ``shape`` (h, w)."""
    cr = np.asarray(centres, dtype=np.float64)
    if cr.ndim != 2 or cr.shape[1] != 2:
        raise InputError(f"crop centres must be an (n, 2) array of (col, row), got shape {cr.shape}")
    if not np.all(np.isfinite(cr)):
        raise InputError(f"{int((~np.isfinite(cr)).any(1).sum())} crop centres are not finite")
    half = (side - 1) / 2.0
    c0 = np.floor(cr[:, 0] - half + 0.5).astype(np.int64)
    r0 = np.floor(cr[:, 1] - half + 0.5).astype(np.int64)
    h, w = shape
    outside = (r0 < 0) | (c0 < 0) | (r0 + side > h) | (c0 + side > w)
    return r0, c0, outside


def feature_names(channels: Sequence[str], features=FAMILIES, *, bins: int = 10, distances=(1, 2),
                  grey: str = "grey", labels: str = "segmentation/label", prefix: str = "") -> list[str]:
    """Column names of :func:`crop_features`, in its order."""
    names: list[str] = []
    feats = check_families(features)
    if "summary" in feats:
        stats = ["mean", "std"] + [f"q{round(q * 100):02d}" for q in QUANTILES]
        names += [f"{prefix}{ch}.{s}" for ch in channels for s in stats]
    if "histogram" in feats:
        names += [f"{prefix}{ch}.hist{k}" for ch in channels for k in range(bins)]
    if "texture" in feats:
        names += [f"{prefix}{grey}.glcm.{p}.d{d}" for p in GLCM_PROPS for d in distances]
    if "segmentation" in feats:
        names += [f"{prefix}{labels}.{s}" for s in ("count", "fraction", "area_mean", "area_std")]
        names += [f"{prefix}{ch}.objects_mean" for ch in channels]
    return names


# --------------------------------------------------------------------------------------------
# the pieces, on a batch of crops (B, s, s, C)
# --------------------------------------------------------------------------------------------
def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices mirrored into 0..n-1 (numpy 'reflect', periodic)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    m = torch.remainder(idx, period)
    return torch.where(m > n - 1, period - m, m)


def _gather(img: torch.Tensor, r0: torch.Tensor, c0: torch.Tensor, side: int) -> torch.Tensor:
    ar = torch.arange(side, device=img.device)
    rows = _reflect(r0[:, None] + ar, img.shape[0])
    cols = _reflect(c0[:, None] + ar, img.shape[1])
    return img[rows[:, :, None], cols[:, None, :]]  # (B, s, s, C)


def _summary(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, P) float64 -> (B, C * 5): mean, std, quantiles per channel."""
    mean = x.mean(-1)
    std = ((x - mean[..., None]) ** 2).mean(-1).sqrt()
    srt = x.sort(dim=-1).values
    p = x.shape[-1]
    out = [mean, std]
    for q in QUANTILES:
        pos = q * (p - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, p - 1)
        frac = pos - lo
        out.append(srt[..., lo] + (srt[..., hi] - srt[..., lo]) * frac)
    return torch.stack(out, dim=-1).reshape(x.shape[0], -1)


def _bincount(idx: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(idx.reshape(-1), minlength=size)[:size].to(torch.float64)


def _histogram(crops: torch.Tensor, bins: int, lo: torch.Tensor, hi: torch.Tensor, exact: bool) -> torch.Tensor:
    """crops (B, s, s, C) -> (B, C * bins) fractions."""
    b, c = crops.shape[0], crops.shape[-1]
    v = crops.reshape(b, -1, c)
    if exact:
        k = torch.div((v.to(torch.int64) - lo.long()) * bins, (hi - lo).long(), rounding_mode="floor")
    else:
        width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        k = torch.floor((v.to(torch.float64) - lo) / width * bins).to(torch.int64)
    k = k.clamp_(0, bins - 1)
    base = (torch.arange(b, device=crops.device)[:, None, None] * c
            + torch.arange(c, device=crops.device)[None, None, :]) * bins
    counts = _bincount(base + k, b * c * bins).reshape(b, c * bins)
    return counts / v.shape[1]


def _grey_levels(crops: torch.Tensor, levels: int, lo: float, hi: float, exact: bool) -> torch.Tensor:
    """crops (B, s, s, C) -> (B, s, s) int64 grey levels 0..levels-1."""
    c = crops.shape[-1]
    w = _LUMA if c == 3 else (1,) * c
    if exact:
        wt = torch.tensor(w, dtype=torch.int64, device=crops.device)
        y = (crops.to(torch.int64) * wt).sum(-1)
        tot = int(sum(w))
        q = torch.div((y - tot * int(lo)) * levels, tot * int(hi - lo), rounding_mode="floor")
    else:
        wt = torch.tensor(w, dtype=torch.float64, device=crops.device)
        g = (crops.to(torch.float64) * wt).sum(-1) / float(sum(w))
        q = torch.floor((g - lo) / (hi - lo if hi > lo else 1.0) * levels).to(torch.int64)
    return q.clamp_(0, levels - 1)


def _offset(distance: int, angle: float) -> tuple[int, int]:
    return int(round(math.sin(angle) * distance)), int(round(math.cos(angle) * distance))


def _glcms(q: torch.Tensor, levels: int, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Symmetric normalised GLCMs (B, K, L * L) of grey-level crops q (B, s, s), one per pixel offset,
    all counted by one bincount over ``((crop * K + k) * L + i) * L + j``."""
    b, s, k = q.shape[0], q.shape[1], len(offsets)
    crop = torch.arange(b, device=q.device)[:, None, None] * k
    idx = []
    for o, (dr, dc) in enumerate(offsets):
        a = q[:, max(0, -dr):s - max(0, dr), max(0, -dc):s - max(0, dc)]
        n = q[:, max(0, dr):s + min(0, dr), max(0, dc):s + min(0, dc)]
        idx.append((((crop + o) * levels + a) * levels + n).reshape(-1))
    g = _bincount(torch.cat(idx), b * k * levels * levels).reshape(b, k, levels, levels)
    g = g + g.transpose(2, 3)
    g = g.reshape(b, k, levels * levels)
    return g / g.sum(-1, keepdim=True).clamp_min(1.0)


def _moment_matrix(levels: int, device) -> torch.Tensor:
    """(L * L, 8) columns (i-j)^2, |i-j|, 1/(1+(i-j)^2), i, j, i^2, j^2, i j over the GLCM cells."""
    lv = torch.arange(levels, dtype=torch.float64, device=device)
    i, j = lv[:, None].expand(levels, levels), lv[None, :].expand(levels, levels)
    d2 = (i - j) ** 2
    cols = [d2, (i - j).abs(), 1.0 / (1.0 + d2), i, j, i * i, j * j, i * j]
    return torch.stack([c.reshape(-1) for c in cols], dim=1)


def _glcm_props(p: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """(..., L * L) normalised GLCMs -> (..., 5): contrast, dissimilarity, homogeneity, correlation, ASM.

    Variances as E[i^2] - E[i]^2 (exact for a constant crop: one cell of mass 1); a variance below 1e-12
    (the smallest non-zero one of an n-pair GLCM is about 1/n) counts as zero: correlation 1."""
    m = p @ moments
    mu_i, mu_j = m[..., 3], m[..., 4]
    var_i = (m[..., 5] - mu_i * mu_i).clamp_min(0.0)
    var_j = (m[..., 6] - mu_j * mu_j).clamp_min(0.0)
    cov = m[..., 7] - mu_i * mu_j
    flat = (var_i < 1e-12) | (var_j < 1e-12)
    den = torch.where(flat, torch.ones_like(cov), (var_i * var_j).sqrt())
    corr = torch.where(flat, torch.ones_like(cov), cov / den)
    asm = (p * p).sum(-1)
    return torch.stack([m[..., 0], m[..., 1], m[..., 2], corr, asm], dim=-1)


def _texture(q: torch.Tensor, levels: int, distances: Sequence[int]) -> torch.Tensor:
    """(B, s, s) grey levels -> (B, 5 * len(distances)), props major, distances minor; each property is
    averaged over the four angles."""
    offsets = [_offset(int(d), a) for d in distances for a in ANGLES]
    props = _glcm_props(_glcms(q, levels, offsets), _moment_matrix(levels, q.device))  # (B, D * 4, 5)
    props = props.reshape(q.shape[0], len(distances), len(ANGLES), 5).mean(2)  # (B, D, 5)
    return props.transpose(1, 2).reshape(q.shape[0], -1)


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------
def _image_tensor(image: np.ndarray, device: torch.device) -> tuple[torch.Tensor, bool]:
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise InputError(f"an image must be (h, w) or (h, w, c), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"cannot crop an empty image of shape {a.shape}")
    integer = np.issubdtype(a.dtype, np.integer) or a.dtype == bool
    if a.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(a))
    elif integer:
        t = torch.from_numpy(a.astype(np.int64 if a.dtype.itemsize > 2 else np.int32))
    else:
        t = torch.from_numpy(a.astype(np.float64))
    return t.to(device), integer


def crop_features(image: np.ndarray, centres: np.ndarray, side: int, *, features=FAMILIES, bins: int = 10,
                  levels: int = 8, distances: Sequence[int] = (1, 2), value_range=None,
                  channel_names: Sequence[str] | None = None, grey_name: str = "grey", prefix: str = "",
                  labels: np.ndarray | None = None, labels_name: str = "segmentation/label",
                  batch_size: int = 1024, device=None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Features of the ``side`` x ``side`` crops of ``image`` around each of ``centres``.

    ``image``: (h, w, c) or (h, w) uint8/uint16/float; ``centres``: (n, 2) (col, row) in that image's pixel
    coordinates; ``side``: crop side in image pixels (at least 1); ``value_range``: (lo, hi) scalars or
    per-channel arrays for the histogram and the grey quantisation (default :func:`default_value_range`);
    ``device``: a torch device, a device name or ``use_gpu`` (see :func:`resolve_device`); ``labels``: an
    (h, w) integer label image on the same pixel grid, for the ``"segmentation"`` family.

    Returns ``(X, names, outside)``: float32 (n, f) features, their f names (:func:`feature_names`) and a
    bool (n,) array, True where the crop leaves the image (filled by reflection, see the module doc).
    """
    feats = check_families(features)
    side, bins, levels = int(side), int(bins), int(levels)
    if side < 1 or bins < 1 or levels < 2 or batch_size < 1:
        raise InputError(f"need side >= 1, bins >= 1, levels >= 2, got side={side}, bins={bins}, levels={levels}")
    dists = tuple(int(d) for d in distances)
    if "texture" in feats and (not dists or min(dists) < 1):
        raise InputError(f"GLCM distances must be positive integers, got {list(distances)}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    img, integer = _image_tensor(image, dev)
    h, w, c = img.shape
    lo, hi = default_value_range(np.asarray(image).reshape(h, w, c)) if value_range is None else value_range
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (c,)).copy()
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (c,)).copy()
    exact = integer and bool(np.all(lo == np.round(lo)) and np.all(hi == np.round(hi)) and np.all(hi > lo))
    lo_t, hi_t = torch.as_tensor(lo, device=dev), torch.as_tensor(hi, device=dev)
    chans = list(channel_names) if channel_names is not None else [str(i) for i in range(c)]
    if len(chans) != c:
        raise InputError(f"{len(chans)} channel names for an image of {c} channels")
    names = feature_names(chans, feats, bins=bins, distances=dists, grey=grey_name, labels=labels_name,
                          prefix=prefix)
    lab = label_tensor(labels, (h, w), dev) if "segmentation" in feats else None
    r0, c0, outside = crop_starts(centres, side, (h, w))
    n = len(r0)
    out = np.empty((n, len(names)), dtype=np.float32)
    step = max(1, min(int(batch_size), _BUDGET // max(1, side * side * c)))
    with single_thread(dev):  # many small tensor ops per batch: extra OpenMP threads only wait
        for a in range(0, n, step):
            out[a:a + step] = _batch_features(img, r0[a:a + step], c0[a:a + step], side, feats, bins, levels,
                                              dists, lo, hi, lo_t, hi_t, exact, lab)
    return out, names, outside


def _batch_features(img, r0, c0, side, feats, bins, levels, dists, lo, hi, lo_t, hi_t, exact, lab) -> np.ndarray:
    """The feature block (b, f) of one batch of crops starting at rows ``r0``, columns ``c0``."""
    dev, c, b = img.device, img.shape[2], len(r0)
    r0, c0 = torch.as_tensor(r0, device=dev), torch.as_tensor(c0, device=dev)
    crops = _gather(img, r0, c0, side)
    parts = []
    if "summary" in feats:
        parts.append(_summary(crops.reshape(b, -1, c).transpose(1, 2).to(torch.float64)))
    if "histogram" in feats:
        parts.append(_histogram(crops, bins, lo_t, hi_t, exact))
    if "texture" in feats:
        q = _grey_levels(crops, levels, float(lo.min()), float(hi.max()), exact)
        parts.append(_texture(q, levels, dists))
    if "segmentation" in feats:
        st = object_stats(_gather(lab, r0, c0, side).reshape(b, -1), crops.reshape(b, -1, c))
        cols = [st["count"], st["pixels"] / (side * side), st["area_mean"], st["area_std"]]
        parts.append(torch.cat([torch.stack(cols, 1), st["pixel_mean"]], 1))
    return torch.cat(parts, dim=1).to(torch.float32).cpu().numpy()
