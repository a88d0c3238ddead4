"""Nearest points of QuIP#'s fixed lattice codebooks (formats/e8p.py), under a per-coordinate weighted distance
sum_t w_t (y_t - c_t)^2 (weight 0: the coordinate does not exist).

E8P is searched exactly without enumerating its 2^16 points: for a shift sigma/4 and an abs pattern A (256 of them) the
best signs are those of y - sigma/4, except that their parity must match A's; if it does not, the one coordinate that
costs least (min_t 4 w_t A_t |y_t - sigma/4|) flips. That is 2 x 256 candidates per vector, scored with one matrix
product. The 256-point E81B codebook is searched by brute force.
"""

from __future__ import annotations

import torch

from ...formats import e8p


def nearest_e8p(y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y float [M, 8] in codebook units, w broadcastable to [M, 8] (>= 0). Returns (points float [M, 8], abs index
    int64 [M], sign byte int64 [M]); the first candidate wins ties (shift +1/4 before -1/4, lower abs index first)."""
    w = w.expand(y.shape[0], e8p.DIM).to(y.dtype)
    plus, minus = (_nearest_shifted(y, w, sigma) for sigma in (1.0, -1.0))
    which = minus[0] < plus[0]
    return tuple(torch.where(which[:, None] if a.dim() == 2 else which, b, a)  # type: ignore[return-value]
                 for a, b in zip(plus[1:], minus[1:]))


def _nearest_shifted(y: torch.Tensor, w: torch.Tensor, sigma: float):
    """The best point with shift sigma/4: (distance, points, abs index, sign byte)."""
    g = e8p.abs_grid().to(y.dtype)  # [256, 8] positive
    parity = (e8p.abs_grid().sum(1).round().to(torch.int64) % 2).bool()  # required parity of the negative signs
    z = y - 0.25 * sigma
    az = z.abs()
    wz = w * az
    dist = (wz * az).sum(1, keepdim=True) - 2 * wz @ g.T + w @ (g * g).T  # sum_t w (|z| - A)^2: [M, 256]
    neg = z < 0
    mismatch = (neg.sum(1, keepdim=True) % 2).bool() != parity[None, :]
    cost, flip_at = (4 * wz[:, None, :] * g[None, :, :]).min(dim=2)
    dist = dist + torch.where(mismatch, cost, torch.zeros_like(cost))
    d, a = dist.min(dim=1)
    rows = torch.nonzero(mismatch.gather(1, a[:, None])[:, 0], as_tuple=True)[0]
    cols = flip_at.gather(1, a[:, None])[:, 0][rows]
    neg[rows, cols] = ~neg[rows, cols]
    pts = torch.where(neg, -g[a], g[a]) + 0.25 * sigma
    return d, pts, a, _sign_byte(neg, a, sigma)


def _sign_byte(neg: torch.Tensor, a: torch.Tensor, sigma: float) -> torch.Tensor:
    """The sign byte b that decodes (abs a, negative coordinates `neg`, shift sigma) (see formats/e8p.py)."""
    odd = (e8p.abs4_table()[:, 7] < 0)[a]  # A4 holds coordinate 7 negated
    bp = neg.clone()
    bp[:, 7] ^= odd
    b = (bp.to(torch.int64) << torch.arange(e8p.DIM)).sum(1)  # b' has even parity by construction
    return b if sigma > 0 else b ^ 1


def nearest_e81(y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force nearest point of the E81B codebook: (points float [M, 8], index int64 [M])."""
    m = y.shape[0]
    w = w.expand(m, e8p.DIM).to(y.dtype)
    c = e8p.e81_table().to(y.dtype) / 2
    dist = -2 * (w * y) @ c.T + w @ (c * c).T
    idx = dist.argmin(dim=1)
    return c[idx], idx
