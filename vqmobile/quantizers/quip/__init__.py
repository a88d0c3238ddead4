"""QuIP# (Tseng, Chee, Sun, Kuleshov, De Sa, ICML 2024): incoherence processing, the E8P lattice codebook, BlockLDLQ
and residual stages, without the paper's fine-tuning.

A layer is rotated (quantizers/incoherence.py, on by default for this method), scaled so that its entries have the
RMS the codebook is tuned for, then quantized 8 columns at a time by GPTQ's column pass (quantizers/columnpass.py: with
d = 8 over a fixed codebook it is BlockLDLQ), each 8-vector rounded to its nearest E8P point
(quantizers/quip/lattice.py, exact, weighted by the column's Hessian weight 1 / U_pp^2 like GPTVQ's search). 3 and 4
bits quantize the residual of that point, times `resid_scale`, with a second codebook (1-bit E8 for 3 bits, E8P again
for 4) before the error feedback.

Bits per weight (stored, every overhead included): 2, 3 or 4 per weight + one fp32 scale per stage + the sign vectors
of the incoherence transforms (1 bit per row and per column): 2.0035 bpw for a 576 x 576 layer.

Defaults: the weight's RMS in codebook units is 1.03 for 2 bits (E8P's own optimum in the paper's code; its Llama
recipe overrides it with 0.9, for models it then fine-tunes), 0.98 for 3 bits (the paper's) and 0.9 for 4 bits; the
residual scales are the paper's 2.04 (E81B) and 3.45 (E8P), the Hessian dampening 1 % of the mean diagonal. Measured
on SmolLM2-135M layer 5 (32 x 512 WikiText-2 validation tokens), mean relative layer loss tr(E H E^T) / tr(W H W^T)
over its 7 linears: 2 bits 0.0311 at 0.9, 0.0294 at 1.0, 0.0295 at 1.03, 0.0303 at 1.1; 3 bits 0.0095 at 0.9,
0.0092 at 0.98, 0.0101 at 1.1; 4 bits 0.0027 at 0.88 and at 0.95, 0.0030 at 1.03.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ...errors import UserError
from ...formats.e8p import BITS, DIM, E8PWeight, stage_kinds
from ...hessian import inverse_cholesky
from ...threads import column_pass
from ..base import QuantConfig
from ..columnpass import padded_problem, vector_pass
from . import lattice

DEFAULT_RMS = {2: 1.03, 3: 0.98, 4: 0.9}
DEFAULT_RESID_SCALE = {3: 2.04, 4: 3.45}


@dataclasses.dataclass
class QuIPConfig(QuantConfig):
    method = "quip"
    needs_hessian = True

    bits: int = 2
    incoherence: str = "hadamard"
    rms: float | None = None  # RMS of the scaled weight in codebook units (None: DEFAULT_RMS[bits])
    resid_scale: float | None = None  # 3/4 bits: the residual's magnification before stage 2 (None: default)
    damp: float = 0.01
    block_size: int = 128  # lazy-batch width of the column pass

    def check(self) -> None:
        if self.bits not in BITS:
            raise UserError(f"--bits {self.bits} is not supported by QuIP#: use {', '.join(map(str, BITS))}")
        for name in ("rms", "resid_scale"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise UserError(f"--quip-{name.replace('_', '-')} {v} must be a positive number")
        if not self.damp > 0:
            raise UserError(f"--quip-damp {self.damp} must be positive")
        if self.block_size < DIM:
            raise UserError(f"--quip-block-size {self.block_size} must be at least {DIM}")

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        if out_features < 1 or in_features < 1:
            raise UserError(f"layer {name} has an empty weight ({out_features} x {in_features})")

    @property
    def target_rms(self) -> float:
        return self.rms if self.rms is not None else DEFAULT_RMS[self.bits]

    @property
    def stage2_scale(self) -> float:
        return self.resid_scale if self.resid_scale is not None else DEFAULT_RESID_SCALE.get(self.bits, 1.0)

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> E8PWeight:
        if hessian is None:
            raise ValueError("QuIP# needs the layer's Hessian")
        with column_pass():
            return quip_quantize(weight, hessian, self)


def quip_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuIPConfig) -> E8PWeight:
    n, k = weight.shape
    v = -(-k // DIM)
    w0, u = inverse_cholesky(weight, hessian, cfg.damp)
    rms = float(w0.pow(2).mean().sqrt())
    unit = (rms if rms > 0 else 1.0) / cfg.target_rms  # weight value of one codebook unit
    w, u, hw = padded_problem(w0 / unit, u, n, v * DIM)
    kinds = stage_kinds(cfg.bits)
    rs = cfg.stage2_scale
    planes = []  # per 8-column vector: the stage codes [n, P]

    def quantize(j: int, x: torch.Tensor) -> torch.Tensor:
        wt = hw[j:j + DIM][None, :]
        q, a, b = lattice.nearest_e8p(x, wt)
        codes = [a, b]
        if len(kinds) > 1:
            r = (x - q) * rs
            if kinds[1] == "e8p":
                q2, a2, b2 = lattice.nearest_e8p(r, wt)
                codes += [a2, b2]
            else:
                q2, i2 = lattice.nearest_e81(r, wt)
                codes.append(i2)
            q = q + q2 / rs
        planes.append(torch.stack(codes, 1))
        return q

    vector_pass(w, u, 0, v * DIM, DIM, cfg.block_size, quantize, n, k)
    codes = torch.stack(planes, 2).to(torch.uint8).contiguous()  # [n, P, V]
    # stage 1 holds 4x its points (E8P), stage 2 4x (E8P) or 2x (E81B) of its points / rs
    scales = [unit / 4] + ([unit / (4 if kinds[1] == "e8p" else 2) / rs] if len(kinds) > 1 else [])
    return E8PWeight(codes, torch.tensor(scales, dtype=torch.float32), bits=cfg.bits, shape=(n, k))
