"""Round-to-nearest (RTN) integer quantization: fitting a group's grid (min/max, optionally a clipping search) and
the options the integer methods (RTN, GPTQ) share."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import UserError
from ..formats.intweight import VALID_BITS, IntGrid, IntWeight, quantize_to_grid
from .base import QuantConfig

VALID_GROUPS = (0, 16, 32, 64, 128, 256, 512, 1024)  # 0 = one group per row (per-channel)


def fit_grid(w: torch.Tensor, bits: int, symmetric: bool, clip_search: bool = False) -> IntGrid:
    """Grid for each row of w [N, g] (one group per row); returns scale and zero of shape [N, 1].

    The grid spans the row's min/max; with clip_search the range is shrunk per row to the factor in [0.8, 1] that
    minimizes the rounding error sum |w - dequant(q)|^2.4 (the GPTQ reference's `mse` grid): a few outliers then
    stop stretching the grid for every other weight of the group."""
    grid = _minmax_grid(w, bits, symmetric, 1.0)
    if not clip_search:
        return grid
    best = _grid_error(w, grid)
    for shrink in _CLIP_SHRINKS[1:]:
        cand = _minmax_grid(w, bits, symmetric, shrink)
        err = _grid_error(w, cand)
        better = err < best
        if bool(better.any()):
            grid.scale = torch.where(better, cand.scale, grid.scale)
            grid.zero = torch.where(better, cand.zero, grid.zero)
            best = torch.minimum(err, best)
    return grid


_CLIP_SHRINKS = [1.0 - i / 100 for i in range(0, 21)]


def _minmax_grid(w: torch.Tensor, bits: int, symmetric: bool, shrink: float) -> IntGrid:
    maxq = (1 << bits) - 1
    xmin = torch.clamp(w.min(dim=1, keepdim=True).values, max=0) * shrink
    xmax = torch.clamp(w.max(dim=1, keepdim=True).values, min=0) * shrink
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        scale = 2 * xmax / maxq
    else:
        scale = (xmax - xmin) / maxq
    # A constant-zero group still needs a usable scale; fp16 rounding first makes stored and used scales identical.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float16).clamp(min=6.2e-5).float()
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return IntGrid(scale, zero, maxq)


def _grid_error(w: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    deq = (quantize_to_grid(w, grid) - grid.zero) * grid.scale
    return (w - deq).abs().pow(2.4).sum(dim=1, keepdim=True)



@dataclasses.dataclass
class IntConfigBase(QuantConfig):
    """Options shared by the integer methods (RTN, GPTQ)."""

    bits: int = 4
    group: int = 128  # 0 = per-channel
    symmetric: bool = False
    clip_search: bool = False  # per-group range shrunk to minimize rounding error (see fit_grid)

    def check(self) -> None:
        if self.bits not in VALID_BITS:
            raise UserError(f"--bits {self.bits} is out of range: use one of {', '.join(map(str, VALID_BITS))}")
        if self.group not in VALID_GROUPS:
            raise UserError(
                f"--group {self.group} is not supported: use one of {', '.join(map(str, VALID_GROUPS[1:]))}, "
                "or 0 for per-channel"
            )

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        if self.group > in_features:
            raise UserError(
                f"--group {self.group} does not fit layer {name}: its input width is {in_features}; "
                f"use a group of at most {in_features}, or 0 for per-channel"
            )

    def group_size(self, in_features: int) -> int:
        return self.group or in_features


@dataclasses.dataclass
class RTNConfig(IntConfigBase):
    """Round-to-nearest onto a min/max grid per group: no calibration data needed."""

    method = "rtn"
    needs_hessian = False

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> IntWeight:
        n, k = weight.shape
        g = self.group_size(k)
        q = torch.empty_like(weight)
        scales, zeros = [], []
        for start in range(0, k, g):
            block = weight[:, start:start + g]
            grid = fit_grid(block, self.bits, self.symmetric, self.clip_search)
            q[:, start:start + g] = quantize_to_grid(block, grid)
            scales.append(grid.scale)
            zeros.append(grid.zero)
        return IntWeight.from_codes(q, torch.cat(scales, 1), torch.cat(zeros, 1), bits=self.bits, group=g,
                                    symmetric=self.symmetric)
