"""Image operations on (y, x, c) pixel arrays, and a band driver that applies them to images larger than memory.

Arrays in, arrays out; no AnnData, no file access (the band driver calls a ``read`` function it is given).

* :func:`to_grey`: luminance with the ITU-R BT.601 luma weights (the ones of PIL's ``"L"`` mode and of
  JPEG/JFIF): ``grey = 0.299 r + 0.587 g + 0.114 b`` (a 4th, alpha, channel is ignored; a single
  channel is its own grey). Output float64 in the units of the input (0..255 for uint8, 0..65535 for
  uint16), not normalised.
* :func:`gaussian`: a Gaussian blur of each channel (never across channels), separable, with the kernel
  truncated at ``TRUNCATE = 4`` standard deviations (radius ``int(4 sigma + 0.5)`` pixels, as
  ``scipy.ndimage``) and the ``reflect`` border of ``scipy.ndimage`` (half-sample symmetric:
  ``d c b a | a b c d | d c b a``). On the CPU this is ``scipy.ndimage.gaussian_filter`` in float64; on a
  CUDA device the same sums as two torch 1-D convolutions in float32 (agreeing to ~1e-4 pixel units).
* :class:`BandedImage`: ``f`` applied to a whole image, computed band by band. Band ``[r0, r1)`` is
  computed from the rows ``[r0 - halo, r1 + halo)`` (clipped to the image) and, in memory, in column
  tiles with the same halo, then the halo is cropped. When ``f`` only looks ``halo`` pixels away (a
  filter of radius <= halo) the result equals ``f`` of the whole image exactly: every kept output
  pixel sees the same input pixels, and where a block edge is the true image border the block's
  border rule (e.g. ``reflect``) is the image's. Memory: one band of output plus one band + 2 halo
  rows of input (the source dtype) plus one tile of ``f``'s working arrays.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import InputError

__all__ = ["LUMA_WEIGHTS", "TRUNCATE", "to_grey", "gaussian", "gaussian_radius", "cast_pixels", "BandedImage"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 (r, g, b)
TRUNCATE = 4.0  # Gaussian kernels stop at this many standard deviations
BAND = 512  # default output rows per band
TILE = 2048  # default columns per tile of f's working arrays


def _as3d(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise InputError(f"an image must be (y, x) or (y, x, c), got shape {a.shape}")
    return a


def to_grey(img) -> np.ndarray:
    """(y, x, 1) float64 luminance of a (y, x, 3|4) r,g,b(,a) or (y, x, 1) image (see module doc)."""
    a = _as3d(img)
    c = a.shape[2]
    if c == 1:
        return a.astype(np.float64)
    if c not in (3, 4):
        raise InputError(f"grey needs 1 channel or 3/4 channels (r, g, b[, a]), got {c}")
    w = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
    return (a[:, :, :3].astype(np.float64) @ w)[:, :, None]


def gaussian_radius(sigma: float) -> int:
    """Pixels the Gaussian of ``sigma`` reaches on each side (``int(TRUNCATE * sigma + 0.5)``)."""
    return int(TRUNCATE * float(sigma) + 0.5)


def _check_sigma(sigma) -> float:
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"sigma must be a positive number of image pixels, not {sigma!r}") from None
    if not np.isfinite(s) or s <= 0:
        raise InputError(f"sigma must be a positive number of image pixels, not {sigma!r}")
    return s


def gaussian(img, sigma: float, *, device=None) -> np.ndarray:
    """Each channel of ``img`` blurred by a Gaussian of ``sigma`` image pixels (see module doc).

    ``device``: None or a CPU device -> ``scipy.ndimage.gaussian_filter`` (float64); a CUDA device ->
    torch (float32). Returns a (y, x, c) float array.
    """
    s = _check_sigma(sigma)
    a = _as3d(img)
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        return _gaussian_torch(a, s, device)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a.astype(np.float64), s, mode="reflect", truncate=TRUNCATE, axes=(0, 1))


def _gaussian_weights(sigma: float) -> np.ndarray:
    r = gaussian_radius(sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _reflect_index(n: int, r: int) -> np.ndarray:
    """Indices of a length-``n`` axis padded by ``r`` on each side with the half-sample reflection."""
    i = np.arange(-r, n + r)
    m = np.mod(i, 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


def _gaussian_torch(a: np.ndarray, sigma: float, device) -> np.ndarray:
    """Separable Gaussian as two 1-D torch convolutions with reflect padding (float32 on ``device``)."""
    import torch

    k = torch.as_tensor(_gaussian_weights(sigma), dtype=torch.float32, device=device)
    r = (k.numel() - 1) // 2
    h, w, c = a.shape
    x = torch.as_tensor(np.ascontiguousarray(a), device=device).to(torch.float32).permute(2, 0, 1)  # (c, h, w)
    rows = torch.as_tensor(_reflect_index(h, r), device=device)
    cols = torch.as_tensor(_reflect_index(w, r), device=device)
    # along y: channels x columns as the batch, a (1, 1, 2r+1) kernel
    xy = x.index_select(1, rows).permute(0, 2, 1).reshape(c * w, 1, h + 2 * r)
    xy = torch.nn.functional.conv1d(xy, k.view(1, 1, -1)).reshape(c, w, h).permute(0, 2, 1)
    xx = xy.index_select(2, cols).reshape(c * h, 1, w + 2 * r)
    out = torch.nn.functional.conv1d(xx, k.view(1, 1, -1)).reshape(c, h, w).permute(1, 2, 0)
    return out.cpu().numpy()


def cast_pixels(block: np.ndarray, dtype) -> np.ndarray:
    """``block`` as ``dtype`` (uint8/uint16): floats rounded to the nearest integer (half to even),
    every value clipped to the dtype's range (NaN -> 0)."""
    dtype = np.dtype(dtype)
    b = np.asarray(block)
    if b.dtype == dtype:
        return b
    info = np.iinfo(dtype)
    if np.issubdtype(b.dtype, np.floating):
        b = np.rint(np.nan_to_num(b, nan=0.0, posinf=info.max, neginf=0.0))
    elif b.dtype == bool:
        b = b.astype(np.uint8)
    return np.clip(b, info.min, info.max).astype(dtype)


class BandedImage:
    """``f`` of the image that ``read`` gives, as a lazy (y, x, c_out) array-like, computed band by band.

    read  : ``read(r0, r1) -> (r1 - r0, w, c)`` array, rows r0..r1-1 and every column of the source
    shape : the source's (h, w, c)
    f     : block (rows, cols, c) in the source dtype -> block (rows, cols) or (rows, cols, c_out)
    halo  : pixels ``f`` needs on each side (0: pointwise)
    band  : output rows computed at a time; tile: columns of one ``f`` call (plus 2 halo; None: ``TILE``)
    dtype : the output dtype (values go through :func:`cast_pixels`); name: ``f``'s name for errors

    Rows are served by ``array[r0:r1]`` (any row slice, as :meth:`ImageStore.write` asks for); the
    last band computed is kept, so consecutive slices within one band cost one computation. The first
    band is computed on construction to learn ``c_out`` and check ``f``'s output shape.
    ``max_read_rows`` records the largest number of rows read at once.
    """

    def __init__(self, read: Callable[[int, int], np.ndarray], shape, f: Callable, *, halo: int = 0,
                 band: int = BAND, tile: int | None = None, dtype=np.uint8, name: str = "f"):
        self._read, self._f, self.name = read, f, name
        self.h, self.w, self.c_in = (int(s) for s in shape)
        self.halo, self.band, self.tile = int(halo), int(band), int(TILE if tile is None else tile)
        if self.halo < 0 or self.band < 1 or self.tile < 1:
            raise InputError(f"halo must be >= 0 and band, tile >= 1, got {halo}, {band}, {tile}")
        self.dtype = np.dtype(dtype)
        self.max_read_rows = 0
        self.c_out: int | None = None
        self._cached: tuple[int, np.ndarray] | None = None
        first = self._band(0)
        self.shape = (self.h, self.w, int(first.shape[2]))

    def __len__(self) -> int:
        return self.h

    def _apply(self, block: np.ndarray, r_off: int, c_off: int, rows: int, cols: int) -> np.ndarray:
        out = self._f(block)
        out = np.asarray(out)
        if out.ndim == 2:
            out = out[:, :, None]
        if out.ndim != 3 or out.shape[:2] != block.shape[:2]:
            raise InputError(f"image function {self.name!r} returned shape {tuple(out.shape)} for a block of shape "
                             f"{tuple(block.shape)}: it must keep (rows, cols) and return (rows, cols[, c])")
        if self.c_out is None:
            self.c_out = int(out.shape[2])
        elif out.shape[2] != self.c_out:
            raise InputError(f"image function {self.name!r} returned {out.shape[2]} channels for one block and "
                             f"{self.c_out} for another")
        return cast_pixels(out[r_off:r_off + rows, c_off:c_off + cols], self.dtype)

    def _band(self, i: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        r0 = i * self.band
        r1 = min(self.h, r0 + self.band)
        a0, a1 = max(0, r0 - self.halo), min(self.h, r1 + self.halo)
        src = np.asarray(self._read(a0, a1))
        if src.ndim == 2:
            src = src[:, :, None]
        if src.shape != (a1 - a0, self.w, self.c_in):
            raise InputError(f"image rows {a0}:{a1} came back with shape {src.shape}, expected "
                             f"{(a1 - a0, self.w, self.c_in)}")
        self.max_read_rows = max(self.max_read_rows, a1 - a0)
        parts = []
        for c0 in range(0, self.w, self.tile):
            c1 = min(self.w, c0 + self.tile)
            b0, b1 = max(0, c0 - self.halo), min(self.w, c1 + self.halo)
            parts.append(self._apply(src[:, b0:b1], r0 - a0, c0 - b0, r1 - r0, c1 - c0))
        del src
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        self._cached = (i, out)
        return out

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise InputError("a BandedImage is read by row slices array[r0:r1]")
        r0, r1, _ = key.indices(self.h)
        if r1 <= r0:
            return np.zeros((0, self.w, self.shape[2]), dtype=self.dtype)
        first, last = r0 // self.band, (r1 - 1) // self.band
        pieces = []
        for i in range(first, last + 1):
            b = self._band(i)
            lo = max(r0, i * self.band) - i * self.band
            hi = min(r1, (i + 1) * self.band) - i * self.band
            pieces.append(b[lo:hi])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)

    def to_array(self) -> np.ndarray:
        """The whole result in memory (for in-memory sources), filled band by band."""
        out = np.empty(self.shape, dtype=self.dtype)
        for i in range(-(-self.h // self.band)):
            r0 = i * self.band
            out[r0:r0 + self.band] = self._band(i)
        return out
