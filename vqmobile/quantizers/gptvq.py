"""GPTVQ (van Baalen et al., 2024): vector quantization of d consecutive weights of a row, with GPTQ's column pass.

Columns are quantized in order, d at a time; each row's d-vector is replaced by its nearest centroid (Hessian-weighted
distance) in the codebook of its block, and the quantization error is pushed onto the not-yet-quantized columns through
the upper Cholesky factor U of H^-1 (lazy blocks of 128 columns). A block's codebook is fitted (Mahalanobis-seeded EM)
when the pass enters its columns, from the already error-updated weights. After all indices of a layer are fixed, the
codebooks are refitted to minimize tr((W - Q) H (W - Q)^T) (exact least squares), then rounded to int8.

Size accounting (paper): bits per value = log2(k)/d + k*d*b_c/l, with l = R*C weights sharing a codebook of k entries
of b_c bits. The stored size (what `VQWeight.bits_per_weight` reports) also counts the fp16 codebook scales and the
row padding of the index bitstreams.

Decisions where the paper is silent:
- Within a d-vector the GPTQ recursion is applied exactly: the error of column p changes the target of columns p+1..
  of the same vector before their errors are computed (err = (w_J - q_J) U_JJ^-1), instead of the public code's
  approximation that ignores the intra-vector coupling.
- The Hessian weight of a column is 1/U_pp^2 = 1/[H_F^-1]_pp (F = the columns not yet quantized), the quantity GPTQ
  divides its loss by.
- Layers narrower than C use C' = the layer width (rounded up to d) and R' = R * 2^floor(log2(C/C')) (capped at the row
  count), so l and the codebook overhead stay near the nominal configuration.
- The least-squares update uses the same dampened H as the pass and is kept only if it lowers the objective (after
  rounding the codebooks to int8).

Measured on the 7 linears of SmolLM2-135M layer 5 (real Hessians, 32 x 512 WikiText-2 tokens), relative layer loss
tr(EHE^T)/tr(WHW^T): the exact least-squares update (Jacobi-preconditioned CG, 6-16 iterations) beats the paper's 25
Adam steps (best of lr 1e-4/1e-3/1e-2) on every layer and configuration (e.g. q_proj 1D 2.125: 0.9697 vs 0.9763 of the
pass loss; 4D 2.25: 0.9691 vs 0.9707) in 2-5x less time, so Adam is not offered as an option (codebook.update_adam
stays for the comparison). SVD codebooks (1D, rank r, int8 factors, same nominal bpv via smaller blocks) lose to int8
codebooks on layer loss: 2.125 bpv 0.0460 (r=2) vs 0.0429, 3.125 bpv 0.0133 (r=4) vs 0.0125, although they store
0.04-0.1 bpv less (no per-codebook scales).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

import torch

from ..errors import QualityWarning, UserError
from ..formats.pack import pack_rows
from ..formats.vqweight import CODEBOOK_KINDS, MAX_INDEX_BITS, VQGeometry, VQWeight, norm_scale_values
from ..hessian import inverse_cholesky
from ..threads import column_pass, num_threads
from . import codebook as cbk
from .base import QuantConfig
from .columnpass import padded_problem, vector_pass

MAX_COLS_PER_BLOCK = 256  # groups span at most 256 columns (paper)
VQ_DIMS = (1, 2, 3, 4, 5, 6, 7, 8)
CODEBOOK_BITS = {"int8": 8, "int4": 4, "fp16": 16}
PRESETS = {
    "mobile": (3.125, 2),  # 2D, k=64 (6-bit index), codebook per 32 rows x 256 columns (l=8192)
    "2.25": (2.25, None),
    "2.125": (2.125, None),
}
# A --bpv target is met by index bits plus at most this much codebook storage (the paper's configurations spend
# 0.125 or 0.25): beyond it, "reaching" a target means tiny blocks whose codebooks cost more than their indices.
MAX_CODEBOOK_BPV = 0.25
_DIM_PREFERENCE = (2, 4, 1, 8)  # which vector dimension a bare --bpv target picks first
# Below half an index bit per weight (more than two weights share one bit: 4D or 8D with k=2, 8D with k<=8) the
# model is destroyed: on stories260k (32 windows of 512, `vqmobile bench quality`, README "Errors and bad input")
# --bpv 0.5 (4D k=2, 0.25 index bits) gave 153x the float perplexity where --bpv 0.75 and 0.625 (2D k=2, 0.5) gave
# 5.2x and 18.9x and GPTQ 2-bit g32 7.2x. Such configurations are refused.
MIN_INDEX_BITS = 0.5
# Below 2 bits per value (the paper's lowest is 2.125, where SmolLM2-135M is already at 4.5x its float perplexity)
# a configuration runs but gets a QualityWarning naming it.
WARN_BPV = 2.0


def nominal_bpv(d: int, k: int, l: int, codebook_bits: int = 8, svd_rank: int | None = None,
                norm: float = 0.0) -> float:
    """The paper's bits per value: index bits / d + codebook bits / l (SVD: r int8 factor entries per codebook),
    plus `norm` = normalization bits per value (norm_bits / norm_block)."""
    index_bits = max(1, math.ceil(math.log2(k)))
    if svd_rank is not None:
        return index_bits / d + svd_rank * 8 / l + norm
    return index_bits / d + k * d * codebook_bits / l + norm


def _describe(d: int, k: int, r: int, c: int, kind: str = "int8", svd_rank: int | None = None,
              norm: tuple[int, int] | None = None) -> str:
    bpv = nominal_bpv(d, k, r * c, CODEBOOK_BITS[kind], svd_rank, norm[1] / norm[0] if norm else 0.0)
    extra = ("" if kind == "int8" else f" {kind}") + ("" if svd_rank is None else f" svd-rank {svd_rank}")
    extra += "" if norm is None else f" norm {norm[1]}b/{norm[0]}"
    return f"{bpv:g} bpv = {d}D k={k} rows {r} x cols {c}{extra}"


def _candidates(dims, kind: str, svd_rank: int | None, k_fixed: int | None = None, norm: float = 0.0):
    """Every canonical configuration: k = 2^b, C = min(256, l), R = l / C, l a power of two."""
    for d in dims:
        for b in range(MAX_INDEX_BITS, 0, -1):
            k = 1 << b
            if k_fixed is not None and k != k_fixed:
                continue
            if svd_rank is not None and (d != 1 or svd_rank > k):
                continue
            for e in range(3, 17):  # l up to 65536, the largest group in the paper
                l = 1 << e
                c = min(MAX_COLS_PER_BLOCK, l)
                if c % d or c < d or l // d < k:
                    continue
                bpv = nominal_bpv(d, k, l, CODEBOOK_BITS[kind], svd_rank, norm)
                if bpv - b / d - norm > MAX_CODEBOOK_BPV + 1e-9:
                    continue
                yield d, k, l // c, c, bpv


@dataclasses.dataclass
class GPTVQConfig(QuantConfig):
    method = "gptvq"
    needs_hessian = True

    vq_dim: int = 2  # d: weights per vector
    k: int = 64  # centroids per codebook; indices take ceil(log2 k) bits
    rows_per_block: int = 32  # R: rows sharing a codebook
    cols_per_block: int = 256  # C: columns sharing a codebook (multiple of d, at most 256)
    codebook: str = "int8"  # int8 | int4 | fp16
    codebook_update: bool = True  # least-squares refit of the centroids once the indices are fixed
    svd_rank: int | None = None  # 1D only: store the layer's codebooks as a rank-r product
    norm_block: int | None = None  # blockwise normalization: one scale per this many columns of a row
    norm_bits: int = 4  # bits of a normalization scale (log domain)
    em_iters: int = 100  # EM iterations for a codebook's initialization (stops early once converged)
    em_tol: float = 1e-3  # EM stops when at most this fraction of assignments changed in an iteration
    damp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    block_size: int = 128  # lazy-batch width of the column pass
    seed: int = 0  # recorded with the run; the method itself draws no random numbers (Mahalanobis seeding, exact LS)

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_target(cls, bpv: float | None = None, vq_dim: int | None = None, preset: str | None = None,
                    **overrides: Any) -> "GPTVQConfig":
        """Pick the configuration that stores `bpv` bits per value (paper accounting) for `vq_dim` (default: 2D if
        it reaches the target, else 4D, 1D, 8D), or a named preset; `overrides` set any other field (k, rows/cols
        fixing the geometry restrict the search). With no target and no preset: the mobile preset."""
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"unknown GPTVQ preset '{preset}': use one of {', '.join(PRESETS)}")
            p_bpv, p_dim = PRESETS[preset]
            if bpv is not None and abs(bpv - p_bpv) > 1e-9:
                raise UserError(f"--preset {preset} stores {p_bpv:g} bpv but --bpv {bpv:g} was given: drop one")
            if p_dim is not None and vq_dim is not None and vq_dim != p_dim:
                raise UserError(f"--preset {preset} is {p_dim}D but --vq-dim {vq_dim} was given: drop one")
            bpv, vq_dim = p_bpv, vq_dim or p_dim
        geometry = {f: overrides[f] for f in ("k", "rows_per_block", "cols_per_block") if f in overrides}
        if bpv is None:
            if not geometry and vq_dim is None:
                return cls.from_target(preset="mobile", **overrides)
            return cls(**({} if vq_dim is None else {"vq_dim": vq_dim}), **overrides)
        if not (bpv > 0 and math.isfinite(bpv)):
            raise UserError(f"--bpv {bpv} must be a positive number of bits per value")
        kind = overrides.get("codebook", "int8")
        if kind not in CODEBOOK_BITS:
            raise UserError(f"--codebook {kind} is not supported: use one of {', '.join(CODEBOOK_KINDS)}")
        svd_rank = overrides.get("svd_rank")
        norm = overrides.get("norm_bits", 4) / overrides["norm_block"] if overrides.get("norm_block") else 0.0
        norm_desc = (overrides["norm_block"], overrides.get("norm_bits", 4)) if norm else None
        if vq_dim is not None and vq_dim not in VQ_DIMS:
            raise UserError(f"--vq-dim {vq_dim} is out of range: use one of {', '.join(map(str, VQ_DIMS))}")
        dims = (vq_dim,) if vq_dim is not None else _DIM_PREFERENCE
        if svd_rank is not None:
            if vq_dim not in (None, 1):
                raise UserError(f"--svd-rank needs 1D vectors (--vq-dim 1), got --vq-dim {vq_dim}")
            dims = (1,)
        cands = [c for c in _candidates(dims, kind, svd_rank, geometry.get("k"), norm)
                 if all(c[{"rows_per_block": 2, "cols_per_block": 3}[f]] == v for f, v in geometry.items() if f != "k")]
        for d in dims:
            hits = [c for c in cands if c[0] == d and abs(c[4] - bpv) < 1e-6]
            if hits:
                d, k, r, c, _ = max(hits, key=lambda h: (h[1], -h[2] * h[3]))  # most index bits, then smallest l
                fields = {"vq_dim": d, "k": k, "rows_per_block": r, "cols_per_block": c}
                fields.update(overrides)
                return cls(**fields)
        # Nothing stores exactly that many bits: name the nearest configurations on either side.
        pool = cands or list(_candidates(dims, kind, svd_rank, None, norm))
        below = sorted((c for c in pool if c[4] < bpv), key=lambda c: (-c[4], -c[1]))[:1]
        above = sorted((c for c in pool if c[4] > bpv), key=lambda c: (c[4], -c[1]))[:1]
        near = "; ".join(_describe(d, k, r, c, kind, svd_rank, norm_desc) for d, k, r, c, _ in below + above)
        where = f" with --vq-dim {vq_dim}" if vq_dim is not None else ""
        if not near:
            raise UserError(f"no GPTVQ configuration{where} matches the given k/rows/cols: drop --vq-k/--vq-rows/--vq-cols")
        raise UserError(f"no GPTVQ configuration{where} stores {bpv:g} bits per value; nearest: {near}")

    # ------------------------------------------------------------------------------------------- validation
    @property
    def group_size(self) -> int:
        return self.rows_per_block * self.cols_per_block

    def nominal_bpv(self) -> float:
        norm = self.norm_bits / self.norm_block if self.norm_block else 0.0
        return nominal_bpv(self.vq_dim, self.k, self.group_size, CODEBOOK_BITS.get(self.codebook, 8), self.svd_rank,
                           norm)

    def describe(self) -> str:
        return _describe(self.vq_dim, self.k, self.rows_per_block, self.cols_per_block, self.codebook, self.svd_rank,
                         (self.norm_block, self.norm_bits) if self.norm_block else None)

    def check(self) -> None:
        self._check_geometry()
        index_bits = max(1, math.ceil(math.log2(self.k))) / self.vq_dim
        if index_bits < MIN_INDEX_BITS:
            raise UserError(f"GPTVQ {self.describe()} gives {index_bits:g} index bits per weight: below "
                            f"{MIN_INDEX_BITS:g} the model is destroyed (stories260k: 153x its float perplexity at "
                            f"--bpv 0.5); use --bpv 0.625 or more, or a smaller --vq-dim or larger --vq-k")
        if self.nominal_bpv() < WARN_BPV:
            warnings.warn(f"GPTVQ {self.describe()} is below {WARN_BPV:g} bits per value, under the 2.125 the paper "
                          "evaluates: expect a much worse model (SmolLM2-135M is at 4.5x its float perplexity "
                          "already at 2.125); measure it with `vqmobile eval` before you ship it",
                          QualityWarning, stacklevel=4)

    def _check_geometry(self) -> None:
        d, k, r, c = self.vq_dim, self.k, self.rows_per_block, self.cols_per_block
        if d not in VQ_DIMS:
            raise UserError(f"--vq-dim {d} is out of range: use one of {', '.join(map(str, VQ_DIMS))}")
        if not 2 <= k <= (1 << MAX_INDEX_BITS):
            raise UserError(f"--vq-k {k} is out of range: use 2..{1 << MAX_INDEX_BITS} centroids "
                            f"(indices are at most {MAX_INDEX_BITS} bits)")
        if self.codebook not in CODEBOOK_KINDS:
            raise UserError(f"--codebook {self.codebook} is not supported: use one of {', '.join(CODEBOOK_KINDS)}")
        if r < 1 or not 1 <= c <= MAX_COLS_PER_BLOCK:
            raise UserError(f"codebook block {r} rows x {c} cols is out of range: rows >= 1, "
                            f"cols 1..{MAX_COLS_PER_BLOCK}")
        if c % d:
            lo, hi = (c // d) * d, (c // d + 1) * d
            valid = [str(v) for v in (lo, hi) if d <= v <= MAX_COLS_PER_BLOCK]
            dims = [str(v) for v in VQ_DIMS if c % v == 0 and v != 1][-3:]
            raise UserError(f"--vq-dim {d} does not divide the codebook block width {c}: use --vq-cols "
                            f"{' or '.join(valid)}, or --vq-dim {' or '.join(dims or ['1'])}")
        if k > r * c // d:
            need_r = -(-k * d // c)
            need_r = 1 << (need_r - 1).bit_length()
            max_k = 1 << ((r * c // d).bit_length() - 1)
            raise UserError(f"k={k} centroids exceed the {r * c // d} {d}D vectors of a {r} x {c} codebook block: use "
                            f"--vq-rows {need_r} ({_describe(d, k, need_r, c, self.codebook)}) or --vq-k {max_k} "
                            f"({_describe(d, max_k, r, c, self.codebook)})")
        if self.svd_rank is not None:
            if d != 1:
                raise UserError(f"--svd-rank needs 1D vectors (--vq-dim 1), got --vq-dim {d}")
            if self.codebook != "int8":
                raise UserError(f"--svd-rank stores int8 factors; it cannot be combined with --codebook {self.codebook}")
            if not 1 <= self.svd_rank <= k:
                raise UserError(f"--svd-rank {self.svd_rank} is out of range: use 1..{k} (the codebook size)")
        if self.norm_block is not None:
            if self.norm_block < d or self.norm_block % d or c % self.norm_block:
                divs = [str(v) for v in range(d, c + 1, d) if c % v == 0][-4:]
                raise UserError(f"--norm-block {self.norm_block} must be a multiple of --vq-dim {d} dividing the "
                                f"block width {c}: use one of {', '.join(divs)}")
            if not 2 <= self.norm_bits <= 8:
                raise UserError(f"--norm-bits {self.norm_bits} is out of range: use 2..8")
        if self.em_iters < 1:
            raise UserError(f"--em-iters {self.em_iters} must be at least 1")
        if not self.damp > 0:
            raise UserError(f"--vq-damp {self.damp} must be positive")
        if self.block_size < d:
            raise UserError(f"--vq-block-size {self.block_size} must be at least --vq-dim {d}")

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        # Every layer shape is accepted: narrow layers get a narrower, taller codebook block (layer_geometry), and a
        # width that d does not divide ends each row with a partial vector.
        if out_features < 1 or in_features < 1:
            raise UserError(f"layer {name} has an empty weight ({out_features} x {in_features})")

    def layer_geometry(self, n: int, cols: int) -> VQGeometry:
        d = self.vq_dim
        c = min(self.cols_per_block, -(-cols // d) * d)
        r = self.rows_per_block
        if c < self.cols_per_block:
            r *= 1 << int(math.floor(math.log2(self.cols_per_block / c)))
        return VQGeometry(n, cols, d, self.k, min(r, n), c)

    # ------------------------------------------------------------------------------------------ quantization
    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> VQWeight:
        return gptvq_quantize(weight, hessian, self)[0]


# ------------------------------------------------------------------------------------------------ column pass
def gptvq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: GPTVQConfig
                   ) -> tuple[VQWeight, dict[str, Any]]:
    """Quantize one layer; returns the weight and statistics (losses, EM/CG iterations, timings)."""
    if hessian is None:
        raise ValueError("GPTVQ needs the layer's Hessian")
    with column_pass() as threads:
        return _gptvq_quantize(weight, hessian, cfg, threads)


def _gptvq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTVQConfig, threads
                    ) -> tuple[VQWeight, dict[str, Any]]:
    t0 = time.perf_counter()
    n, cols = weight.shape
    geom = cfg.layer_geometry(n, cols)
    d, k, R, C = geom.d, geom.k, geom.rows_per_block, geom.cols_per_block
    V, nbr, nbc = geom.vectors, geom.row_blocks, geom.col_blocks
    kp, npad = V * d, nbr * R

    w0, u = inverse_cholesky(weight, hessian, cfg.damp)  # w0: dead columns zeroed
    # Whole vectors and whole row blocks (padding rows are excluded from EM and dropped at the end).
    w, u, hw = padded_problem(w0, u, npad, kp)
    row_valid = torch.zeros(npad, dtype=torch.bool)
    row_valid[:n] = True

    idx = torch.zeros(npad, V, dtype=torch.int64)
    cbooks = torch.zeros(nbr, nbc, k, d)
    # Blockwise normalization: vectors are quantized as w / s with s the scale of their sub-row (S columns of a row);
    # the scales' log2 grid (nb bits over the layer's range) is fixed from the original weights, each scale is chosen
    # when the pass enters its group, from the error-updated weights.
    nb, sb = cfg.norm_bits, cfg.norm_block
    scale_el = torch.ones(npad, kp)
    if sb:
        nsub = -(-cols // sb)
        amax = torch.nn.functional.pad(w0.abs(), (0, nsub * sb - cols)).reshape(n, nsub, sb).amax(-1)
        lg = torch.log2(amax[amax > 0]) if bool((amax > 0).any()) else torch.zeros(1)
        lo, hi = float(lg.min()), float(lg.max())
        norm_range = torch.tensor([lo, (hi - lo) / ((1 << nb) - 1)], dtype=torch.float32)
        norm_codes = torch.zeros(npad, nsub, dtype=torch.int64)
    stats: dict[str, Any] = {"em_iters": [], "pass_loss": 0.0}
    t_em = 0.0
    for g0 in range(0, kp, C):
        g1 = min(g0 + C, kp)
        # Codebooks of this column group, one per row block, from the error-updated weights.
        te = time.perf_counter()
        vg = (g1 - g0) // d
        if sb:
            _normalize_group(w, scale_el, norm_codes, norm_range, g0, min(g1, cols), sb, nb)
        x = (w[:, g0:g1] / scale_el[:, g0:g1]).reshape(nbr, R * vg, d)
        wt = hw[g0:g1].reshape(1, 1, vg, d).expand(nbr, R, vg, d) * row_valid.reshape(nbr, R, 1, 1)
        wt = (wt * (scale_el[:, g0:g1] ** 2).reshape(nbr, R, vg, d)).reshape(nbr, R * vg, d)
        valid = row_valid.reshape(nbr, R, 1).expand(nbr, R, vg).reshape(nbr, R * vg)
        with num_threads(threads(npad * vg * k * d)):
            seed = cbk.mahalanobis_seed(x, valid, k)
            cb, _, iters = cbk.kmeans(x, wt, seed, cfg.em_iters, cfg.em_tol)
        stats["em_iters"].append(iters)
        if cfg.svd_rank is None:
            cb = cbk.quantize_codebooks(cb, cfg.codebook)[0]
        cbooks[:, g0 // C] = cb
        t_em += time.perf_counter() - te

        def quantize(j0: int, xv: torch.Tensor, cb=cb) -> torch.Tensor:
            if sb:
                s_v = scale_el[:, j0:j0 + d]
                a = cbk.nearest((xv / s_v).reshape(nbr, R, d), (hw[j0:j0 + d] * s_v * s_v).reshape(nbr, R, d), cb)
                q = torch.gather(cb, 1, a[..., None].expand(-1, -1, d)).reshape(npad, d) * s_v
            else:
                a = cbk.nearest(xv.reshape(nbr, R, d), hw[j0:j0 + d].reshape(1, 1, d), cb)
                q = torch.gather(cb, 1, a[..., None].expand(-1, -1, d)).reshape(npad, d)
            idx[:, j0 // d] = a.reshape(npad)
            return q

        stats["pass_loss"] += vector_pass(w, u, g0, g1, d, cfg.block_size, quantize, n, cols)
    t_pass = time.perf_counter() - t0
    idx = idx[:n]

    # Codebook update with the indices fixed, then the stored precision.
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += cfg.damp * h.diagonal().mean() * torch.eye(cols)
    norm = None
    if sb:
        norm = {"block": sb, "bits": nb, "codes": pack_rows(norm_codes[:n], nb), "range": norm_range}
    obj = cbk.Objective(w0, h, idx, geom, scales=scale_el[:n, :cols].contiguous() if sb else None)
    stats["norm"] = norm
    loss_pass = obj.loss(cbooks)
    stats.update(loss_pass=loss_pass, cg_iters=0)
    t1 = time.perf_counter()
    with num_threads(threads(n * cols * cols)):
        weight_q = _finish(obj, cbooks, idx, geom, cfg, stats)
    stats.update(time_em=t_em, time_pass=t_pass, time_update=time.perf_counter() - t1,
                 time_total=time.perf_counter() - t0, geometry=geom)
    return weight_q, stats


def _finish(obj: cbk.Objective, cbooks: torch.Tensor, idx: torch.Tensor, geom: VQGeometry, cfg: GPTVQConfig,
            stats: dict[str, Any]) -> VQWeight:
    """Codebook update (indices fixed) and rounding to the stored precision."""
    loss_pass = stats["loss_pass"]
    if cfg.svd_rank is not None:
        weight_q = _finish_svd(obj, cbooks, idx, geom, cfg, stats)
    else:
        final = cbooks
        if cfg.codebook_update:
            upd, stats["cg_iters"] = cbk.update_lstsq(obj, cbooks)
            stats["loss_update_float"] = obj.loss(upd)
            upd_q = cbk.quantize_codebooks(upd, cfg.codebook)[0]
            if obj.loss(upd_q) < loss_pass:
                final = upd
        vals, ints, scale = cbk.quantize_codebooks(final, cfg.codebook)
        stats["loss_final"] = obj.loss(vals)
        weight_q = VQWeight.from_parts(geom, idx, codebook_kind=cfg.codebook, codebook_ints=ints,
                                       codebook_scale=scale, codebook_float=vals, norm=stats["norm"])
    return weight_q


def _normalize_group(w: torch.Tensor, scale_el: torch.Tensor, codes: torch.Tensor, rng: torch.Tensor, c0: int,
                     c1: int, sb: int, nb: int) -> None:
    """Choose the scales of the sub-rows covering columns [c0, c1) (c0 a multiple of sb) from the current weights:
    the grid point 2^(lo + code*step) nearest (in log2) to the sub-row's max |w|."""
    nsub = -(-(c1 - c0) // sb)
    seg = torch.nn.functional.pad(w[:, c0:c1].abs(), (0, nsub * sb - (c1 - c0))).reshape(w.shape[0], nsub, sb)
    amax = seg.amax(-1)
    lo, step = float(rng[0]), float(rng[1])
    lg = torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny))
    code = torch.zeros_like(amax, dtype=torch.int64) if step == 0 else \
        torch.clamp(torch.round((lg - lo) / step), 0, (1 << nb) - 1).long()
    j0 = c0 // sb
    codes[:, j0:j0 + nsub] = code
    s = norm_scale_values(code, rng).repeat_interleave(sb, dim=1)
    end = min(c0 + nsub * sb, scale_el.shape[1])
    scale_el[:, c0:end] = s[:, : end - c0]


def _finish_svd(obj: cbk.Objective, cbooks: torch.Tensor, idx: torch.Tensor, geom: VQGeometry, cfg: GPTVQConfig,
                stats: dict[str, Any]) -> VQWeight:
    """1D SVD codebooks: (optionally refit the full codebooks,) sort them, truncate the G x k matrix to rank r, round
    the right factor to int8, refit the left factor by least squares against the layer objective, round it to int8."""
    if cfg.codebook_update:
        cbooks, stats["cg_iters"] = cbk.update_lstsq(obj, cbooks)
    cbooks, idx = cbk.sort_codebooks(cbooks, idx, geom)
    a, b = cbk.svd_factors(cbooks, cfg.svd_rank)
    b_int, b_scale = cbk.quantize_symmetric_rows(b, dim=0)
    basis = b_int * b_scale[:, None]
    a = cbooks.reshape(geom.groups, geom.k) @ torch.linalg.pinv(basis)
    sobj = cbk.Objective(obj.w, obj.h, idx, geom, scales=obj.scales, basis=basis)
    if cfg.codebook_update:
        a, it = cbk.update_lstsq(sobj, a)
        stats["cg_iters"] += it
    a_int, a_scale = cbk.quantize_symmetric_rows(a, dim=1)
    stats["loss_final"] = sobj.loss(a_int * a_scale[None, :])
    r = b_int.shape[0]
    svd = {
        "svd_u": a_int.to(torch.int8).contiguous(),
        "svd_u_scale": a_scale.to(torch.float16),
        "svd_v": b_int.to(torch.int8).contiguous(),
        "svd_v_scale": b_scale.to(torch.float16),
    }
    assert svd["svd_u"].shape == (geom.groups, r)
    return VQWeight.from_parts(geom, idx, codebook_kind="int8", svd=svd, norm=stats["norm"])
