"""Phenocoder: a conditional convolutional variational autoencoder of object image patches, from its description.

Network. A patch ``x`` (C x H x W, intensities scaled to about [0, 1]) is standardised per channel (the mean
and standard deviation of the training patches, stored in the network, so encoding uses the scaling of
training) and encoded by three stride-2 3 x 3 convolutions (``filters`` wide, each followed by GroupNorm and
SiLU; with ``residual``, a residual block of two 3 x 3 convolutions at the coarsest level), a dense layer of
``n_dense`` units on ``[features, c]`` (``c``: one-hot codes of e.g. the sample and the z-slice) and two
heads, the mean ``mu`` and log-variance of the Gaussian posterior ``q(z | x, c)`` with ``n_latent``
dimensions. The decoder mirrors it from ``[z, c]``: two dense layers, the residual block, three stride-2
4 x 4 transposed convolutions (GroupNorm, SiLU) and a 3 x 3 convolution back to C channels, de-standardised.
The condition lets the latent space drop what it explains (staining, depth). Linear shortcuts run from the
standardised patch to ``mu`` and from ``z`` to the output; they start as the principal components of the
training patches (unit-variance scores, as the prior) while the last layers of the convolutional paths
start at zero, so the untrained network is the PCA of its latent size and training adds what is not
linear. Small data sets and CPU-sized runs reach a lower held-out error this way than from a random start (which
stayed at 1.7 x PCA's error after 20 epochs on 900 nuclei of 16 x 16 px).

Loss per patch (Kingma and Welling 2014; beta-VAE, Higgins et al. 2017): the negative log-likelihood of a
per-pixel Gaussian of standard deviation ``PIXEL_SD`` (about 3 % of the intensity range), times ``2
PIXEL_SD^2``: the squared error summed over the pixels plus ``beta * 2 PIXEL_SD^2`` times the KL divergence
``KL(q(z | x, c) || N(0, I))``. At ``beta = 1`` this is the evidence lower bound of that likelihood, a KL
weight small enough that the latent code costs little reconstruction (with unit pixel variance, a KL weight
of 1, posterior means decoded 1.4-2.3 times the error of a PCA of the same size on the nuclei of
benchmarks/embeddings.py). The KL weight rises linearly from 0 over the first ``kl_warmup`` epochs (KL
annealing, Bowman et al. 2016).

Training: a seeded share ``val_fraction`` of the patches is held out; mini-batches are augmented by the 8
symmetries of the square (rotations by 90 degrees and mirror images; the 4 of a rectangle for non-square
patches), one drawn per patch, as objects such as nuclei have no orientation; AdamW (decoupled weight
decay, Loshchilov and Hutter 2019) with a one-cycle learning rate (linear warm-up over the first 10 % of the
steps to ``lr``, then cosine annealing; Smith and Topin 2019), or ``schedule="plateau"``: constant ``lr``
halved when the validation loss has not improved for ``lr_patience`` epochs. The validation loss (posterior
means decoded, plus the full-weight KL) chooses the epoch whose weights are kept, and training stops when it
has not improved for ``patience`` epochs (early stopping). Weights, batch order, augmentations, the split
and the reparameterisation noise come from seeded CPU generators, so a seed gives identical runs, and CPU
and CUDA see the same draws.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .._logging import progress
from ..errors import InputError
from .device import single_thread
from .optim import Adam, clip_grad_norm

__all__ = ["PatchCVAE", "train_cvae", "encode", "reconstruct", "state_to_numpy", "net_from_state",
           "pca_reconstruction_error", "estimate_memory", "dihedral"]

FILTERS = (32, 64, 128)
PIXEL_SD = 0.0316  # the likelihood's per-pixel standard deviation at beta = 1 (intensities in [0, 1])


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class _Residual(nn.Module):
    """``x + conv(act(norm(conv(x))))`` followed by norm and activation."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, 1, 1))
        self.out = nn.Sequential(_norm(ch), nn.SiLU())

    def forward(self, x):
        return self.out(x + self.body(x))


def _down(cin, cout, residual):
    layers = [nn.Conv2d(cin, cout, 3, 2, 1), _norm(cout), nn.SiLU()]
    return layers + ([_Residual(cout)] if residual else [])


def _up(cin, cout, residual):
    layers = [nn.ConvTranspose2d(cin, cout, 4, 2, 1), _norm(cout), nn.SiLU()]
    return layers + ([_Residual(cout)] if residual else [])


class PatchCVAE(nn.Module):
    """Conditional convolutional VAE of ``shape = (C, H, W)`` patches (H, W multiples of 8)."""

    def __init__(self, shape, n_cond: int, n_latent: int = 16, n_dense: int = 128, filters=FILTERS,
                 residual: bool = False):
        super().__init__()
        c, h, w = (int(v) for v in shape)
        if h % 8 or w % 8:
            raise InputError(f"patch sides must be multiples of 8, not {h} x {w}")
        self.shape, self.n_cond, self.n_latent, self.n_dense = (c, h, w), int(n_cond), int(n_latent), int(n_dense)
        self.filters, self.residual = tuple(int(f) for f in filters), bool(residual)
        if len(self.filters) != 3 or min(self.filters) < 1:
            raise InputError(f"filters must be three positive widths, not {filters!r}")
        f1, f2, f3 = self.filters
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("std", torch.ones(c))
        self.conv = nn.Sequential(*_down(c, f1, False), *_down(f1, f2, False), *_down(f2, f3, residual),
                                  nn.Flatten())
        self.flat = f3 * (h // 8) * (w // 8)
        self.enc = nn.Sequential(nn.Linear(self.flat + self.n_cond, self.n_dense), nn.SiLU())
        self.mu = nn.Linear(self.n_dense, self.n_latent)
        self.logvar = nn.Linear(self.n_dense, self.n_latent)
        self.dec = nn.Sequential(nn.Linear(self.n_latent + self.n_cond, self.n_dense), nn.SiLU(),
                                 nn.Linear(self.n_dense, self.flat), nn.SiLU())
        self.deconv = nn.Sequential(*([_Residual(f3)] if residual else []), *_up(f3, f2, False),
                                    *_up(f2, f1, False), *_up(f1, f1, False), nn.Conv2d(f1, c, 3, 1, 1))
        self.lin_enc = nn.Linear(c * h * w, self.n_latent)  # the linear shortcuts (PCA at initialisation)
        self.lin_dec = nn.Linear(self.n_latent, c * h * w)
        with torch.no_grad():  # the convolutional paths start at 0 and add what is not linear
            for layer in (self.mu, self.deconv[-1]):
                layer.weight.zero_()
                layer.bias.zero_()
            self.logvar.bias.fill_(-6.0)

    def config(self) -> dict:
        return {"shape": list(self.shape), "n_cond": self.n_cond, "n_latent": self.n_latent,
                "n_dense": self.n_dense, "filters": list(self.filters), "residual": self.residual}

    def encode(self, x, cond):
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        h = self.enc(torch.cat([self.conv(x), cond], dim=1))
        return self.mu(h) + self.lin_enc(x.flatten(1)), self.logvar(h).clamp(-12.0, 12.0)

    def decode(self, z, cond):
        c, h, w = self.shape
        y = self.dec(torch.cat([z, cond], dim=1)).view(-1, self.filters[2], h // 8, w // 8)
        y = self.deconv(y) + self.lin_dec(z).view(-1, c, h, w)
        return y * self.std[:, None, None] + self.mean[:, None, None]

    @torch.no_grad()
    def init_linear(self, x: torch.Tensor):
        """Standardisation from the training patches ``x`` (n, C, H, W) and the linear shortcuts set to
        their principal components: ``z = V^T (x - m) / s`` (unit-variance scores, as the prior) and
        ``x = m + V s z``, so that the untrained network is the PCA of its latent size."""
        c = self.shape[0]
        flat = x.transpose(0, 1).reshape(c, -1).double()
        self.mean.copy_(flat.mean(1).float())
        self.std.copy_(flat.std(1).clamp_min(1e-3).float())
        a = x.flatten(1).double()
        m = a.mean(0)
        with single_thread(a.device):  # threaded LAPACK spins for seconds on a loaded small CPU
            _, sv, vt = torch.linalg.svd(a - m, full_matrices=False)
        k = min(self.n_latent, vt.shape[0])
        v, s = vt[:k].T, (sv[:k] / max(a.shape[0] - 1, 1) ** 0.5).clamp_min(1e-6)
        sd = self.std.double().repeat_interleave(x.shape[2] * x.shape[3])
        mu = self.mean.double().repeat_interleave(x.shape[2] * x.shape[3])
        self.lin_enc.weight.zero_()
        self.lin_enc.bias.zero_()
        self.lin_dec.weight.zero_()
        self.lin_enc.weight[:k] = ((v * sd[:, None]) / s).T.float()
        self.lin_enc.bias[:k] = ((v.T @ (mu - m)) / s).float()
        self.lin_dec.weight[:, :k] = ((v * s) / sd[:, None]).float()
        self.lin_dec.bias.copy_(((m - mu) / sd).float())

    def forward(self, x, cond, eps):
        mu, logvar = self.encode(x, cond)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z, cond), mu, logvar


def build(shape, n_cond, n_latent, n_dense, seed: int, filters=FILTERS, residual: bool = False) -> PatchCVAE:
    """A network with weights drawn from ``seed`` (torch's default initialisation, on the CPU), leaving the
    global random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return PatchCVAE(shape, n_cond, n_latent, n_dense, filters, residual)


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Patch ``i`` of ``x`` (n, C, H, W) under symmetry ``k[i]``: bit 0 flips the columns, bit 1 the rows,
    bit 2 transposes (square patches only), so ``k`` in 0..7 are the 8 symmetries of the square."""
    k = k.to(x.device)
    x = torch.where((k & 1).bool()[:, None, None, None], x.flip(3), x)
    x = torch.where((k & 2).bool()[:, None, None, None], x.flip(2), x)
    if x.shape[2] == x.shape[3]:
        x = torch.where((k & 4).bool()[:, None, None, None], x.transpose(2, 3), x)
    return x


def _loss(net, x, cond, eps, beta):
    """(mean loss, mean squared error summed per patch, mean KL) of a batch; ``eps=None``: posterior means."""
    mu, logvar = net.encode(x, cond)
    z = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)
    rec = net.decode(z, cond)
    r = (rec - x).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return (r + beta * kl).mean(), r.mean(), kl.mean()


def estimate_memory(n: int, shape, batch_size: int, n_latent: int, n_dense: int, filters=FILTERS) -> int:
    """Bytes at the peak of training: the patches (float32, with a scaled copy), a batch's activations
    (kept for the backward pass, about 10 tensors per level) and gradients, the weights (linear shortcuts
    included) with Adam's moments; an upper bound (1,829 patches of 3 x 24 x 24: 312 MiB, measured +213 MiB)."""
    c, h, w = shape
    pix = c * h * w
    f1 = filters[0]
    levels = f1 * h * w + sum(f * h * w // 4 ** (i + 1) for i, f in enumerate((f1,) + tuple(filters[1:])))
    act = batch_size * 4 * (8 * pix + 10 * 2 * levels)
    flat = filters[2] * (h // 8) * (w // 8)
    n_w = 2 * flat * n_dense + 2 * n_dense * n_latent + 9 * 3 * sum(f * f for f in filters) * 2 + 2 * pix * n_latent
    return int(4 * n * pix * 2 + 2 * act + 4 * 4 * n_w)


def _split(n: int, val_fraction: float, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(val_fraction * n)) if n >= 10 else 0
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def _evaluate(net, x, cond, idx, batch_size, beta):
    """Mean loss and squared error per patch over ``idx``, posterior means decoded (no noise)."""
    total, rec, m = 0.0, 0.0, 0
    for b in range(0, idx.numel(), batch_size):
        j = idx[b:b + batch_size].to(x.device)
        l, r, _ = _loss(net, x[j], cond[j], None, beta)
        total += float(l) * j.numel()
        rec += float(r) * j.numel()
        m += j.numel()
    return total / max(m, 1), rec / max(m, 1)


def _lr_at(step: int, total: int, lr: float) -> float:
    """One cycle: linear warm-up from lr / 25 over 10 % of the steps, cosine annealing to lr / 1e4."""
    warm = max(1, int(0.1 * total))
    if step < warm:
        return lr / 25 + (lr - lr / 25) * step / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return lr / 1e4 + (lr - lr / 1e4) * 0.5 * (1 + math.cos(math.pi * t))


def _initialise(net, x, idx, gen, max_patches: int = 2048):
    """Standardisation and linear shortcuts of ``net`` from (a seeded subsample of at most ``max_patches``
    of) the training patches ``idx``."""
    if idx.numel() > max_patches:
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:max_patches]]
    net.init_linear(x[idx.to(x.device)])


class _Run:
    """The mutable state of one training run: optimiser, schedule, early stopping, history."""

    def __init__(self, net, opt, *, lr, schedule, total_steps, lr_patience, lr_factor, min_lr, weight_decay):
        self.net, self.opt, self.lr, self.schedule, self.total = net, opt, lr, schedule, total_steps
        self.lr_patience, self.lr_factor, self.min_lr, self.wd = lr_patience, lr_factor, min_lr, weight_decay
        self.step, self.best, self.best_state, self.since_best, self.since_lr = 0, np.inf, None, 0, 0
        self.decay = [p for p in opt.params if p.ndim > 1]

    def before_step(self):
        if self.schedule == "onecycle":
            self.opt.lr = _lr_at(self.step, self.total, self.lr)
        if self.wd:
            with torch.no_grad():
                for p in self.decay:  # decoupled weight decay (AdamW)
                    p.mul_(1.0 - self.opt.lr * self.wd)
        self.step += 1

    def end_epoch(self, ep, v, hist):
        if v < self.best - 1e-6 * abs(self.best if np.isfinite(self.best) else 1.0):
            self.best, self.since_best, self.since_lr, hist["best_epoch"] = v, 0, 0, ep
            self.best_state = {k: t.detach().clone() for k, t in self.net.state_dict().items()}
            return
        self.since_best += 1
        self.since_lr += 1
        if self.schedule == "plateau" and self.since_lr >= self.lr_patience:
            self.opt.lr, self.since_lr = max(self.min_lr, self.opt.lr * self.lr_factor), 0


def _epoch(run, x, c, train_idx, batch_size, beta, grad_clip, augment, gen, device):
    net, opt = run.net, run.opt
    net.train()
    order = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
    tot = 0.0
    for b in range(0, order.numel(), batch_size):
        j = order[b:b + batch_size]
        eps = torch.randn((j.numel(), net.n_latent), generator=gen).to(device)
        xb = x[j.to(device)]
        if augment:
            xb = dihedral(xb, torch.randint(0, 8, (j.numel(),), generator=gen))
        loss, _, _ = _loss(net, xb, c[j.to(device)], eps, beta)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm(opt.params, grad_clip)
        run.before_step()
        opt.step()
        tot += float(loss.detach()) * j.numel()
    return tot / max(train_idx.numel(), 1)


def train_cvae(patches: np.ndarray, cond: np.ndarray, *, n_latent: int = 16, n_dense: int = 128,
               epochs: int = 60, batch_size: int = 64, lr: float = 1e-3, beta: float = 1.0,
               val_fraction: float = 0.1, patience: int = 10, lr_patience: int = 2, lr_factor: float = 0.5,
               min_lr: float = 1e-5, weight_decay: float = 1e-4, grad_clip: float = 10.0, seed: int = 0,
               filters=FILTERS, residual: bool = False, augment: bool = True, kl_warmup: int = 5,
               schedule: str = "onecycle", device: torch.device = torch.device("cpu"), label: str = "phenocoder"):
    """Train on ``patches`` (n, C, H, W float) with conditions ``cond`` (n, k). Returns ``(net, history)``:
    ``history = {"train", "val", "val_rec", "lr", "best_epoch", "stopped_early", "val_index"}``."""
    if schedule not in ("onecycle", "plateau"):
        raise InputError(f"schedule must be 'onecycle' or 'plateau', not {schedule!r}")
    n = patches.shape[0]
    net = build(patches.shape[1:], cond.shape[1], n_latent, n_dense, seed, filters, residual).to(device)
    opt = Adam(list(net.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    x = torch.as_tensor(np.asarray(patches), dtype=torch.float32, device=device)
    c = torch.as_tensor(np.asarray(cond), dtype=torch.float32, device=device)
    train_idx, val_idx = _split(n, float(val_fraction), gen)
    _initialise(net, x, train_idx, gen)
    batch_size = int(batch_size)
    run = _Run(net, opt, lr=float(lr), schedule=schedule, total_steps=int(epochs) * math.ceil(
        train_idx.numel() / batch_size), lr_patience=int(lr_patience), lr_factor=float(lr_factor),
        min_lr=float(min_lr), weight_decay=float(weight_decay))
    kl_w = beta * 2.0 * PIXEL_SD ** 2
    hist = {"train": [], "val": [], "val_rec": [], "lr": [], "best_epoch": 0, "stopped_early": False,
            "val_index": val_idx.numpy().tolist()}
    with single_thread(device), progress(int(epochs), f"{label}: epochs") as advance:
        for ep in range(int(epochs)):
            w = kl_w * min(1.0, (ep + 1) / kl_warmup) if kl_warmup > 0 else kl_w
            hist["train"].append(_epoch(run, x, c, train_idx, batch_size, w, grad_clip, augment, gen, device))
            net.eval()
            v, vr = _evaluate(net, x, c, val_idx if val_idx.numel() else train_idx, batch_size, kl_w)
            hist["val"].append(v)
            hist["val_rec"].append(vr)
            hist["lr"].append(opt.lr)
            run.end_epoch(ep, v, hist)
            advance(f"epoch {ep + 1} val {v:.4g}")
            if run.since_best >= patience:
                hist["stopped_early"] = True
                break
    if run.best_state is not None:
        net.load_state_dict(run.best_state)
    net.eval()
    return net, hist


@torch.no_grad()
def encode(net: PatchCVAE, patches: np.ndarray, cond: np.ndarray, device, batch_size: int = 512) -> np.ndarray:
    """Posterior means ``mu`` (n, n_latent) as float32."""
    out = []
    with single_thread(torch.device(device)):
        for b in range(0, patches.shape[0], batch_size):
            x = torch.as_tensor(patches[b:b + batch_size], dtype=torch.float32, device=device)
            c = torch.as_tensor(cond[b:b + batch_size], dtype=torch.float32, device=device)
            out.append(net.encode(x, c)[0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.n_latent), np.float32)


@torch.no_grad()
def reconstruct(net: PatchCVAE, patches: np.ndarray, cond: np.ndarray, device, batch_size: int = 512):
    """Decoded posterior means, shaped like ``patches``."""
    out = []
    with single_thread(torch.device(device)):
        for b in range(0, patches.shape[0], batch_size):
            x = torch.as_tensor(patches[b:b + batch_size], dtype=torch.float32, device=device)
            c = torch.as_tensor(cond[b:b + batch_size], dtype=torch.float32, device=device)
            out.append(net.decode(net.encode(x, c)[0], c).cpu().numpy())
    return np.concatenate(out)


def pca_reconstruction_error(train: np.ndarray, test: np.ndarray, k: int) -> float:
    """Mean squared error per patch (summed over pixels) of ``test`` rebuilt from the top ``k`` principal
    components of ``train`` (the linear baseline of the same size as the latent space)."""
    a = torch.as_tensor(train.reshape(len(train), -1), dtype=torch.float64)
    b = torch.as_tensor(test.reshape(len(test), -1), dtype=torch.float64)
    mean = a.mean(0)
    with single_thread(torch.device("cpu")):
        _, _, vt = torch.linalg.svd(a - mean, full_matrices=False)
        v = vt[:k].T
        rec = (b - mean) @ v @ v.T + mean
    return float(((rec - b) ** 2).sum(1).mean())


def state_to_numpy(net: PatchCVAE) -> dict:
    """The weights and buffers as numpy arrays (for ``uns``; no pickle)."""
    return {k.replace(".", "__"): v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def net_from_state(config: dict, state: dict, device) -> PatchCVAE:
    net = PatchCVAE(tuple(config["shape"]), int(config["n_cond"]), int(config["n_latent"]), int(config["n_dense"]),
                    tuple(config.get("filters", FILTERS)), bool(config.get("residual", False)))
    weights = {k.replace("__", "."): torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:  # missing, unexpected or reshaped weights
        raise InputError("the stored patch model does not fit this expkit's network (trained by another "
                         f"version?): train it again with train_patch_cvae ({str(e).splitlines()[0]})") from None
    return net.to(device).eval()
