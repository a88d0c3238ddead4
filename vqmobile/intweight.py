"""Group-wise integer weights: the stored format, the quantization grid, and round-to-nearest (RTN).

Each row of W is cut into groups of `group` consecutive input columns (the last one may be shorter); each group has
an fp16 scale and, when asymmetric, an integer zero point: W[n, k] = (q[n, k] - zero) * scale with q in [0, 2^bits).
Symmetric groups use the fixed zero 2^(bits-1) and store none. Codes are bit-packed at their real width (pack.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .config import QuantConfig
from .errors import FormatError, UserError
from .pack import pack_rows, row_bytes, unpack_rows
from .qweight import QuantizedWeight, expect_tensor, register_format

VALID_BITS = (2, 3, 4, 5, 6, 7, 8)
VALID_GROUPS = (0, 16, 32, 64, 128, 256, 512, 1024)  # 0 = one group per row (per-channel)


def n_groups(in_features: int, group: int) -> int:
    return (in_features + group - 1) // group


@dataclasses.dataclass
class IntGrid:
    """Per-group scales and zero points for one block of rows; scales are already rounded to fp16."""

    scale: torch.Tensor  # float32 [N, groups], exactly representable in fp16
    zero: torch.Tensor  # float32 [N, groups], integers in [0, maxq]
    maxq: int


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


def quantize_to_grid(w: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Integer codes of w under grid (broadcast over columns)."""
    return torch.clamp(torch.round(w / grid.scale) + grid.zero, 0, grid.maxq)


@register_format
class IntWeight(QuantizedWeight):
    kind = "int"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int,
                 group: int, shape: tuple[int, int]):
        self.codes, self.scales, self.zeros = codes, scales, zeros
        self.bits, self.group, self._shape = bits, group, (int(shape[0]), int(shape[1]))

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, group: int,
                   symmetric: bool) -> "IntWeight":
        """q: integer codes [N, K]; scale, zero: float [N, groups]."""
        n, k = q.shape
        return cls(
            pack_rows(q.to(torch.int64), bits),
            scale.to(torch.float16).contiguous(),
            None if symmetric else zero.to(torch.uint8).contiguous(),
            bits=bits, group=group, shape=(n, k),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        q = unpack_rows(self.codes, self.bits, k).float()
        scale = self.scales.float().repeat_interleave(self.group, dim=1)[:, :k]
        if self.zeros is None:
            zero = float(1 << (self.bits - 1))
        else:
            zero = self.zeros.float().repeat_interleave(self.group, dim=1)[:, :k]
        return (q - zero) * scale

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group, "symmetric": self.symmetric, "shape": list(self.shape)}

    @classmethod
    def from_stored(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "IntWeight":
        try:
            bits, group, sym = int(spec["bits"]), int(spec["group"]), bool(spec["symmetric"])
            n, k = (int(v) for v in spec["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"integer weight spec is malformed ({e!r})") from None
        if bits not in VALID_BITS or group < 1 or n < 1 or k < 1:
            raise FormatError(f"integer weight spec is out of range: bits={bits} group={group} shape={n}x{k}")
        g = n_groups(k, group)
        codes = expect_tensor(tensors, "codes", torch.uint8, (n, row_bytes(k, bits)))
        scales = expect_tensor(tensors, "scales", torch.float16, (n, g))
        zeros = None if sym else expect_tensor(tensors, "zeros", torch.uint8, (n, g))
        if zeros is not None and zeros.numel() and int(zeros.max()) >= (1 << bits):
            raise FormatError(f"zero point {int(zeros.max())} does not fit in {bits} bits")
        return cls(codes, scales, zeros, bits=bits, group=group, shape=(n, k))


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
