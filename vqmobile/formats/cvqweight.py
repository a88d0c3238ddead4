"""Column-vector VQ weights (VPTQ): the stored format, kind "cvq".

W has N rows (output features) and K columns (input features). Unlike GPTVQ's row vectors (vqweight.py), a vector
here runs down a column: v consecutive output rows of one input column, so decoding one vector is an axpy into v
outputs, y[n..n+v) += c[idx] * x[k]. Columns are stored in a permuted order (VPTQ's column permutation: descending
Hessian diagonal, so the outlier columns come first), each with its own scale (VPTQ's column normalization):

    W[j*v + t, perm[c]] = col_scale[c] * (codebook[g(c), idx[j, c], t] * codebook_scale[g(c)]
                                          + res_codebook[g(c), ridx[j, c], t] * res_scale[g(c)])

for every stored column c and vector row j (rows at or past N do not exist: the last vector is partial when N % v).
Codebook groups g(c): the first `outlier_cols` stored columns form group 0 when there are any (the outlier codebook),
the remaining columns form groups of `cols_per_group` (the last one may be shorter). Tensors:

    indices         uint8 [ceil(N/v), ceil(K*b/8)]     row j: the b-bit index of vector j of every stored column,
                                                        one little-endian bitstream (pack.py), b = ceil(log2 k) <= 16
    codebook        int8  [G, k, v]                     symmetric per group, values in [-127, 127]
    codebook_scale  fp16  [G]                           max|c| / 127
    res_indices     uint8 [ceil(N/v), ceil(K*b_r/8)]   the residual stage (absent without one), b_r = ceil(log2 k_r)
    res_codebook    int8  [G, k_r, v]
    res_scale       fp16  [G]
    col_scale       fp16  [K]
    perm            int16 [K]                           a permutation of 0..K-1 (so K <= 32768)

The native kernels (native/src/cvq_*.c) read these tensors as they are; `dequantize` is the reference decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FormatError
from .base import QuantizedWeight, Trainable, expect_tensor, register_format
from .pack import MAX_BITS, pack_rows, row_bytes, unpack_rows
from .vqweight import quantize_codebooks

MAX_V = 8  # the native kernels hold one decoded vector in a register
MAX_CENTROIDS = 1 << MAX_BITS
MAX_COLS = 1 << 15  # perm is int16


def index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


@dataclass(frozen=True)
class CVQGeometry:
    """Shape bookkeeping shared by the format, the quantizer and the operator."""

    n: int  # rows N
    cols: int  # columns K
    v: int  # vector length (rows per vector)
    k: int  # centroids of the main codebook
    res_k: int  # centroids of the residual codebook, 0 = no residual stage
    outlier_cols: int  # stored columns [0, outlier_cols) share the outlier codebook (group 0)
    cols_per_group: int  # columns per codebook group after the outliers

    @property
    def bits(self) -> int:
        return index_bits(self.k)

    @property
    def res_bits(self) -> int:
        return index_bits(self.res_k) if self.res_k else 0

    @property
    def vector_rows(self) -> int:
        return -(-self.n // self.v)

    @property
    def groups(self) -> int:
        return (1 if self.outlier_cols else 0) + -(-(self.cols - self.outlier_cols) // self.cols_per_group)

    def bounds(self) -> list[tuple[int, int]]:
        """[(c0, c1)] stored column range of every codebook group, in group order."""
        out = [(0, self.outlier_cols)] if self.outlier_cols else []
        out += [(c0, min(c0 + self.cols_per_group, self.cols))
                for c0 in range(self.outlier_cols, self.cols, self.cols_per_group)]
        return out

    def group_of_column(self) -> torch.Tensor:
        """int64 [K]: the codebook group of each stored column."""
        g = torch.empty(self.cols, dtype=torch.int64)
        for i, (c0, c1) in enumerate(self.bounds()):
            g[c0:c1] = i
        return g


def expand_columns(codebooks: torch.Tensor, idx: torch.Tensor, geom: CVQGeometry, groups: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """codebooks float [G, k, v], idx int64 [ceil(N/v), K] -> the stored-order matrix float [N, K] (differentiable in
    the codebooks)."""
    g = geom.group_of_column() if groups is None else groups
    kk = codebooks.shape[1]
    vals = codebooks.reshape(-1, geom.v)[g[None, :] * kk + idx]  # [NV, K, v]
    return vals.permute(0, 2, 1).reshape(geom.vector_rows * geom.v, geom.cols)[: geom.n]


@register_format
class CVQWeight(QuantizedWeight):
    kind = "cvq"

    def __init__(self, geom: CVQGeometry, tensors: dict[str, torch.Tensor], shared: str | None = None):
        """Build from already-stored tensors (validated by from_stored); use from_parts() for float parts. `shared`
        names a set of weights (the linears reading one input) that hold the same codebooks and permutation, each
        with its own indices and column scales: fine-tuning tunes the codebooks as one, the checkpoint stores them
        once."""
        self.geom = geom
        self.stored = tensors
        self.shared = shared

    @classmethod
    def from_parts(cls, geom: CVQGeometry, perm: torch.Tensor, col_scale: torch.Tensor, idx: torch.Tensor,
                   codebook: torch.Tensor, res_idx: torch.Tensor | None = None,
                   res_codebook: torch.Tensor | None = None, shared: str | None = None) -> "CVQWeight":
        """perm int [K]; col_scale float [K] (rounded to fp16 here); idx / res_idx int [ceil(N/v), K]; codebook /
        res_codebook float [G, k, v] (rounded to int8 with a per-group fp16 scale here)."""
        t = {"indices": pack_rows(idx.to(torch.int64), geom.bits), "perm": perm.to(torch.int16).contiguous(),
             "col_scale": col_scale.to(torch.float16).contiguous()}
        _, ints, scale = quantize_codebooks(codebook, "int8")
        t["codebook"], t["codebook_scale"] = ints.to(torch.int8).contiguous(), scale.to(torch.float16).contiguous()
        if geom.res_k:
            _, ints, scale = quantize_codebooks(res_codebook, "int8")
            t["res_indices"] = pack_rows(res_idx.to(torch.int64), geom.res_bits)
            t["res_codebook"], t["res_scale"] = ints.to(torch.int8).contiguous(), scale.to(torch.float16).contiguous()
        return cls(geom, t, shared)

    # ------------------------------------------------------------------------------------------------- interface
    @property
    def shape(self) -> tuple[int, int]:
        return self.geom.n, self.geom.cols

    def index_codes(self, residual: bool = False) -> torch.Tensor:
        """int64 [ceil(N/v), K] indices of the main (or residual) stage."""
        g = self.geom
        if residual:
            return unpack_rows(self.stored["res_indices"], g.res_bits, g.cols)
        return unpack_rows(self.stored["indices"], g.bits, g.cols)

    def codebooks(self, residual: bool = False) -> torch.Tensor:
        """float32 [G, k, v] as decoded."""
        cb, sc = ("res_codebook", "res_scale") if residual else ("codebook", "codebook_scale")
        return self.stored[cb].float() * self.stored[sc].float()[:, None, None]

    def perm(self) -> torch.Tensor:
        return self.stored["perm"].to(torch.int64)

    def _decoder(self):
        """(decode(codebook, res_codebook, col_scale) -> W, the parameters as decoded): everything discrete fixed."""
        g = self.geom
        groups, perm = g.group_of_column(), self.perm()
        idx = self.index_codes()
        ridx = self.index_codes(residual=True) if g.res_k else None
        inv = torch.argsort(perm)

        def decode(p: dict[str, torch.Tensor]) -> torch.Tensor:
            w = expand_columns(p["codebook"], idx, g, groups)
            if ridx is not None:
                w = w + expand_columns(p["res_codebook"], ridx, g, groups)
            return (w * p["col_scale"][None, :])[:, inv]

        params = {"codebook": self.codebooks(), "col_scale": self.stored["col_scale"].float()}
        if g.res_k:
            params["res_codebook"] = self.codebooks(residual=True)
        return decode, params

    def trainable(self) -> Trainable:
        decode, params = self._decoder()
        tied = {} if self.shared is None else {p: (self.kind, self.shared, p) for p in params if p != "col_scale"}
        return Trainable(params, decode, tied)

    def dequantize(self) -> torch.Tensor:
        decode, params = self._decoder()
        return decode(params)

    def _store_trainable(self, params: dict[str, torch.Tensor]) -> None:
        for cb, sc in (("codebook", "codebook_scale"), ("res_codebook", "res_scale")):
            if cb in params:
                _, ints, scale = quantize_codebooks(params[cb], "int8")
                self.stored[cb], self.stored[sc] = ints.to(torch.int8).contiguous(), scale.to(torch.float16).contiguous()
        fp16_max = float(torch.finfo(torch.float16).max)
        self.stored["col_scale"] = params["col_scale"].clamp(-fp16_max, fp16_max).to(torch.float16).contiguous()

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.stored)

    def shared_tensors(self) -> dict[str, str]:
        if self.shared is None:
            return {}
        return {t: self.shared for t in self.stored if t not in ("indices", "res_indices", "col_scale")}

    def spec(self) -> dict[str, Any]:
        g = self.geom
        spec = {"shape": [g.n, g.cols], "v": g.v, "k": g.k, "res_k": g.res_k, "outlier_cols": g.outlier_cols,
                "cols_per_group": g.cols_per_group}
        return spec if self.shared is None else {**spec, "shared": self.shared}

    # ---------------------------------------------------------------------------------------------- validation
    @classmethod
    def from_stored(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "CVQWeight":
        try:
            n, cols = (int(x) for x in spec["shape"])
            v, k, res_k = int(spec["v"]), int(spec["k"]), int(spec["res_k"])
            outlier_cols, cpg = int(spec["outlier_cols"]), int(spec["cols_per_group"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"cvq weight spec is malformed ({e!r})") from None
        shared = spec.get("shared")
        if shared is not None and not (isinstance(shared, str) and 0 < len(shared) <= 256):
            raise FormatError("cvq weight spec has a 'shared' entry that is not a short name")
        if n < 1 or not 1 <= cols <= MAX_COLS or not 1 <= v <= MAX_V or not 0 <= outlier_cols < cols or cpg < 1:
            raise FormatError(f"cvq weight spec is out of range: shape={n}x{cols} v={v} outlier_cols={outlier_cols} "
                              f"cols_per_group={cpg} (K <= {MAX_COLS}, v <= {MAX_V})")
        if not 2 <= k <= MAX_CENTROIDS or not (res_k == 0 or 2 <= res_k <= MAX_CENTROIDS):
            raise FormatError(f"cvq weight spec is out of range: k={k} res_k={res_k} (2..{MAX_CENTROIDS}, res_k 0 = none)")
        geom = CVQGeometry(n, cols, v, k, res_k, outlier_cols, cpg)
        nv, ng = geom.vector_rows, geom.groups
        stages = [("indices", "codebook", "codebook_scale", k, geom.bits)]
        if res_k:
            stages.append(("res_indices", "res_codebook", "res_scale", res_k, geom.res_bits))
        for idx_name, cb_name, sc_name, kk, bits in stages:
            packed = expect_tensor(tensors, idx_name, torch.uint8, (nv, row_bytes(cols, bits)))
            if kk != 1 << bits:  # power-of-two k: every code is in range by construction
                idx = unpack_rows(packed, bits, cols)
                if int(idx.max()) >= kk:
                    raise FormatError(f"cvq {idx_name} value {int(idx.max())} is out of range for {kk} centroids")
            cb = expect_tensor(tensors, cb_name, torch.int8, (ng, kk, v))
            if int(cb.to(torch.int16).min()) < -127:
                raise FormatError(f"tensor '{cb_name}' holds -128, outside the symmetric int8 range")
            sc = expect_tensor(tensors, sc_name, torch.float16, (ng,))
            if not bool(torch.isfinite(sc.float()).all()) or bool((sc.float() <= 0).any()):
                raise FormatError(f"tensor '{sc_name}' has non-finite or non-positive scales")
        col_scale = expect_tensor(tensors, "col_scale", torch.float16, (cols,))
        if not bool(torch.isfinite(col_scale.float()).all()):
            raise FormatError("tensor 'col_scale' has non-finite values")
        perm = expect_tensor(tensors, "perm", torch.int16, (cols,))
        if not torch.equal(torch.sort(perm.to(torch.int64)).values, torch.arange(cols)):
            raise FormatError("tensor 'perm' is not a permutation of the columns")
        expected = {"indices", "codebook", "codebook_scale", "col_scale", "perm"}
        if res_k:
            expected |= {"res_indices", "res_codebook", "res_scale"}
        if set(tensors) != expected:
            raise FormatError(f"cvq weight tensors {sorted(tensors)} do not match its spec {sorted(expected)}")
        return cls(geom, {name: tensors[name] for name in expected}, shared)
