"""Phenocoder: a conditional convolutional variational autoencoder of object image patches, from its description.

A patch ``x`` (channels x H x W, intensities scaled to about [0, 1]) and a condition vector ``c`` (one-hot
codes of e.g. the sample and the z-slice) are encoded by three stride-2 convolutions (16, 32, 64 filters,
3 x 3, ELU), a dense layer of ``n_dense`` units on ``[features, c]`` and two heads, the mean ``mu`` and
log-variance of a Gaussian posterior ``q(z | x, c)`` with ``n_latent`` dimensions; the decoder mirrors it from
``[z, c]`` (dense, three stride-2 transposed convolutions). The loss per patch is the squared reconstruction
error summed over pixels plus ``beta`` times ``KL(q(z | x, c) || N(0, I))`` (a Gaussian likelihood of unit
variance: the evidence lower bound up to constants); the condition lets the latent space drop what the
condition explains (sample staining, depth).

Training: Adam on mini-batches; a seeded share ``val_fraction`` of patches is held out; the learning rate is
halved when the validation loss has not improved for ``lr_patience`` epochs (reduce on plateau), training stops
when it has not improved for ``patience`` epochs (early stopping), and the weights of the best epoch are kept.
Weights, batch order, the split and the reparameterisation noise come from seeded CPU generators, so a seed
gives identical runs, and CPU and CUDA see the same draws.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._logging import progress
from ..errors import InputError
from .device import single_thread
from .optim import Adam, clip_grad_norm

__all__ = ["PatchCVAE", "train_cvae", "encode", "reconstruct", "state_to_numpy", "net_from_state",
           "pca_reconstruction_error", "estimate_memory"]

FILTERS = (16, 32, 64)


class PatchCVAE(nn.Module):
    """Conditional convolutional VAE of ``shape = (C, H, W)`` patches (H, W multiples of 8)."""

    def __init__(self, shape, n_cond: int, n_latent: int = 32, n_dense: int = 64):
        super().__init__()
        c, h, w = (int(v) for v in shape)
        if h % 8 or w % 8:
            raise InputError(f"patch sides must be multiples of 8, not {h} x {w}")
        self.shape, self.n_cond, self.n_latent, self.n_dense = (c, h, w), int(n_cond), int(n_latent), int(n_dense)
        f1, f2, f3 = FILTERS
        self.conv = nn.Sequential(nn.Conv2d(c, f1, 3, 2, 1), nn.ELU(), nn.Conv2d(f1, f2, 3, 2, 1), nn.ELU(),
                                  nn.Conv2d(f2, f3, 3, 2, 1), nn.ELU(), nn.Flatten())
        self.flat = f3 * (h // 8) * (w // 8)
        self.enc = nn.Sequential(nn.Linear(self.flat + self.n_cond, self.n_dense), nn.ELU())
        self.mu = nn.Linear(self.n_dense, self.n_latent)
        self.logvar = nn.Linear(self.n_dense, self.n_latent)
        self.dec = nn.Sequential(nn.Linear(self.n_latent + self.n_cond, self.n_dense), nn.ELU(),
                                 nn.Linear(self.n_dense, self.flat), nn.ELU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(f3, f2, 3, 2, 1, output_padding=1), nn.ELU(),
            nn.ConvTranspose2d(f2, f1, 3, 2, 1, output_padding=1), nn.ELU(),
            nn.ConvTranspose2d(f1, c, 3, 2, 1, output_padding=1))

    def encode(self, x, cond):
        h = self.enc(torch.cat([self.conv(x), cond], dim=1))
        return self.mu(h), self.logvar(h).clamp(-12.0, 12.0)

    def decode(self, z, cond):
        c, h, w = self.shape
        y = self.dec(torch.cat([z, cond], dim=1)).view(-1, FILTERS[2], h // 8, w // 8)
        return self.deconv(y)

    def forward(self, x, cond, eps):
        mu, logvar = self.encode(x, cond)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z, cond), mu, logvar


def build(shape, n_cond, n_latent, n_dense, seed: int) -> PatchCVAE:
    """A network with weights drawn from ``seed`` (torch's default initialisation, on the CPU), leaving the
    global random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return PatchCVAE(shape, n_cond, n_latent, n_dense)


def _loss(net, x, cond, eps, beta):
    rec, mu, logvar = net(x, cond, eps)
    r = (rec - x).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return (r + beta * kl).mean(), r.mean()


def estimate_memory(n: int, shape, batch_size: int, n_latent: int, n_dense: int) -> int:
    """Bytes at the peak of training: the patches (float32), a batch's activations and gradients, the
    weights with Adam's moments."""
    c, h, w = shape
    pix = c * h * w
    act = batch_size * 4 * (2 * pix + sum(f * h * w // 4 ** (i + 1) for i, f in enumerate(FILTERS)) * 2)
    flat = FILTERS[2] * (h // 8) * (w // 8)
    weights = 4 * 4 * (2 * flat * n_dense + 2 * n_dense * n_latent + 9 * 2 * sum(FILTERS) * max(FILTERS))
    return int(4 * n * pix * 2 + 3 * act + weights)


def _split(n: int, val_fraction: float, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(val_fraction * n)) if n >= 10 else 0
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def _evaluate(net, x, cond, idx, batch_size, beta, gen, device):
    total, rec, m = 0.0, 0.0, 0
    for b in range(0, idx.numel(), batch_size):
        j = idx[b:b + batch_size]
        eps = torch.randn((j.numel(), net.n_latent), generator=gen).to(device)
        l, r = _loss(net, x[j.to(device)], cond[j.to(device)], eps, beta)
        total += float(l) * j.numel()
        rec += float(r) * j.numel()
        m += j.numel()
    return total / max(m, 1), rec / max(m, 1)


def train_cvae(patches: np.ndarray, cond: np.ndarray, *, n_latent: int = 32, n_dense: int = 64,
               epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, beta: float = 1.0,
               val_fraction: float = 0.1, patience: int = 5, lr_patience: int = 2, lr_factor: float = 0.5,
               min_lr: float = 1e-5, weight_decay: float = 0.0, grad_clip: float = 10.0, seed: int = 0,
               device: torch.device = torch.device("cpu"), label: str = "phenocoder"):
    """Train on ``patches`` (n, C, H, W float) with conditions ``cond`` (n, k). Returns ``(net, history)``:
    ``history = {"train", "val", "val_rec", "lr", "best_epoch", "stopped_early", "val_index"}``."""
    n = patches.shape[0]
    net = build(patches.shape[1:], cond.shape[1], n_latent, n_dense, seed).to(device)
    opt = Adam(list(net.parameters()), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    x = torch.as_tensor(np.asarray(patches), dtype=torch.float32, device=device)
    c = torch.as_tensor(np.asarray(cond), dtype=torch.float32, device=device)
    train_idx, val_idx = _split(n, float(val_fraction), gen)
    hist = {"train": [], "val": [], "val_rec": [], "lr": [], "best_epoch": 0, "stopped_early": False,
            "val_index": val_idx.numpy().tolist()}
    best, best_state, since_best, since_lr = np.inf, None, 0, 0
    with single_thread(device), progress(int(epochs), f"{label}: epochs") as advance:
        for ep in range(int(epochs)):
            net.train()
            order = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
            tot = 0.0
            for b in range(0, order.numel(), int(batch_size)):
                j = order[b:b + int(batch_size)]
                eps = torch.randn((j.numel(), net.n_latent), generator=gen).to(device)
                loss, _ = _loss(net, x[j.to(device)], c[j.to(device)], eps, beta)
                opt.zero_grad()
                loss.backward()
                clip_grad_norm(opt.params, grad_clip)
                opt.step()
                tot += float(loss.detach()) * j.numel()
            net.eval()
            ref = val_idx if val_idx.numel() else train_idx
            v, vr = _evaluate(net, x, c, ref, int(batch_size), beta, gen, device)
            hist["train"].append(tot / max(train_idx.numel(), 1))
            hist["val"].append(v)
            hist["val_rec"].append(vr)
            hist["lr"].append(opt.lr)
            if v < best - 1e-6 * abs(best if np.isfinite(best) else 1.0):
                best, since_best, since_lr, hist["best_epoch"] = v, 0, 0, ep
                best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
            else:
                since_best += 1
                since_lr += 1
                if since_lr >= lr_patience:
                    opt.lr, since_lr = max(min_lr, opt.lr * lr_factor), 0
            advance(f"epoch {ep + 1} val {v:.4g}")
            if since_best >= patience:
                hist["stopped_early"] = True
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return net, hist


@torch.no_grad()
def encode(net: PatchCVAE, patches: np.ndarray, cond: np.ndarray, device, batch_size: int = 512) -> np.ndarray:
    """Posterior means ``mu`` (n, n_latent) as float32."""
    out = []
    for b in range(0, patches.shape[0], batch_size):
        x = torch.as_tensor(patches[b:b + batch_size], dtype=torch.float32, device=device)
        c = torch.as_tensor(cond[b:b + batch_size], dtype=torch.float32, device=device)
        out.append(net.encode(x, c)[0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.n_latent), np.float32)


@torch.no_grad()
def reconstruct(net: PatchCVAE, patches: np.ndarray, cond: np.ndarray, device, batch_size: int = 512):
    """Decoded posterior means, shaped like ``patches``."""
    out = []
    for b in range(0, patches.shape[0], batch_size):
        x = torch.as_tensor(patches[b:b + batch_size], dtype=torch.float32, device=device)
        c = torch.as_tensor(cond[b:b + batch_size], dtype=torch.float32, device=device)
        out.append(net.decode(net.encode(x, c)[0], c).cpu().numpy())
    return np.concatenate(out)


def pca_reconstruction_error(train: np.ndarray, test: np.ndarray, k: int) -> float:
    """Mean squared error per patch (summed over pixels) of ``test`` rebuilt from the top ``k`` principal
    components of ``train`` (the linear baseline of the same size as the latent space)."""
    a = train.reshape(len(train), -1).astype(np.float64)
    b = test.reshape(len(test), -1).astype(np.float64)
    mean = a.mean(0)
    _, _, vt = np.linalg.svd(a - mean, full_matrices=False)
    v = vt[:k].T
    rec = (b - mean) @ v @ v.T + mean
    return float(((rec - b) ** 2).sum(1).mean())


def state_to_numpy(net: PatchCVAE) -> dict:
    """The weights as numpy arrays (for ``uns``; no pickle)."""
    return {k.replace(".", "__"): v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def net_from_state(config: dict, state: dict, device) -> PatchCVAE:
    net = PatchCVAE(tuple(config["shape"]), int(config["n_cond"]), int(config["n_latent"]), int(config["n_dense"]))
    net.load_state_dict({k.replace("__", "."): torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    return net.to(device).eval()
