"""DeepST's model (Xu et al., Nucleic Acids Res 50:e131, 2022), re-implemented from the paper: arrays in, arrays out.

The network, for spot features ``X`` (PCA of the augmented expression) and the normalised spatial graph
``Â = D^-1/2 (A + I) D^-1/2``:

* a feature encoder ``f = MLP(X)`` (Linear -> BatchNorm -> ELU -> dropout, twice: 200 -> 32 -> 20);
* a variational graph encoder ``h = ReLU(BN(Â f W1))``, ``mu = Â h Wmu``, ``logvar = Â h Wlv`` (-> 8),
  ``g = mu + eps exp(logvar)`` while training, ``mu`` otherwise;
* the embedding ``z = [f, g]`` (28-d), decoded twice: ``X' = MLP(z)`` (reconstruction of the features)
  and ``sigmoid(z_i . z_j)`` (reconstruction of ``A + I``, the inner-product graph decoder);
* a DEC head: Student-t soft assignments ``q`` of ``z`` to learnable centres, target ``p`` refreshed every
  ``update_interval`` epochs, loss KL(p || q);
* with several samples, a domain-adversarial branch: ``z`` -> gradient reversal -> MLP -> sample logits,
  cross-entropy: the encoder learns an embedding from which the sample cannot be told.

Loss (pre-training): ``mse_weight * MSE(X', X) + bce_kld_weight * (norm * BCE(A + I) + KL(N(mu, s) || N(0, 1)))``;
joint training adds ``kl_weight * KL(p || q)``. Inputs are corrupted by zeroing a fraction ``corrupt`` of
their entries (denoising).

The graph BCE is the mean over all n^2 pairs, written as sum_all softplus(z_i . z_j) - sum_edges z_i . z_j:
the edge sum is one sparse product, the all-pairs sum exact up to ``n_sample`` spots and above that estimated
without bias from an ``n_sample`` x ``n_sample`` block of drawn rows and columns, so no n x n matrix is formed
and memory is linear in the number of spots. Draws come from seeded CPU generators, so CPU and CUDA see the
same draws and a seed gives the same result.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .._logging import progress
from .device import single_thread
from .optim import Adam, clip_grad_norm

__all__ = ["DeepSTNet", "normalized_adjacency", "train_deepst", "embed", "estimate_bytes"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


class _SymSpMM(torch.autograd.Function):
    """``A @ x`` for a symmetric sparse ``A``: the backward is ``A @ grad`` (torch's generic backward builds
    the transpose as a new CSR matrix every step)."""

    @staticmethod
    def forward(ctx, a, x):
        ctx.a = a
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.a @ grad


def spmm(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _SymSpMM.apply(a, x)


def _mlp(sizes, dropout: float, last_act: bool = True) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b), nn.ELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class DeepSTNet(nn.Module):
    """The network of the module docstring; ``n_batches > 1`` adds the adversarial branch."""

    def __init__(self, n_in: int, *, hidden=(32, 20), conv_hidden=(32, 8), n_batches: int = 1,
                 dropout: float = 0.01):
        super().__init__()
        self.encoder = _mlp((n_in, *hidden), dropout)
        self.w1 = nn.Linear(hidden[-1], conv_hidden[0], bias=False)
        self.bn1 = nn.BatchNorm1d(conv_hidden[0])
        self.w_mu = nn.Linear(conv_hidden[0], conv_hidden[1], bias=False)
        self.w_lv = nn.Linear(conv_hidden[0], conv_hidden[1], bias=False)
        self.n_latent = hidden[-1] + conv_hidden[1]
        self.decoder = _mlp((self.n_latent, hidden[0], n_in), dropout, last_act=False)
        self.adversary = (_mlp((self.n_latent, hidden[0], n_batches), dropout, last_act=False)
                          if n_batches > 1 else None)
        self.centres: nn.Parameter | None = None

    def forward(self, x: torch.Tensor, adj: torch.Tensor, noise: torch.Tensor | None = None):
        f = self.encoder(x)
        h = torch.relu(self.bn1(spmm(adj, self.w1(f))))
        mu = spmm(adj, self.w_mu(h))
        logvar = spmm(adj, self.w_lv(h))
        g = mu + noise * torch.exp(logvar) if noise is not None else mu
        z = torch.cat([f, g], dim=1)
        return z, mu, logvar, self.decoder(z)


def _coo(m: sp.spmatrix, device) -> torch.Tensor:
    m = sp.coo_matrix(m)
    idx = torch.as_tensor(np.vstack([m.row, m.col]), dtype=torch.int64)
    t = torch.sparse_coo_tensor(idx, torch.as_tensor(m.data, dtype=torch.float32), m.shape,
                                check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": products and their backward are used
        warnings.simplefilter("ignore", UserWarning)
        return t.to_sparse_csr().to(device)  # CSR products are the faster ones


def _with_self(a: sp.spmatrix) -> sp.csr_matrix:
    a = sp.csr_matrix(a, dtype=np.float64)
    return (((a + a.T) > 0).astype(np.float64) + sp.eye(a.shape[0])).tocsr()


def _binary_with_self(a: sp.spmatrix, device) -> torch.Tensor:
    return _coo(_with_self(a), device)


def normalized_adjacency(a: sp.spmatrix, device: torch.device) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` of a symmetric 0/1 graph as a sparse CSR tensor."""
    a = _with_self(a)
    d = np.asarray(a.sum(1)).ravel() ** -0.5
    return _coo(sp.diags(d) @ a @ sp.diags(d), device)


def soft_assign(z: torch.Tensor, mu: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    d2 = ((z * z).sum(1, keepdim=True) - 2.0 * (z @ mu.T) + (mu * mu).sum(1)).clamp_min(0.0)
    q = (1.0 + d2 / alpha).pow(-(alpha + 1.0) / 2.0)
    return q / q.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    p = q.pow(2) / q.sum(0)
    return p / p.sum(1, keepdim=True)


def _graph_bce(z, a1: torch.Tensor, n_sample: int, gen: torch.Generator) -> torch.Tensor:
    """Mean BCE of sigmoid(z_i . z_j) against ``A + I`` over all n^2 pairs, without an n x n matrix.

    With l_ij = z_i . z_j, the summed loss is sum_all softplus(l_ij) - sum_pos l_ij. The second sum is exact
    and costs one sparse product, sum(z * ((A + I) z)); the first is exact when n <= ``n_sample`` and
    otherwise estimated without bias from the n_sample x n_sample block of independently drawn rows and
    columns (one dense product)."""
    n = z.shape[0]
    pos = (z * spmm(a1, z)).sum()
    if n <= n_sample:
        allp = nn.functional.softplus(z @ z.T).sum()
    else:
        rows = torch.randint(0, n, (n_sample,), generator=gen).to(z.device)
        cols = torch.randint(0, n, (n_sample,), generator=gen).to(z.device)
        allp = nn.functional.softplus(z[rows] @ z[cols].T).sum() * ((float(n) / n_sample) ** 2)
    return (allp - pos) / (float(n) * n)


def _vae_kl(mu, logvar, n: int) -> torch.Tensor:
    # the VGAE's KL term with s = exp(logvar) as the standard deviation, averaged over nodes and scaled 1/n
    return -0.5 / n * torch.mean(torch.sum(1 + 2 * logvar - mu.pow(2) - torch.exp(logvar).pow(2), 1))


def _losses(net, x, xin, adj, a1, n_pos, cfg, gen, noise_gen):
    n = x.shape[0]
    noise = torch.randn(n, net.w_mu.out_features, generator=noise_gen).to(x.device)
    z, mu, logvar, xrec = net(xin, adj, noise)
    norm = (float(n) * n) / ((float(n) * n - n_pos) * 2.0)
    loss = cfg["mse_weight"] * nn.functional.mse_loss(xrec, x)
    loss = loss + cfg["bce_kld_weight"] * (norm * _graph_bce(z, a1, cfg["n_sample"], gen)
                                           + _vae_kl(mu, logvar, n))
    return z, loss


def _corrupt(x: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Masking noise: round(rate * x.numel()) entries, drawn uniformly (with replacement), set to 0."""
    k = int(round(rate * x.numel()))
    if k <= 0:
        return x
    idx = torch.randint(0, x.numel(), (k,), generator=gen).to(x.device)
    return x.flatten().index_fill(0, idx, 0.0).view_as(x)


@torch.no_grad()
def embed(net: DeepSTNet, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """The embedding ``z`` in evaluation mode (BatchNorm running statistics, no dropout, ``g = mu``)."""
    net.eval()
    z, _, _, _ = net(x, adj, None)
    return z


def _adversary_loss(net, z, batches):
    if net.adversary is None or batches is None:
        return 0.0
    logits = net.adversary(_GradReverse.apply(z, 1.0))
    return nn.functional.cross_entropy(logits, batches)


def _step(net, opt, loss, grad_clip):
    opt.zero_grad()
    loss.backward()
    clip_grad_norm(opt.params, grad_clip)
    opt.step()


def _init_centres(z: np.ndarray, labels: np.ndarray, device) -> nn.Parameter:
    k = int(labels.max()) + 1
    onehot = np.eye(k, dtype=np.float64)[labels]
    mu = (onehot.T @ z.astype(np.float64)) / np.maximum(onehot.sum(0), 1)[:, None]
    return nn.Parameter(torch.as_tensor(mu, dtype=torch.float32, device=device))


def train_deepst(x: np.ndarray, graph: sp.spmatrix, *, pre_epochs: int = 200, epochs: int = 200,
                 init_clusters=None, batches: np.ndarray | None = None, seed: int = 0, device=None,
                 lr: float = 5e-4, weight_decay: float = 1e-4, corrupt: float = 0.001, mse_weight: float = 10.0,
                 bce_kld_weight: float = 0.1, kl_weight: float = 100.0, domain_weight: float = 1.0,
                 n_sample: int = 512, update_interval: int = 20, dec_alpha: float = 1.0, grad_clip: float = 5.0,
                 hidden=(32, 20), conv_hidden=(32, 8), dropout: float = 0.01, label: str = "") -> dict:
    """Pre-train the autoencoder for ``pre_epochs``, initialise the DEC centres from ``init_clusters(z)``
    (a function of the pre-trained embedding returning labels), then train everything for ``epochs``.

    ``x``: (n, d) features; ``graph``: the symmetric n x n spatial graph (block-diagonal for several samples);
    ``batches``: the sample index of each row (adds the adversarial branch when there are several).
    Returns ``{"z": (n, 28) float32, "q": soft assignments, "losses": [...], "epochs": (pre, joint)}``.
    """
    device = device or torch.device("cpu")
    with single_thread(device):  # many small ops: one thread is faster than two waiting on each other
        return _train(x, graph, pre_epochs, epochs, init_clusters, batches, seed, device, label, dict(
            lr=lr, weight_decay=weight_decay, corrupt=corrupt, mse_weight=mse_weight, bce_kld_weight=bce_kld_weight,
            kl_weight=kl_weight, domain_weight=domain_weight, n_sample=int(n_sample), update_interval=update_interval,
            dec_alpha=dec_alpha, grad_clip=grad_clip, hidden=hidden, conv_hidden=conv_hidden, dropout=dropout))


class _State:
    """What every epoch needs: the network, the features, both graphs, the generators and the settings."""

    def __init__(self, x, graph, batches, seed, device, c):
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed + 1)  # corruption masks and pair blocks
        self.noise_gen = torch.Generator().manual_seed(seed + 2)  # the VAE's noise
        n_batches = int(batches.max()) + 1 if batches is not None else 1
        self.net = DeepSTNet(x.shape[1], hidden=c["hidden"], conv_hidden=c["conv_hidden"], n_batches=n_batches,
                             dropout=c["dropout"]).to(device)
        self.x = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
        self.adj = normalized_adjacency(graph, device)
        self.a1 = _binary_with_self(graph, device)
        self.n_pos = int(self.a1.values().numel())
        self.batches = torch.as_tensor(batches, dtype=torch.int64, device=device) if n_batches > 1 else None
        self.c, self.device, self.losses = c, device, []

    def optimiser(self):
        return Adam(list(self.net.parameters()), lr=self.c["lr"], weight_decay=self.c["weight_decay"])

    def loss(self, corrupt: float):
        self.net.train()
        xin = _corrupt(self.x, corrupt, self.gen)
        z, loss = _losses(self.net, self.x, xin, self.adj, self.a1, self.n_pos, self.c, self.gen, self.noise_gen)
        return z, loss + self.c["domain_weight"] * _adversary_loss(self.net, z, self.batches)

    def step(self, opt, loss):
        _step(self.net, opt, loss, self.c["grad_clip"])
        self.losses.append(float(loss.detach()))

    def embed(self):
        return embed(self.net, self.x, self.adj)


def _pretrain(st: _State, epochs: int, label: str) -> None:
    opt = st.optimiser()
    with progress(epochs, f"DeepST{label}: pretraining initial model") as advance:
        for _ in range(epochs):
            _, loss = st.loss(st.c["corrupt"])
            st.step(opt, loss)
            advance()


def _train_dec(st: _State, epochs: int, labels: np.ndarray, label: str) -> None:
    c = st.c
    st.net.centres = _init_centres(st.embed().cpu().numpy(), labels, st.device)
    opt = st.optimiser()
    p = None
    with progress(epochs, f"DeepST{label}: training with the clustering head") as advance:
        for epoch in range(epochs):
            if epoch % c["update_interval"] == 0:  # the sharpened target, refreshed
                p = target_distribution(soft_assign(st.embed(), st.net.centres.detach(), c["dec_alpha"]))
            z, loss = st.loss(0.0)
            q = soft_assign(z, st.net.centres, c["dec_alpha"])
            loss = loss + c["kl_weight"] * torch.mean(p * (torch.log(p + 1e-12) - torch.log(q + 1e-12)))
            st.step(opt, loss)
            advance()


def _train(x, graph, pre_epochs, epochs, init_clusters, batches, seed, device, label, c):
    st = _State(x, graph, batches, seed, device, c)
    _pretrain(st, pre_epochs, label)
    z0 = st.embed().cpu().numpy()
    out = {"z_pre": z0}
    if epochs > 0:
        labels = np.asarray(init_clusters(z0)) if init_clusters is not None else np.zeros(len(z0), np.int64)
        _train_dec(st, epochs, labels, label)
        out["n_dec_clusters"] = int(st.net.centres.shape[0])
    z = st.embed()
    if st.net.centres is not None:
        out["q"] = soft_assign(z, st.net.centres.detach(), c["dec_alpha"]).cpu().numpy()
    out.update(z=z.cpu().numpy().astype(np.float32), losses=st.losses, epochs=(pre_epochs, epochs))
    return out


def estimate_bytes(n: int, n_features: int, n_edges: int, *, n_sample: int = 512, n_latent: int = 28,
                   n_dec_clusters: int = 50) -> int:
    """Peak bytes of one training step: the features, their corrupted copy and reconstruction, the activations
    kept for the backward pass (~8 layers of <= max(n_features, 32) floats per spot, x3 with their gradients),
    the soft assignments, the two sparse graphs (int64 indices + float values, x3 while being built) and the
    sampled block of pair logits (x4: logits, softplus and their gradients)."""
    width = max(n_features, 32)
    acts = n * (4 * n_features + 8 * width + n_dec_clusters * 3 + n_latent * 6) * 4 * 3
    graphs = 2 * 3 * (n_edges + n) * (8 * 2 + 4)
    block = 4 * min(n, n_sample) ** 2 * 4
    return int(acts + graphs + block + 32 * 2**20)


def bytes_human(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"

