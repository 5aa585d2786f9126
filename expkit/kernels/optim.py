"""A small Adam optimiser and gradient clipping, written out.

torch.optim's first ``step`` imports torch._dynamo, which costs seconds on a small CPU; these loops are
the same arithmetic (Kingma and Ba 2015; torch's L2 ``weight_decay`` convention: the decay is added to
the gradient before the moments).
"""
from __future__ import annotations

import torch

__all__ = ["Adam", "clip_grad_norm"]


class Adam:
    """Adam with betas (0.9, 0.999), eps 1e-8 and optional L2 ``weight_decay``."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params, self.lr, self.b1, self.b2, self.eps = list(params), lr, betas[0], betas[1], eps
        self.weight_decay = float(weight_decay)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if g is None:
                continue
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients so that their joint L2 norm is at most ``max_norm``; returns the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.sqrt(sum((g * g).sum() for g in grads))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return float(total)
