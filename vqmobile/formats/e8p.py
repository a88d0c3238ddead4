"""E8P lattice-codebook weights (QuIP#): the fixed codebooks, their decoding, and the stored format, kind "e8p".

E8P (Tseng et al., 2024) is a fixed codebook of 2^16 points of E8 + 1/4 in 8 dimensions (2 bits per weight): the 256
"absolute" patterns |v| of the D8 + 1/2 points with norm^2 <= 10 (227) plus 29 chosen patterns of norm^2 12, every sign
pattern that keeps the point in E8 (an even coordinate sum: 128 of 256), and a shift of +1/4 or -1/4. A code is an abs
index a and a sign byte b; the decoded point, times 4 (always an odd integer in [-15, 15]), is

    w4[t] = sgn(b', t) * A4[a, t] + sigma(b)       t = 0..7
    sigma(b) = +1 if popcount(b) is even else -1;   b' = b with bit 0 flipped when popcount(b) is odd
    sgn(b', t) = -1 if bit t of b' is set else +1;  A4[a] = 4 |v| with coordinate 7 negated when sum |v| is odd

so the parity rule lives in the 256-entry table A4 and everything else is a function of the sign byte alone (a 256-entry
table of sign masks, or a popcount): no 2^16-entry codebook is stored anywhere. The 1-bit E8 codebook of QuIP#'s 3-bit
variant ("E81B") is 256 points of E8: 0, the 240 roots and 15 of the 16 vectors +-2 e_i (times 2: integers in [-4, 4]).

Bits per weight 2, 3 or 4: stage 1 is E8P; 3 bits add an E81B stage, 4 bits a second E8P stage, both quantizing the
scaled residual of the first (residual vector quantization). Stored tensors (W has n rows, k columns, V = ceil(k/8)
codes per row; a partial last code has components that do not exist):

    codes   uint8 [n, P, V]   P = bits planes per row: abs, sign (, e81 | , abs2, sign2)
    scales  fp32  [stages]    W = sum over stages of scales[s] * w_s, with w_s the stage's integers (w4, or 2 x E81B)

Per-layer scales are QuIP#'s: one number per stage for the whole (incoherent) matrix.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import FormatError
from .base import QuantizedWeight, Trainable, expect_tensor, register_format

BITS = (2, 3, 4)
DIM = 8

# The 29 norm^2-12 patterns of E8P (five 3/2 and three 1/2): the positions of the three 1/2 coordinates, in the order
# of the reference implementation, so that the codebook is the paper's.
_NORM12_HALVES = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2), (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5), (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6),
    (1, 4, 6), (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6), (0, 1, 4), (2, 3, 7),
)


def abs_grid() -> torch.Tensor:
    """float32 [256, 8]: the absolute patterns (multiples of 1/2), lexicographic, then the 29 of norm^2 12."""
    return _ABS_GRID


def _abs_grid() -> torch.Tensor:
    levels = torch.tensor([0.5, 1.5, 2.5, 3.5])
    allv = torch.cartesian_prod(*[levels] * DIM)
    small = allv[(allv ** 2).sum(1) <= 10]  # cartesian_prod is already lexicographic
    big = torch.full((len(_NORM12_HALVES), DIM), 1.5)
    for i, pos in enumerate(_NORM12_HALVES):
        big[i, list(pos)] = 0.5
    grid = torch.cat([small, big])
    assert grid.shape == (256, DIM)
    return grid


def abs4_table() -> torch.Tensor:
    """int8 [256, 8]: A4 = 4 |v|, coordinate 7 negated where sum |v| is odd (values +-2, 6, 10, 14)."""
    return _ABS4


def _abs4_table() -> torch.Tensor:
    g = _ABS_GRID
    a4 = (4 * g).to(torch.int64)
    odd = (g.sum(1).round().to(torch.int64) % 2) == 1
    a4[odd, 7] = -a4[odd, 7]
    return a4.to(torch.int8)


def sign_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(signs int8 [256, 8] of +-1, sigma int8 [256] of +-1), indexed by the sign byte."""
    return _SIGNS


def _sign_tables() -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.arange(256)
    bits = (b[:, None] >> torch.arange(DIM)) & 1
    parity = bits.sum(1) % 2
    bp = bits.clone()
    bp[:, 0] ^= parity
    return (1 - 2 * bp).to(torch.int8), (1 - 2 * parity).to(torch.int8)


@functools.lru_cache(maxsize=None)
def e8p_table() -> torch.Tensor:
    """int8 [65536, 8]: every E8P point times 4, indexed by (abs << 8) | sign (tests and encoders only)."""
    s, sigma = sign_tables()
    a4 = abs4_table().to(torch.int16)
    pts = a4[:, None, :] * s.to(torch.int16)[None, :, :] + sigma.to(torch.int16)[None, :, None]
    return pts.reshape(65536, DIM).to(torch.int8)


def e81_table() -> torch.Tensor:
    """int8 [256, 8]: the 1-bit E8 codebook times 2: 0 and the 240 roots (lexicographic), then +2e_i, -2e_i (i < 7)."""
    return _E81


def _e81_table() -> torch.Tensor:
    ints = torch.cartesian_prod(*[torch.tensor([-2, 0, 2])] * DIM)  # 2x the integer points with entries in {-1,0,1}
    ints = ints[((ints ** 2).sum(1) <= 8) & (ints.sum(1) % 4 == 0)]  # D8: 0 and the 112 roots +-e_i +-e_j
    halves = torch.cartesian_prod(*[torch.tensor([-1, 1])] * DIM)  # 2x (+-1/2)^8
    halves = halves[((halves < 0).sum(1) % 2) == 0]  # even sum -> 128 roots
    roots = torch.cat([ints, halves])
    roots = roots[torch.argsort(_lex_key(roots))]
    eye2 = 2 * torch.eye(DIM, dtype=torch.int64)
    table = torch.cat([roots, 2 * eye2, -2 * eye2[:7]])
    assert table.shape == (256, DIM)
    return table.to(torch.int8)


def _lex_key(rows: torch.Tensor) -> torch.Tensor:
    key = torch.zeros(rows.shape[0], dtype=torch.int64)
    for t in range(rows.shape[1]):
        key = key * 16 + (rows[:, t] + 8)
    return key


# Built at import, not on first use: a first use inside a torch.export trace would cache fake tensors.
_ABS_GRID = _abs_grid()
_ABS4 = _abs4_table()
_SIGNS = _sign_tables()
_E81 = _e81_table()


def stage_kinds(bits: int) -> tuple[str, ...]:
    return {2: ("e8p",), 3: ("e8p", "e81"), 4: ("e8p", "e8p")}[bits]


def decode_e8p(abs_idx: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """int64 [..., 8] w4 values of E8P codes (standard ops: table gathers, traceable)."""
    s, sigma = sign_tables()
    a = abs4_table().to(torch.int64)[abs_idx.to(torch.int64)]
    si = sign.to(torch.int64)
    return a * s.to(torch.int64)[si] + sigma.to(torch.int64)[si][..., None]


def decode_e81(idx: torch.Tensor) -> torch.Tensor:
    return e81_table().to(torch.int64)[idx.to(torch.int64)]


def stage_integers(codes: torch.Tensor, bits: int, k: int) -> list[torch.Tensor]:
    """The integer weights [n, k] of each stage from codes uint8 [n, P, V] (standard ops)."""
    n = codes.shape[0]
    out, plane = [], 0
    for kind in stage_kinds(bits):
        if kind == "e8p":
            w = decode_e8p(codes[:, plane], codes[:, plane + 1])
            plane += 2
        else:
            w = decode_e81(codes[:, plane])
            plane += 1
        out.append(w.reshape(n, -1)[:, :k])
    return out


@register_format
class E8PWeight(QuantizedWeight):
    kind = "e8p"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, *, bits: int, shape: tuple[int, int]):
        self.codes, self.scales, self.bits = codes, scales, bits
        self._shape = (int(shape[0]), int(shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def stages(self) -> int:
        return len(stage_kinds(self.bits))

    def dequantize(self) -> torch.Tensor:
        return self._decode(stage_integers(self.codes, self.bits, self._shape[1]), self.scales)

    @staticmethod
    def _decode(stages: list[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
        w = None
        for s, ints in enumerate(stages):
            part = ints.to(torch.float32) * scales[s]
            w = part if w is None else w + part
        return w

    def trainable(self) -> Trainable:
        """The per-stage scales (the lattice points are fixed)."""
        stages = stage_integers(self.codes, self.bits, self._shape[1])
        return Trainable({"scales": self.scales.clone()}, lambda p: self._decode(stages, p["scales"]))

    def _store_trainable(self, params: dict[str, torch.Tensor]) -> None:
        # the loader refuses non-positive scales
        self.scales = params["scales"].clamp(min=torch.finfo(torch.float32).tiny).contiguous()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales}

    def spec(self) -> dict[str, Any]:
        return {"shape": list(self._shape), "bits": self.bits}

    @classmethod
    def from_stored(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "E8PWeight":
        try:
            n, k = (int(v) for v in spec["shape"])
            bits = int(spec["bits"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"e8p weight spec is malformed ({e!r})") from None
        if bits not in BITS or n < 1 or k < 1:
            raise FormatError(f"e8p weight spec is out of range: bits={bits} shape={n}x{k}")
        codes = expect_tensor(tensors, "codes", torch.uint8, (n, bits, -(-k // DIM)))
        scales = expect_tensor(tensors, "scales", torch.float32, (len(stage_kinds(bits)),))
        if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
            raise FormatError("tensor 'scales' of an e8p weight has non-finite or non-positive values")
        extra = set(tensors) - {"codes", "scales"}
        if extra:
            raise FormatError(f"e8p weight has unexpected tensors: {', '.join(sorted(extra))}")
        # every byte is a valid code: the abs, sign and E81B tables all have 256 entries
        return cls(codes, scales, bits=bits, shape=(n, k))
