"""SpaCon (Qu et al., integrative analysis of spatial transcriptome and connectome), written from its description.

Two graphs over the same spots: a spatial graph (nearest neighbours in 2-D/3-D) and a connection graph (pairs
whose connectivity exceeds a threshold). One graph-attention autoencoder: a spatial encoder on the spatial
graph and a connection encoder on the connection graph (three attention layers each), a decoder on the
connection graph that reconstructs the input features from the two encodings (concatenated) with skip
connections from the encoders' first two layers; the loss is the squared reconstruction error.

Training is by neighbour sampling, so memory does not grow with the whole graph: each batch of seed spots is
expanded over the connection graph hop by hop, keeping at most ``fanouts[h]`` random neighbours per spot at
hop ``h``; the spatial edges are those of the spatial graph among the sampled spots. Inference is layer-wise
over the full graphs (all edges). The clustering of :func:`fuse` weights the standardised connection and
spatial features by ``w = (exp(-4 alpha) - 1) / (exp(-4) - 1)`` (0 at ``alpha=0``, 1 at ``alpha=1``).

Attention of a layer with weights ``W``, vectors ``a_s``, ``a_d``: ``h = x W``,
``e_ij = sigmoid(a_s . h_j + a_d . h_i)`` for edges j -> i (self included), ``alpha_ij = softmax_j(e_ij)``,
``out_i = sum_j alpha_ij h_j``. Everything is edge lists and ``index_add``: linear in edges, no dense n x n.
All random draws (weights, batch order, sampled neighbours) come from seeded CPU generators, so the same seed
gives the same model, and CPU and CUDA see the same draws.
"""
from __future__ import annotations

import math
import os

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .._logging import progress
from ..errors import ResourceError
from .device import single_thread, to_numpy
from .optim import Adam, clip_grad_norm

__all__ = ["sample_subgraph", "induced_edges", "SpaConNet", "train_spacon", "infer", "fuse_weight",
           "fuse", "estimate_memory", "check_memory"]


# --------------------------------------------------------------------------------------------
# graphs and neighbour sampling
# --------------------------------------------------------------------------------------------
def _csr_tensors(a: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    a = sp.csr_matrix(a)
    return torch.as_tensor(a.indptr, dtype=torch.int64), torch.as_tensor(a.indices, dtype=torch.int64)


def _hop(indptr, indices, frontier, fanout: int, gen: torch.Generator):
    """At most ``fanout`` (all when < 0) random neighbours of every frontier node: (targets, sources)."""
    start, deg = indptr[frontier], indptr[frontier + 1] - indptr[frontier]
    total = int(deg.sum())
    if total == 0:
        return frontier[:0], frontier[:0]
    seg = torch.repeat_interleave(torch.arange(frontier.numel()), deg)
    offsets = torch.cumsum(deg, 0) - deg
    pos = start[seg] + torch.arange(total) - offsets[seg]
    if fanout >= 0:
        keys = seg.to(torch.float64) + torch.rand(total, generator=gen, dtype=torch.float64) * 0.5
        order = torch.argsort(keys, stable=True)
        rank = torch.arange(total) - offsets[seg[order]]
        keep = order[rank < fanout]
        seg, pos = seg[keep], pos[keep]
    return frontier[seg], indices[pos]


def sample_subgraph(indptr: torch.Tensor, indices: torch.Tensor, seeds: torch.Tensor, fanouts,
                    gen: torch.Generator, n: int):
    """Multi-hop neighbour sampling (GraphSAGE-style) over a CSR graph of ``n`` nodes.

    Returns ``(n_id, src, dst)``: the sampled nodes (global ids, seeds first) and the sampled edges
    ``src -> dst`` in local numbering (a target aggregates its sampled neighbours).
    """
    local = torch.full((n,), -1, dtype=torch.int64)
    n_id = [seeds]
    local[seeds] = torch.arange(seeds.numel())
    count = seeds.numel()
    frontier, srcs, dsts = seeds, [], []
    for f in fanouts:
        if frontier.numel() == 0:
            break
        tgt, nb = _hop(indptr, indices, frontier, int(f), gen)
        new = torch.unique(nb[local[nb] < 0])
        local[new] = torch.arange(count, count + new.numel())
        count += new.numel()
        n_id.append(new)
        srcs.append(local[nb])
        dsts.append(local[tgt])
        frontier = new
    n_id = torch.cat(n_id)
    if not srcs:  # no edge can repeat: every node is a target in one hop only, its neighbours distinct
        return n_id, seeds[:0], seeds[:0]
    return n_id, torch.cat(srcs), torch.cat(dsts)


def induced_edges(a: sp.csr_matrix, n_id: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges ``src -> dst`` (local ids) of graph ``a`` among the nodes ``n_id`` (``a[n_id][:, n_id]``)."""
    sub = sp.csr_matrix(a[n_id][:, n_id]).tocoo()
    return torch.as_tensor(sub.col, dtype=torch.int64), torch.as_tensor(sub.row, dtype=torch.int64)


def _with_self(src: torch.Tensor, dst: torch.Tensor, n: int):
    keep = src != dst
    loop = torch.arange(n, device=src.device)
    return torch.cat([src[keep], loop]), torch.cat([dst[keep], loop])


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """One graph-attention layer with a sigmoid score (module doc), no bias."""

    def __init__(self, n_in: int, n_out: int, gen: torch.Generator):
        super().__init__()
        std = 1.414 * math.sqrt(2.0 / (n_in + n_out))  # Xavier-normal, gain 1.414
        self.w = nn.Parameter(torch.randn(n_in, n_out, generator=gen) * std)
        std_a = 1.414 * math.sqrt(2.0 / (1 + n_out))
        self.a_src = nn.Parameter(torch.randn(n_out, generator=gen) * std_a)
        self.a_dst = nn.Parameter(torch.randn(n_out, generator=gen) * std_a)

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        h = x @ self.w
        e = torch.exp(torch.sigmoid((h @ self.a_src)[src] + (h @ self.a_dst)[dst]))  # bounded: no overflow
        denom = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device).index_add_(0, dst, e)
        wgt = e / denom[dst]
        return torch.zeros_like(h).index_add_(0, dst, h[src] * wgt[:, None])


class _Encoder(nn.Module):
    def __init__(self, dims, gen):
        super().__init__()
        self.layers = nn.ModuleList([_Attention(a, b, gen) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, x, src, dst):
        hs = []
        for i, layer in enumerate(self.layers):
            x = layer(x, src, dst)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.elu(x)
            hs.append(x)
        return hs


class SpaConNet(nn.Module):
    """Spatial and connection encoders (``dims = (n_in, h1, h2, n_latent)``) and a connection-graph decoder."""

    def __init__(self, dims, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        dims = [int(d) for d in dims]
        self.spa = _Encoder(dims, gen)
        self.con = _Encoder(dims, gen)
        rev = dims[::-1]
        rev[0] = 2 * dims[-1]  # the decoder starts from the concatenated encodings
        self.dec = nn.ModuleList([_Attention(a, b, gen) for a, b in zip(rev[:-1], rev[1:])])

    def forward(self, x, spa_edges, con_edges):
        hs = self.spa(x, *spa_edges)
        hc = self.con(x, *con_edges)
        skips = [a + b for a, b in zip(hs[:-1], hc[:-1])][::-1]
        y = torch.cat([hc[-1], hs[-1]], dim=1)
        for i, layer in enumerate(self.dec):
            y = layer(y, *con_edges)
            if i < len(self.dec) - 1:
                y = torch.nn.functional.elu(y) + skips[i]
        return hs[-1], hc[-1], y


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def estimate_memory(n: int, n_in: int, dims, n_spa_edges: int, n_con_edges: int, batch_nodes: int,
                    batch_edges: int) -> int:
    """Bytes a run needs at its peak (float32 activations, int64 edges): the full-graph inference (both
    encoders, layer by layer, with per-edge messages) or a training batch with gradients, whichever is larger."""
    width = max(int(d) for d in dims)
    graphs = 16 * (n_spa_edges + n_con_edges + 2 * n)
    infer_b = 4 * n * (n_in + 3 * sum(dims)) + 4 * max(n_spa_edges, n_con_edges) * (width + 4) + graphs
    train_b = 4 * 3 * batch_nodes * (n_in + 4 * sum(dims)) + 4 * 3 * batch_edges * (width + 4)
    return int(infer_b + train_b + graphs)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def check_memory(need: int, device: torch.device, limit: int | None, what: str) -> None:
    have = available_memory(device) if limit is None else int(limit)
    if need > have:
        raise ResourceError(f"{what} needs about {need / 2**20:,.1f} MiB on {device.type} but "
                            f"{have / 2**20:,.1f} MiB are available: use fewer spots, smaller fanouts, "
                            f"batch_size or hidden dimensions, or a threshold that keeps fewer connections")


# --------------------------------------------------------------------------------------------
# training and inference
# --------------------------------------------------------------------------------------------
def _batch(x, spa, con_ptr, con_idx, seeds, fanouts, gen, device):
    n_id, cs, cd = sample_subgraph(con_ptr, con_idx, seeds, fanouts, gen, x.shape[0])
    ss, sd = induced_edges(spa, n_id.numpy())
    m = n_id.numel()
    spa_e = tuple(t.to(device) for t in _with_self(ss, sd, m))
    con_e = tuple(t.to(device) for t in _with_self(cs, cd, m))
    return x[n_id.to(device)], spa_e, con_e


def train_spacon(x: np.ndarray, spa: sp.csr_matrix, con: sp.csr_matrix, *, hidden=(128, 64, 32),
                 fanouts=(20, 10, 10), batch_size: int = 64, epochs: int = 10, lr: float = 1e-3,
                 weight_decay: float = 1e-4, grad_clip: float = 5.0, seed: int = 0,
                 device: torch.device = torch.device("cpu"), label: str = "spacon"):
    """Train :class:`SpaConNet` on features ``x`` (n x p) and the two graphs (n x n, binary CSR: row i lists
    the neighbours i aggregates). Returns ``(net, losses)`` with the mean loss per spot of every epoch."""
    n = x.shape[0]
    net = SpaConNet((x.shape[1],) + tuple(hidden), seed).to(device)
    opt = Adam(list(net.parameters()), lr=lr, weight_decay=weight_decay)
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
    con_ptr, con_idx = _csr_tensors(con)
    spa = sp.csr_matrix(spa)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    losses = []
    with single_thread(device), progress(int(epochs), f"{label}: epochs") as advance:
        for ep in range(int(epochs)):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for b in range(0, n, int(batch_size)):
                xb, spa_e, con_e = _batch(xt, spa, con_ptr, con_idx, order[b:b + int(batch_size)], fanouts,
                                          gen, device)
                _, _, rec = net(xb, spa_e, con_e)
                loss = (rec - xb).pow(2).sum() / xb.shape[0]
                opt.zero_grad()
                loss.backward()
                clip_grad_norm(opt.params, grad_clip)
                opt.step()
                total += float(loss.detach()) * xb.shape[0]
            losses.append(total / n)
            advance(f"epoch {ep + 1} loss {losses[-1]:.4g}")
    return net, losses


@torch.no_grad()
def infer(net: SpaConNet, x: np.ndarray, spa: sp.csr_matrix, con: sp.csr_matrix, device: torch.device):
    """Full-graph features: ``(spatial (n x d), connection (n x d), reconstruction (n x p))`` as numpy."""
    n = x.shape[0]
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
    edges = []
    for a in (spa, con):
        coo = sp.csr_matrix(a).tocoo()
        s, d = _with_self(torch.as_tensor(coo.col, dtype=torch.int64), torch.as_tensor(coo.row, dtype=torch.int64), n)
        edges.append((s.to(device), d.to(device)))
    hs, hc, rec = net(xt, edges[0], edges[1])
    return to_numpy(hs), to_numpy(hc), to_numpy(rec)


def fuse_weight(alpha: float) -> float:
    """SpaCon's weight of the connection features: ``(exp(-4 alpha) - 1) / (exp(-4) - 1)``."""
    return float((math.exp(-4.0 * alpha) - 1.0) / (math.exp(-4.0) - 1.0))


def _standardise(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    sd = f.std(axis=0)
    return (f - f.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def fuse(spa_features: np.ndarray, con_features: np.ndarray, alpha: float) -> np.ndarray:
    """``w * z(con) + (1 - w) * z(spa)`` with per-column z-scores and ``w = fuse_weight(alpha)``."""
    w = fuse_weight(alpha)
    return w * _standardise(con_features) + (1.0 - w) * _standardise(spa_features)
