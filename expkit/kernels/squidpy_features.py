"""Per-spot image features with squidpy's definitions (``sq.im.calculate_image_features``, squidpy 1.8),
vectorised over spots: the crops of a batch are gathered with index arithmetic and summarised as tensors.

Arrays in, arrays out. Definitions (implemented from squidpy's documented behaviour and checked against
squidpy 1.8.2 in ``tests/test_image_features.py``):

* **Crop geometry** (``ImageContainer.generate_spot_crops`` / ``crop_center`` / ``crop_corner``): a spot at
  image pixel coordinates ``(x, y)`` (full-resolution coordinates times the image scale) is centred on the
  pixel ``(int(y), int(x))`` (truncation); the radius is ``r = int(round(d // 2 * spot_scale))`` with ``d``
  the spot diameter in image pixels (``spot_diameter_fullres`` x scale; Python's ``round``, halves to even);
  the crop holds the ``(2r + 1)^2`` pixels ``y - r .. y + r``, ``x - r .. x + r``, pixels beyond the image
  are **0** (constant padding). ``mask_circle``: pixels with ``(i - r)^2 + (j - r)^2 > r^2`` are set to 0
  (also in the label crop).
* ``"summary"``: per channel ``c`` the quantiles 0.9, 0.5, 0.1 (numpy's ``linear`` method, including its
  interpolation ``a + (b - a) t`` for ``t < 0.5`` and ``b - (b - a)(1 - t)`` otherwise), the mean and the
  standard deviation (``ddof=0``): ``summary_ch-<c>_quantile-<q>``, ``_mean``, ``_std``.
* ``"histogram"``: per channel the **counts** in ``bins`` (10) equal bins over the range of the whole crop
  (min .. max over all its channels, widened by 0.5 each side when constant; numpy's bin assignment with
  its edge corrections): ``histogram_ch-<c>_bin-<i>``.
* ``"texture"``: per channel a 256-level, non-symmetric GLCM of the (uint8; uint16 >> 8) crop for each
  distance (1) and angle (0, pi/4, pi/2, 3 pi/4), pixel pairs ``(r, c), (r + round(d sin a), c +
  round(d cos a))`` inside the crop, and scikit-image's ``graycoprops`` contrast, dissimilarity,
  homogeneity, correlation (1 where a standard deviation is 0) and ASM:
  ``texture_ch-<c>_<prop>_dist-<d>_angle-<a:.2f>``. The GLCM itself is never formed: the moment
  properties come from sums over the pixel pairs (correlation from exact integer moments), ASM from the
  run lengths of the sorted pair codes (``sum over cells of n^2``).
* ``"segmentation"``: from a label crop (0 = background; objects cut by the crop count with their pixels
  inside it): ``segmentation_label`` (the number of distinct labels), ``segmentation_area_mean|std`` over
  the objects, and per channel ``segmentation_ch-<c>_mean_intensity_mean|std``: the mean and standard
  deviation over the objects of each object's mean intensity (NaN without objects, as squidpy's
  ``np.mean([])``).

Families come out in squidpy's order (sorted names: histogram, segmentation, summary, texture).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError
from .device import resolve_device, single_thread

__all__ = ["SQ_FAMILIES", "check_sq_families", "squidpy_radius", "squidpy_feature_names", "squidpy_crop_features",
           "object_stats"]

SQ_FAMILIES = ("histogram", "segmentation", "summary", "texture")
SQ_QUANTILES = (0.9, 0.5, 0.1)
SQ_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
SQ_PROPS = ("contrast", "dissimilarity", "homogeneity", "correlation", "ASM")
_BUDGET = 1 << 22  # pixel values per batch of crops


def label_tensor(labels, shape, dev) -> torch.Tensor:
    """A label image as an (h, w, 1) int64 tensor, checked to lie on the intensity image's (h, w) grid."""
    if labels is None or np.asarray(labels).shape[:2] != tuple(shape):
        raise InputError("the 'segmentation' family needs a label image of the intensity image's shape "
                         f"{tuple(shape)}, got {None if labels is None else np.asarray(labels).shape}")
    return torch.from_numpy(np.asarray(labels).reshape(*shape, 1).astype(np.int64)).to(dev)


def check_sq_families(features) -> tuple[str, ...]:
    from .image_features import check_families

    return check_families(features, SQ_FAMILIES)


def squidpy_radius(diameter_px: float, spot_scale: float) -> int:
    """squidpy's crop radius: ``int(round(diameter // 2 * spot_scale))`` (diameter in image pixels)."""
    return int(round(float(diameter_px) // 2 * float(spot_scale)))


def squidpy_feature_names(n_channels: int, features, *, bins: int = 10, distances=(1,), angles=SQ_ANGLES,
                          quantiles=SQ_QUANTILES, prefix: str = "") -> list[str]:
    feats = check_sq_families(features)
    chans = range(int(n_channels))
    names: list[str] = []
    if "histogram" in feats:
        names += [f"histogram_ch-{c}_bin-{i}" for c in chans for i in range(bins)]
    if "segmentation" in feats:
        names += ["segmentation_label", "segmentation_area_mean", "segmentation_area_std"]
        names += [f"segmentation_ch-{c}_mean_intensity_{s}" for c in chans for s in ("mean", "std")]
    if "summary" in feats:
        for c in chans:
            names += [f"summary_ch-{c}_quantile-{q}" for q in quantiles]
            names += [f"summary_ch-{c}_mean", f"summary_ch-{c}_std"]
    if "texture" in feats:
        names += [f"texture_ch-{c}_{p}_dist-{d}_angle-{a:.2f}" for c in chans for p in SQ_PROPS
                  for d in distances for a in angles]
    return [prefix + n for n in names]


# --------------------------------------------------------------------------------------------
# the families, on a batch of crops
# --------------------------------------------------------------------------------------------
def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of an integer tensor (values 0..65535) sorted: numpy's 16-bit radix sort on the CPU (an order
    of magnitude faster than torch's comparison sort there), torch.sort elsewhere."""
    if x.device.type != "cpu":
        return x.sort(dim=-1).values
    return torch.from_numpy(np.sort(x.numpy().astype(np.uint16), axis=-1, kind="stable").astype(np.int32))


def _summary(v: torch.Tensor, raw: torch.Tensor, quantiles) -> torch.Tensor:
    """v (B, C, P) float64 (raw: the same integer values) -> (B, C * (len(q) + 2)): quantiles, mean, std
    per channel, as numpy computes them."""
    p = v.shape[-1]
    srt = _sorted_rows(raw).to(torch.float64)
    out = []
    for q in quantiles:
        virt = (p - 1) * float(q)
        lo = int(math.floor(virt))
        hi = min(lo + 1, p - 1)
        t = virt - lo
        a, b = srt[..., lo], srt[..., hi]
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    mean = v.sum(-1) / p
    out += [mean, (((v - mean[..., None]) ** 2).sum(-1) / p).sqrt()]
    return torch.stack(out, dim=-1).reshape(v.shape[0], -1)


def _histogram(v: torch.Tensor, bins: int, v_range) -> torch.Tensor:
    """v (B, C, P) float64 -> (B, C * bins) counts, numpy's histogram over each crop's range."""
    b, c, p = v.shape
    if v_range is None:
        flat = v.reshape(b, -1)
        lo, hi = flat.min(-1).values, flat.max(-1).values
    else:
        lo = torch.full((b,), float(v_range[0]), dtype=v.dtype, device=v.device)
        hi = torch.full((b,), float(v_range[1]), dtype=v.dtype, device=v.device)
    same = lo == hi
    lo, hi = torch.where(same, lo - 0.5, lo), torch.where(same, hi + 0.5, hi)
    edges = torch.arange(bins + 1, dtype=v.dtype, device=v.device) * ((hi - lo) / bins)[:, None] + lo[:, None]
    edges[:, -1] = hi
    lo3, hi3 = lo[:, None, None], hi[:, None, None]
    keep = (v >= lo3) & (v <= hi3)
    idx = (((v - lo3) / (hi3 - lo3)) * bins).clamp(0, bins).to(torch.int64)
    idx = torch.where(idx == bins, idx - 1, idx)
    e3 = edges[:, None, :].expand(b, c, bins + 1)
    idx = idx - (v < torch.gather(e3, 2, idx)).long()
    idx = idx + ((v >= torch.gather(e3, 2, idx + 1)) & (idx != bins - 1)).long()
    base = (torch.arange(b * c, device=v.device).reshape(b, c, 1)) * bins
    flat_idx = (base + idx)[keep]
    return torch.bincount(flat_idx, minlength=b * c * bins).to(torch.float64).reshape(b, c * bins)


def _asm_counts(codes: torch.Tensor) -> torch.Tensor:
    """sum over distinct values of (count)^2 per row of codes (G, N) (values 0..65535), from the sorted
    rows: the run lengths L of equal codes add up L^2."""
    g, n = codes.shape
    if n == 0:
        return torch.zeros(g, dtype=torch.float64, device=codes.device)
    s = _sorted_rows(codes)
    start = torch.ones_like(s, dtype=torch.bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    flat = start.reshape(-1)
    pos = torch.nonzero(flat).reshape(-1)  # run starts, row-major: never across rows (each row starts one)
    run = torch.diff(pos, append=torch.tensor([g * n], device=codes.device))
    row = torch.div(pos, n, rounding_mode="floor")
    return torch.zeros(g, dtype=torch.float64, device=codes.device).index_add_(0, row, (run * run).to(torch.float64))


def _texture(q: torch.Tensor, distances, angles) -> torch.Tensor:
    """q (B, C, s, s) int64 grey values 0..255 -> (B, C * 5 * D * A), channel, prop, distance, angle."""
    b, c, s = q.shape[0], q.shape[1], q.shape[2]
    out = []
    for d in distances:
        for a in angles:
            dr, dc = int(round(math.sin(a) * d)), int(round(math.cos(a) * d))
            x = q[:, :, max(0, -dr):s - max(0, dr), max(0, -dc):s - max(0, dc)].reshape(b, c, -1)
            y = q[:, :, max(0, dr):s + min(0, dr), max(0, dc):s + min(0, dc)].reshape(b, c, -1)
            n = x.shape[-1]
            nf = float(max(n, 1))
            diff = (x - y).to(torch.float64)
            d2 = diff * diff
            contrast = d2.sum(-1) / nf
            dissim = diff.abs().sum(-1) / nf
            homog = (1.0 / (1.0 + d2)).sum(-1) / nf
            sx, sy = x.sum(-1), y.sum(-1)
            vx = n * (x * x).sum(-1) - sx * sx  # exact integers: N^2 var
            vy = n * (y * y).sum(-1) - sy * sy
            cv = n * (x * y).sum(-1) - sx * sy
            flat = (vx == 0) | (vy == 0)
            den = torch.where(flat, torch.ones_like(vx), vx).to(torch.float64).sqrt() * \
                torch.where(flat, torch.ones_like(vy), vy).to(torch.float64).sqrt()
            corr = torch.where(flat, torch.ones_like(den), cv.to(torch.float64) / den)
            asm = _asm_counts((x * 256 + y).reshape(b * c, n)).reshape(b, c) / (nf * nf)
            out.append(torch.stack([contrast, dissim, homog, corr, asm], dim=-1))  # (B, C, 5)
    t = torch.stack(out, dim=-1)  # (B, C, 5, D * A)
    return t.reshape(b, -1)


def object_stats(lab: torch.Tensor, vals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per crop statistics of the labelled objects: lab (B, P) int64 (0 = background), vals (B, P, C).

    Returns float64 tensors: ``count`` (B), ``pixels`` (B, object pixels), ``area_mean``/``area_std`` (B,
    over objects, NaN without), ``mean_of_means``/``std_of_means`` (B, C: of each object's mean
    intensity) and ``pixel_mean`` (B, C: mean intensity over all object pixels); NaN where no object."""
    b, p = lab.shape
    c = vals.shape[-1]
    dev = lab.device
    fg = lab > 0
    crop = torch.arange(b, device=dev)[:, None].expand(b, p)[fg]
    lab_fg = lab[fg]
    span = int(lab_fg.max().item()) + 1 if lab_fg.numel() else 1
    _, inv, cnt = torch.unique(crop * span + lab_fg, return_inverse=True, return_counts=True)
    owner = torch.zeros(cnt.shape[0], dtype=torch.int64, device=dev).scatter_(0, inv, crop)
    count = torch.bincount(owner, minlength=b).to(torch.float64)
    area = cnt.to(torch.float64)
    nan = torch.full((b,), math.nan, dtype=torch.float64, device=dev)

    def seg_mean(v):  # (K, ...) -> (B, ...) mean over the objects of each crop
        tot = torch.zeros((b, *v.shape[1:]), dtype=torch.float64, device=dev).index_add_(0, owner, v)
        cn = count.reshape(b, *([1] * (v.dim() - 1)))
        return torch.where(cn > 0, tot / cn.clamp_min(1), nan.reshape(b, *([1] * (v.dim() - 1))))

    area_mean = seg_mean(area)
    area_std = seg_mean((area - area_mean[owner]) ** 2).sqrt()
    sums = torch.zeros((cnt.shape[0], c), dtype=torch.float64, device=dev).index_add_(
        0, inv, vals[fg].to(torch.float64))
    means = sums / area[:, None]
    mom = seg_mean(means)
    som = seg_mean((means - mom[owner]) ** 2).sqrt()
    pixels = fg.sum(-1).to(torch.float64)
    tot = torch.zeros((b, c), dtype=torch.float64, device=dev).index_add_(0, owner, sums)
    pix_mean = torch.where(pixels[:, None] > 0, tot / pixels.clamp_min(1)[:, None], nan[:, None])
    return {"count": count, "pixels": pixels, "area_mean": area_mean, "area_std": area_std,
            "mean_of_means": mom, "std_of_means": som, "pixel_mean": pix_mean}


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------
def _gather_zero(img: torch.Tensor, r0: torch.Tensor, c0: torch.Tensor, side: int) -> torch.Tensor:
    """(B, s, s, C) crops with rows r0 .. r0 + s - 1 (likewise columns), 0 beyond the image."""
    ar = torch.arange(side, device=img.device)
    rows, cols = r0[:, None] + ar, c0[:, None] + ar
    ok = ((rows >= 0) & (rows < img.shape[0]))[:, :, None] & ((cols >= 0) & (cols < img.shape[1]))[:, None, :]
    crops = img[rows.clamp(0, img.shape[0] - 1)[:, :, None], cols.clamp(0, img.shape[1] - 1)[:, None, :]]
    return crops * ok[..., None].to(crops.dtype)


def squidpy_crop_features(image: np.ndarray, centres: np.ndarray, radius: int, *, features=("summary",),
                          labels: np.ndarray | None = None, bins: int = 10, v_range=None,
                          distances: Sequence[int] = (1,), angles: Sequence[float] = SQ_ANGLES,
                          quantiles: Sequence[float] = SQ_QUANTILES, mask_circle: bool = False, prefix: str = "",
                          batch_size: int = 1024, device=None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """squidpy's features of the ``(2 radius + 1)^2`` crops of ``image`` centred on the pixels ``centres``.

    ``image``: (h, w, c) or (h, w) uint8/uint16 (texture: uint16 is taken >> 8, as ``img_as_ubyte``);
    ``centres``: (n, 2) integer (col, row) centre pixels (squidpy's ``int(x * scale), int(y * scale)``);
    ``labels``: (h, w) integer label image on the same pixel grid (for ``"segmentation"``).
    Returns ``(X float64 (n, f), names, outside)``, ``outside`` True where the crop leaves the image."""
    feats = check_sq_families(features)
    radius, bins = int(radius), int(bins)
    if radius < 0 or bins < 1:
        raise InputError(f"need radius >= 0 and bins >= 1, got radius={radius}, bins={bins}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    a = np.asarray(image)
    a = a[:, :, None] if a.ndim == 2 else a
    if a.ndim != 3 or a.dtype not in (np.uint8, np.uint16):
        raise InputError(f"flavor 'squidpy' needs a (h, w[, c]) uint8/uint16 image, got {a.dtype} {a.shape}")
    h, w, c = a.shape
    img = torch.from_numpy(np.ascontiguousarray(a) if a.dtype == np.uint8 else a.astype(np.int32)).to(dev)
    lab = label_tensor(labels, (h, w), dev) if "segmentation" in feats else None
    cr = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
    side = 2 * radius + 1
    c0, r0 = cr[:, 0] - radius, cr[:, 1] - radius
    outside = (r0 < 0) | (c0 < 0) | (r0 + side > h) | (c0 + side > w)
    names = squidpy_feature_names(c, feats, bins=bins, distances=distances, angles=angles, quantiles=quantiles,
                                  prefix=prefix)
    ii = torch.arange(side, device=dev)
    circle = ((ii[:, None] - radius) ** 2 + (ii[None, :] - radius) ** 2 <= radius * radius) if mask_circle else None
    out = np.empty((len(cr), len(names)), dtype=np.float64)
    step = max(1, min(int(batch_size), _BUDGET // max(1, side * side * c)))
    args = (feats, bins, v_range, tuple(int(d) for d in distances), tuple(float(x) for x in angles),
            tuple(quantiles), circle)
    with single_thread(dev):
        for s in range(0, len(cr), step):
            rr, cc = torch.as_tensor(r0[s:s + step], device=dev), torch.as_tensor(c0[s:s + step], device=dev)
            out[s:s + step] = _batch(img, lab, rr, cc, side, *args)
    return out, names, outside


def _batch(img, lab, rr, cc, side, feats, bins, v_range, distances, angles, quantiles, circle) -> np.ndarray:
    crops = _gather_zero(img, rr, cc, side)  # (B, s, s, C)
    if circle is not None:
        crops = crops * circle[None, :, :, None].to(crops.dtype)
    b, c = crops.shape[0], crops.shape[-1]
    v = crops.reshape(b, -1, c).transpose(1, 2).to(torch.float64)  # (B, C, P)
    parts = []
    if "histogram" in feats:
        parts.append(_histogram(v, bins, v_range))
    if "segmentation" in feats:
        lc = _gather_zero(lab, rr, cc, side)[..., 0]
        if circle is not None:
            lc = lc * circle[None].to(lc.dtype)
        st = object_stats(lc.reshape(b, -1), crops.reshape(b, -1, c))
        inten = torch.stack([st["mean_of_means"], st["std_of_means"]], dim=-1).reshape(b, -1)
        parts.append(torch.cat([torch.stack([st["count"], st["area_mean"], st["area_std"]], 1), inten], 1))
    if "summary" in feats:
        parts.append(_summary(v, crops.reshape(b, -1, c).transpose(1, 2), quantiles))
    if "texture" in feats:
        q = crops.permute(0, 3, 1, 2).to(torch.int64)
        if img.dtype != torch.uint8:
            q = q >> 8
        parts.append(_texture(q, distances, angles))
    return torch.cat(parts, dim=1).cpu().numpy()
