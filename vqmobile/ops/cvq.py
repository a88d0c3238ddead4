"""vqmobile::cvq_linear: a linear layer over a column-vector VQ (VPTQ) weight (formats/cvqweight.py), kept packed.

    vqmobile::cvq_linear(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor col_scale,
                         Tensor perm, Tensor? res_indices, Tensor? res_codebook, Tensor? res_scale, Tensor? bias,
                         int n, int k, int v, int outlier_cols, int cols_per_group, bool act_int8=False) -> Tensor

plus the ``.out`` overload ExecuTorch's memory planning needs. The activations are permuted and scaled first,
x'[c] = x[perm[c]] * col_scale[c]; with act_int8, x' is rounded to int8 per activation block (every codebook group
cut into blocks of ACT_BLOCK stored columns), which is what the kernels' integer sums compute. CPU: the native kernels
for decode-sized inputs, else the decomposition (:func:`cvq_linear_decomposed`: standard ops, traceable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import (NAMESPACE, Binding, bias32, cached_decode, check_x, kernel_rows_ok, lib, native,
                      quantize_activations, register_binding, unpack_bits, write_out)

ACT_BLOCK = 256  # native/include/vqmobile.h VQM_CVQ_ACT_BLOCK
_TENSORS = ("Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor col_scale, Tensor perm, "
            "Tensor? res_indices, Tensor? res_codebook, Tensor? res_scale, Tensor? bias")
_ARGS = "int n, int k, int v, int outlier_cols, int cols_per_group, bool act_int8=False"

lib.define(f"cvq_linear({_TENSORS}, {_ARGS}) -> Tensor")
lib.define(f"cvq_linear.out({_TENSORS}, {_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def group_bounds(k: int, outlier_cols: int, cols_per_group: int) -> list[tuple[int, int]]:
    """[(c0, c1)] stored-column range of every codebook group."""
    out = [(0, outlier_cols)] if outlier_cols else []
    return out + [(c, min(c + cols_per_group, k)) for c in range(outlier_cols, k, cols_per_group)]


def activation_blocks(k: int, outlier_cols: int, cols_per_group: int) -> list[tuple[int, int]]:
    """[(c0, c1)] stored-column range of every int8 activation block: each group cut into ACT_BLOCK columns."""
    return [(c, min(c + ACT_BLOCK, g1)) for g0, g1 in group_bounds(k, outlier_cols, cols_per_group)
            for c in range(g0, g1, ACT_BLOCK)]


def _stage(indices, codebook, scale, n, k, v, groups):
    ncent = codebook.shape[1]
    idx = unpack_bits(indices, k, max(1, (ncent - 1).bit_length()))  # [NV, K]
    table = (codebook.to(torch.float32) * scale.to(torch.float32)[:, None, None]).reshape(-1, v)
    vals = table[groups[None, :] * ncent + idx]  # [NV, K, v]
    return vals.permute(0, 2, 1).reshape(-1, k)[:n]


@cached_decode
def cvq_stored_weight(indices, codebook, codebook_scale, res_indices, res_codebook, res_scale, n: int, k: int, v: int,
                      outlier_cols: int, cols_per_group: int) -> torch.Tensor:
    """The float32 weight [n, k] in stored column order, without the column scales (standard ops; traceable):
    y = (x[..., perm] * col_scale) @ this^T."""
    col = torch.arange(k)
    groups = torch.where(col < outlier_cols, 0,
                         int(outlier_cols > 0) + torch.div(col - outlier_cols, cols_per_group, rounding_mode="floor"))
    w = _stage(indices, codebook, codebook_scale, n, k, v, groups)
    if res_codebook is not None:
        w = w + _stage(res_indices, res_codebook, res_scale, n, k, v, groups)
    return w


def permute_activations(x, col_scale, perm, k, outlier_cols, cols_per_group, act_int8):
    """x' = x[..., perm] * col_scale, rounded to int8 per activation block when act_int8 (standard ops)."""
    xp = torch.index_select(x.to(torch.float32), -1, perm.to(torch.int64)) * col_scale.to(torch.float32)
    if not act_int8:
        return xp
    return torch.cat([quantize_activations(xp[..., c0:c1], c1 - c0)
                      for c0, c1 in activation_blocks(k, outlier_cols, cols_per_group)], dim=-1)


def cvq_linear_decomposed(x, indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale,
                          bias, n, k, v, outlier_cols, cols_per_group, act_int8=False):
    w = cvq_stored_weight(indices, codebook, codebook_scale, res_indices, res_codebook, res_scale, n, k, v,
                          outlier_cols, cols_per_group)
    xp = permute_activations(x, col_scale, perm, k, outlier_cols, cols_per_group, act_int8)
    return F.linear(xp, w, bias)


@torch.library.impl(lib, "cvq_linear", "CPU")
def _cvq_linear_cpu(x, indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale, bias,
                    n, k, v, outlier_cols, cols_per_group, act_int8=False):
    x = x.to(torch.float32).contiguous()
    if kernel_rows_ok(x, k):
        res = (None, None, None) if res_codebook is None else \
            (res_indices.contiguous(), res_codebook.contiguous(), res_scale.contiguous())
        return native.cvq_linear(x, indices.contiguous(), codebook.contiguous(), codebook_scale.contiguous(),
                                 col_scale.contiguous(), perm.contiguous(), *res, n=n, k=k, v=v,
                                 outlier_cols=outlier_cols, cols_per_group=cols_per_group, bias=bias32(bias),
                                 act_int8=act_int8)
    return cvq_linear_decomposed(x, indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook,
                                 res_scale, bias, n, k, v, outlier_cols, cols_per_group, act_int8)


@torch.library.impl(lib, "cvq_linear.out", "CPU")
def _cvq_linear_out_cpu(x, indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale,
                        bias, n, k, v, outlier_cols, cols_per_group, act_int8=False, *, out):
    return write_out(out, _cvq_linear_cpu(x, indices, codebook, codebook_scale, col_scale, perm, res_indices,
                                          res_codebook, res_scale, bias, n, k, v, outlier_cols, cols_per_group,
                                          act_int8))


@torch.library.register_fake(f"{NAMESPACE}::cvq_linear")
def _cvq_linear_fake(x, indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale, bias,
                     n, k, v, outlier_cols, cols_per_group, act_int8=False):
    check_x(x, k, "cvq_linear")
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::cvq_linear.out")
def _cvq_linear_out_fake(x, indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale,
                         bias, n, k, v, outlier_cols, cols_per_group, act_int8=False, *, out):
    return out


def _support(qweight) -> str | None:
    return None  # every cvq weight (v <= 8, k <= 32768 by the format) has a kernel


def _run(qweight, x, bias, act_int8, decompose):
    g, t = qweight.geom, qweight.stored
    args = (t["indices"], t["codebook"], t["codebook_scale"], t["col_scale"], t["perm"], t.get("res_indices"),
            t.get("res_codebook"), t.get("res_scale"), bias, g.n, g.cols, g.v, g.outlier_cols, g.cols_per_group,
            bool(act_int8))
    return cvq_linear_decomposed(x, *args) if decompose else torch.ops.vqmobile.cvq_linear(x, *args)


register_binding("cvq", Binding("cvq_linear", _support, _run,
                                {torch.ops.vqmobile.cvq_linear.default: cvq_linear_decomposed}))
