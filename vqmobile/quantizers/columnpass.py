"""GPTQ's column pass over vectors of d consecutive columns, shared by the vector quantizers: GPTVQ (codebooks fitted
to the data) and QuIP# (fixed lattice codebooks), for which it is BlockLDLQ (Tseng et al., 2024: LDLQ over blocks of d
columns is GPTQ's recursion with the block's error pushed through the inverse Hessian's factor).

Columns are quantized in order, d at a time: a vector's target includes the error feedback of every column before it,
its error err = (w_J - q_J) U_JJ^-1 (U the upper Cholesky factor of H^-1, so the coupling inside the vector is exact)
is pushed onto the columns after it, within the current lazy block at once and onto the rest of the matrix once per
block of `block_size` columns.
"""

from __future__ import annotations

from typing import Callable

import torch


def padded_problem(w0: torch.Tensor, u: torch.Tensor, rows: int, cols: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed W [n, k] and U [k, k] into a [rows, cols] problem (whole vectors, whole row blocks): missing components
    get zero weight and an identity factor, so they are never coupled. Returns (W, U, hw) with hw[j] = 1 / U_jj^2 the
    Hessian weight of column j (the quantity GPTQ divides its loss by), 0 for padding."""
    n, k = w0.shape
    w = torch.zeros(rows, cols)
    w[:n, :k] = w0
    up = torch.eye(cols)
    up[:k, :k] = u
    hw = 1.0 / up.diagonal() ** 2
    hw[k:] = 0.0
    return w, up, hw


def vector_pass(w: torch.Tensor, u: torch.Tensor, c0: int, c1: int, d: int, block_size: int,
                quantize: Callable[[int, torch.Tensor], torch.Tensor], rows: int, cols: int) -> float:
    """Quantize columns [c0, c1) of w in place of their targets (w holds the error-updated weights on return; every
    column from c1 on has received the feedback of [c0, c1)). quantize(j, x) gets the targets x [N, d] of columns
    j..j+d-1 and returns their quantized values. Returns sum of err^2 over the first `rows` rows and `cols` columns."""
    bs = max(d, (block_size // d) * d)
    loss = 0.0
    for b0 in range(c0, c1, bs):
        b1 = min(b0 + bs, c1)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        for j in range(0, b1 - b0, d):
            xv = w1[:, j:j + d]
            q = quantize(b0 + j, xv)
            ujj = u1[j:j + d, j:j + d]
            e = (xv - q) / ujj[0, 0] if d == 1 else torch.linalg.solve_triangular(ujj, xv - q, upper=True, left=False)
            err1[:, j:j + d] = e
            if j + d < b1 - b0:
                w1[:, j + d:] -= e @ u1[j:j + d, j + d:]
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
        loss += float((err1[:rows, : max(0, min(b1, cols) - b0)] ** 2).sum())
    return loss
