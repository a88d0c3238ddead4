"""Group-wise integer weights: the stored format (kind "int") and the grid its codes lie on.

Each row of W is cut into groups of `group` consecutive input columns (the last one may be shorter); each group has
an fp16 scale and, when asymmetric, an integer zero point: W[n, k] = (q[n, k] - zero) * scale with q in [0, 2^bits).
Symmetric groups use the fixed zero 2^(bits-1) and store none. Codes are bit-packed at their real width (pack.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import FormatError
from .pack import pack_rows, row_bytes, unpack_rows
from .base import QuantizedWeight, Trainable, expect_tensor, register_format

VALID_BITS = (2, 3, 4, 5, 6, 7, 8)


def n_groups(in_features: int, group: int) -> int:
    return (in_features + group - 1) // group


@dataclasses.dataclass
class IntGrid:
    """Per-group scales and zero points for one block of rows; scales are already rounded to fp16."""

    scale: torch.Tensor  # float32 [N, groups], exactly representable in fp16
    zero: torch.Tensor  # float32 [N, groups], integers in [0, maxq]
    maxq: int


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

    def trainable(self) -> Trainable:
        n, k = self.shape
        q = unpack_rows(self.codes, self.bits, k).float()
        zero = float(1 << (self.bits - 1)) if self.zeros is None else \
            self.zeros.float().repeat_interleave(self.group, dim=1)[:, :k]
        q = q - zero

        def decode(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return q * p["scales"].repeat_interleave(self.group, dim=1)[:, :k]

        return Trainable({"scales": self.scales.float()}, decode)

    def _store_trainable(self, params: dict[str, torch.Tensor]) -> None:
        fp16_max = float(torch.finfo(torch.float16).max)
        self.scales = params["scales"].clamp(-fp16_max, fp16_max).to(torch.float16).contiguous()

    @classmethod
    def stack_rows(cls, parts: list[QuantizedWeight]) -> "IntWeight | None":
        """Codes, scales and zeros are per row: any parts of one bit width, group, column count and symmetry."""
        p0 = parts[0]
        if not all(type(p) is cls and (p.bits, p.group, p.shape[1], p.symmetric)
                   == (p0.bits, p0.group, p0.shape[1], p0.symmetric) for p in parts):
            return None
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                   None if p0.symmetric else torch.cat([p.zeros for p in parts]), bits=p0.bits, group=p0.group,
                   shape=(sum(p.shape[0] for p in parts), p0.shape[1]))

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
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
            raise FormatError(f"integer weight spec is malformed ({e!r})") from None
        if bits not in VALID_BITS or group < 1 or n < 1 or k < 1:
            raise FormatError(f"integer weight spec is out of range: bits={bits} group={group} shape={n}x{k}")
        g = n_groups(k, group)
        codes = expect_tensor(tensors, "codes", torch.uint8, (n, row_bytes(k, bits)))
        scales = expect_tensor(tensors, "scales", torch.float16, (n, g))
        if not bool(torch.isfinite(scales).all()):
            raise FormatError("tensor 'scales' has non-finite values")
        zeros = None if sym else expect_tensor(tensors, "zeros", torch.uint8, (n, g))
        if zeros is not None and zeros.numel() and int(zeros.max()) >= (1 << bits):
            raise FormatError(f"zero point {int(zeros.max())} does not fit in {bits} bits")
        return cls(codes, scales, zeros, bits=bits, group=group, shape=(n, k))
