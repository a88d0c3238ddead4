"""VPTQ's options: the configuration dataclass, its presets, its exact size accounting and its CLI glue.

Bits per weight of a layer N x K (every stored byte; `CVQWeight.bits_per_weight` reports the same from the tensors):
    [ceil(N/v) * (ceil(K*b/8) + ceil(K*b_r/8)) * 8          index bitstreams, b = ceil(log2 k), b_r = ceil(log2 k_r)
     + G * (k + k_r) * v * 8 + G * 16 * (1 + [k_r > 0])     int8 codebooks and their fp16 scales, G groups
     + K * (16 + 16)] / (N * K)                               fp16 column scales and the int16 column permutation

Presets (bpv: the index bits per weight; the stored bpw adds the overheads above, about 0.05-0.1 on SmolLM2):
- `mobile`: v=4, k=256 (2 bits), 1 % outlier columns. Its int8 codebooks hold 1 KB, far inside a phone core's L1.
- `mobile-res`: v=8, k=256 plus a residual k=256 (2 bits): two 2 KB codebooks.
- `mobile3`: v=4, k=256 plus a residual k=16 (3 bits).
- `paper`: the paper's 2-bit shape, v=6, k=4096 (2 bits), 1 % outlier columns; its codebook is 24 KB of int8
  entries per group (the paper's fp16 entries would be 48 KB), which on a 135M model's small layers costs far more
  than on Llama-2-7B (every linear has its own). On SmolLM2 its 1 % outlier columns (6 of 576) hold fewer vectors than
  4096 centroids: use it there with `--vptq-outlier 0` (about 2.43 bpw stored).

With `shared="input"` the linears that read one input store one set of codebooks and one permutation, each keeping
its own indices and column scales (the formula above applies to their stacked weight, plus K * 16 bits of column
scales per linear after the first).

`bpw` caps every linear's stored bits per weight. A codebook's bytes do not shrink with its layer, so on a small
model one k costs a small linear (SmolLM2's 576 x 192 k_proj: 1.78 bpw for a 4096 x 6 codebook) many times what it
costs a large one (the 1536 x 576 MLP weights: 0.22). With the cap, each linear keeps the largest codebook, k or a
smaller power of two, whose stored size fits; the residual codebook and everything else stay as configured (with
`incoherence`, its sign vectors come on top of the cap).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ...errors import UserError
from ...formats.cvqweight import MAX_CENTROIDS, MAX_COLS, MAX_V, CVQGeometry, CVQWeight, index_bits
from ..base import QuantConfig

# "input": one codebook set per input. The linears reading one input (q/k/v, gate/up) are quantized as one stacked
# weight, so the codebooks and the permutation are stored once for all of them (each keeps its own column scales, so
# the exporter runs them as separate calls). A 4096-entry codebook then costs SmolLM2 0.22 bits per weight instead of
# 0.39.
SHARED = ("none", "input")

PRESETS = {
    "mobile": dict(v=4, k=256, res_k=0, outlier=0.01),
    "mobile-res": dict(v=8, k=256, res_k=256, outlier=0.01),
    "mobile3": dict(v=4, k=256, res_k=16, outlier=0.01),
    "paper": dict(v=6, k=4096, res_k=0, outlier=0.01),
}


@dataclasses.dataclass
class VPTQConfig(QuantConfig):
    method = "vptq"
    needs_hessian = True

    v: int = 4  # vector length: consecutive output rows of one input column
    k: int = 256  # centroids of the main codebook (2..65536)
    res_k: int = 0  # centroids of the residual codebook, 0 = no residual stage
    outlier: float = 0.0  # fraction of columns (largest Hessian diagonal) with a codebook of their own
    group: int = 0  # columns per codebook group after the outliers; 0 = one group
    kmeans_iters: int = 25  # k-means (EM) iterations per codebook (stops early once converged)
    kmeans_tol: float = 1e-3  # EM stops when at most this fraction of assignments changed in an iteration
    damp: float = 0.01  # Hessian dampening, as a fraction of the mean diagonal
    block_size: int = 128  # lazy-batch width of the column pass
    seed: int = 0  # k-means++ seeding
    bpw: float = 0.0  # cap on each linear's stored bits per weight (smaller codebooks where k does not fit); 0 = none
    shared: str = "none"  # "input": the linears that read one input share codebooks and column permutation

    @classmethod
    def from_preset(cls, preset: str | None = None, **overrides: Any) -> "VPTQConfig":
        """A named preset (PRESETS) with `overrides` on top, or the plain defaults when preset is None."""
        fields: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"unknown VPTQ preset '{preset}': use one of {', '.join(PRESETS)}")
            fields.update(PRESETS[preset])
        fields.update(overrides)
        return cls(**fields)

    # ------------------------------------------------------------------------------------------- validation
    def check(self) -> None:
        if not 1 <= self.v <= MAX_V:
            raise UserError(f"--vptq-v {self.v} is out of range: use 1..{MAX_V}")
        if not 2 <= self.k <= MAX_CENTROIDS:
            raise UserError(f"--vptq-k {self.k} is out of range: use 2..{MAX_CENTROIDS}")
        if self.res_k and not 2 <= self.res_k <= MAX_CENTROIDS:
            raise UserError(f"--vptq-res-k {self.res_k} is out of range: use 0 (no residual) or 2..{MAX_CENTROIDS}")
        if not 0 <= self.outlier < 1:
            raise UserError(f"--vptq-outlier {self.outlier} is out of range: use a fraction of columns in [0, 1)")
        if self.group < 0:
            raise UserError(f"--vptq-group {self.group} must be 0 (one group) or a number of columns")
        if self.kmeans_iters < 1:
            raise UserError(f"--kmeans-iters {self.kmeans_iters} must be at least 1")
        if not self.damp > 0:
            raise UserError(f"--vptq-damp {self.damp} must be positive")
        if self.block_size < 1:
            raise UserError(f"--vptq-block-size {self.block_size} must be at least 1")
        if self.shared not in SHARED:
            raise UserError(f"--vptq-shared {self.shared} is not supported: use {' or '.join(SHARED)}")
        if self.shared == "input" and self.incoherence != "none":
            raise UserError("--vptq-shared input does not combine with --incoherence: each linear's output transform "
                            "would differ; drop one of them")
        if self.bpw < 0:
            raise UserError(f"--vptq-bpw {self.bpw} must be 0 (no cap) or a positive number of bits per weight")

    def outlier_cols(self, cols: int) -> int:
        return min(cols - 1, math.ceil(self.outlier * cols)) if self.outlier > 0 else 0

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        if not 1 <= in_features <= MAX_COLS:
            raise UserError(f"layer {name} has {in_features} input features: VPTQ stores a column permutation of at "
                            f"most {MAX_COLS}")
        if out_features < 1:
            raise UserError(f"layer {name} has an empty weight ({out_features} x {in_features})")
        g = self.layer_geometry(out_features, in_features)
        if self.bpw and geometry_bits(g) > self.bpw * out_features * in_features:
            raise UserError(f"layer {name} ({out_features} x {in_features}) needs "
                            f"{geometry_bits(g) / (out_features * in_features):.3f} bits per weight even with a "
                            f"{g.k}-entry codebook, above --vptq-bpw {self.bpw:g}: raise the cap or lower the index "
                            f"bits (--vptq-k, --vptq-v, --vptq-res-k)")
        sizes = [(c1 - c0) * g.vector_rows for c0, c1 in g.bounds()]
        smallest, k = min(sizes), max(g.k, g.res_k)
        if smallest >= k:
            return
        if g.outlier_cols and sizes[0] == smallest:
            # a small model's 1 % of columns holds few vectors: the paper's k = 4096 cannot fit them
            raise UserError(f"layer {name} ({out_features} x {in_features}): its {g.outlier_cols} outlier column(s) "
                            f"hold {smallest} vectors, fewer than the {k} centroids of a codebook: use "
                            f"--vptq-outlier 0 (no outlier codebook), a larger --vptq-outlier or a smaller --vptq-k")
        raise UserError(f"layer {name} ({out_features} x {in_features}) has a codebook group of {smallest} "
                        f"vectors, fewer than the {k} centroids of its codebook: use a "
                        f"smaller --vptq-k/--vptq-res-k, a larger --vptq-outlier or --vptq-group 0")

    def layer_geometry(self, n: int, cols: int) -> CVQGeometry:
        """The geometry of an N x K linear: with the `bpw` cap, the first of k, 2^(ceil(log2 k) - 1), ..., 2 whose
        stored size fits (the last one tried when none does; check_layer refuses it)."""
        o = self.outlier_cols(cols)
        g = CVQGeometry(n, cols, self.v, self.k, self.res_k, o, self.group or (cols - o))
        for bits in range(index_bits(self.k) - 1, 0, -1):
            if not self.bpw or geometry_bits(g) <= self.bpw * n * cols:
                break
            g = dataclasses.replace(g, k=1 << bits)
        return g

    def index_bpv(self) -> float:
        """Index bits per weight (without the overheads)."""
        return (index_bits(self.k) + (index_bits(self.res_k) if self.res_k else 0)) / self.v  # at most, with bpw

    def describe(self) -> str:
        res = f" + residual k={self.res_k}" if self.res_k else ""
        out = f", {100 * self.outlier:g} % outlier columns" if self.outlier else ""
        cap = f", at most {self.bpw:g} bits per weight per linear" if self.bpw else ""
        sh = ", one codebook per input" if self.shared == "input" else ""
        return f"VPTQ v={self.v} k={self.k}{res}{out}{cap}{sh} ({self.index_bpv():g} index bits per weight)"

    # ------------------------------------------------------------------------------------------ quantization
    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> CVQWeight:
        from .quantize import vptq_quantize

        return vptq_quantize(weight, hessian, self)[0]

    def quantize_readers(self, weights: list[torch.Tensor], hessian: torch.Tensor | None, keys: list[str]
                         ) -> list[CVQWeight]:
        if self.shared == "none" or len(weights) < 2:
            return super().quantize_readers(weights, hessian, keys)
        from .quantize import vptq_quantize_readers

        return vptq_quantize_readers(weights, hessian, self, shared=keys[0])[0]


def stored_bits(cfg: VPTQConfig, n: int, cols: int) -> int:
    """Exact stored bits of one N x K layer (the formula in the module docstring)."""
    return geometry_bits(cfg.layer_geometry(n, cols))


def geometry_bits(g: CVQGeometry) -> int:
    """Exact stored bits of a layer of geometry g."""
    nbits = g.vector_rows * (-(-g.cols * g.bits // 8)) * 8
    nbits += g.groups * (g.k * g.v * 8 + 16)
    if g.res_k:
        nbits += g.vector_rows * (-(-g.cols * g.res_bits // 8)) * 8 + g.groups * (g.res_k * g.v * 8 + 16)
    return nbits + g.cols * 32
