"""Layer Hessians H = 2 X^T X / n: accumulation from calibration inputs and the inverse-Cholesky factor GPTQ-style
quantizers propagate errors with. Shared by GPTQ and GPTVQ so both use identical dampening conventions."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running mean of 2 x x^T over every token that reaches a linear layer. Kept in float32 and rescaled on each
    update (as the reference GPTQ code does): float64 would double the cost of what is the pipeline's largest matmul."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        total = self.count + m
        self.h.mul_(self.count / total).addmm_(x.T, x, alpha=2.0 / total)
        self.count = total

    def value(self) -> torch.Tensor:
        return self.h


def inverse_cholesky(weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepare (W, U) for a column pass: columns no input ever reached are zeroed, H is dampened by `damp` times its
    mean diagonal, and U is the upper Cholesky factor of H^-1. Returns a fresh copy of W."""
    w = weight.clone().float()
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean_diag = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    # A rank-deficient H (few calibration tokens, wide layer) can defeat 1% dampening; grow it until H is positive
    # definite rather than failing the whole run.
    factor = damp
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + factor * mean_diag * eye)
        if info.item() == 0:
            break
        factor *= 10
    else:
        raise RuntimeError("Hessian is not positive definite even after heavy dampening")
    hinv = torch.cholesky_inverse(chol)
    upper = torch.linalg.cholesky(hinv, upper=True)
    return w, upper.float()
