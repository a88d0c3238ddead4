"""vqmobile::vq_linear: a linear layer over a plain int8-codebook VQ weight (formats/vqweight.py), kept packed.

    vqmobile::vq_linear(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor? bias,
                        int n, int k, int d, int rows_per_block, int cols_per_block, bool act_int8=False) -> Tensor

plus the ``.out`` overload ExecuTorch's memory planning needs. CPU: the native kernels for decode-sized inputs, else
the decomposition (:func:`vq_dequantize` + matmul). VQ variants without a kernel (fp16/int4/SVD codebooks,
normalization, d > 8) are not covered: their layers run as a dense matmul (ops.op_support says why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import (NAMESPACE, Binding, bias32, cached_decode, check_x, kernel_rows_ok, lib, native,
                      quantize_activations, register_binding, unpack_bits, write_out)

MAX_VQ_DIM = 8  # the native kernels handle d <= 8
_ARGS = "int n, int k, int d, int rows_per_block, int cols_per_block, bool act_int8=False"

lib.define(f"vq_linear(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor? bias, {_ARGS}) "
           "-> Tensor")
lib.define(f"vq_linear.out(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor? bias, "
           f"{_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


@cached_decode
def vq_dequantize(indices: torch.Tensor, codebook: torch.Tensor, codebook_scale: torch.Tensor, n: int, k: int, d: int,
                  rows_per_block: int, cols_per_block: int) -> torch.Tensor:
    """The float32 weight [n, k] of a plain int8-codebook VQ weight (standard ops; traceable)."""
    ncent = codebook.shape[2]
    nvec = -(-k // d)
    bits = max(1, (ncent - 1).bit_length())
    idx = unpack_bits(indices, nvec, bits)  # [n, V]
    return vq_rows(codebook, codebook_scale, idx, torch.arange(n), k, d, rows_per_block, cols_per_block)


def vq_rows(codebook: torch.Tensor, codebook_scale: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, k: int,
            d: int, rows_per_block: int, cols_per_block: int) -> torch.Tensor:
    """The float32 rows `rows` (int64, any shape) of a plain int8-codebook VQ weight from their codes idx [..., V]
    (standard ops; traceable). The codebook entries are gathered before they are converted: a VQ embedding decodes a
    token's row per step, and converting its whole codebook tensor would cost 2.4 MB a step on SmolLM2."""
    ncent, ncb = codebook.shape[2], codebook.shape[1]
    rb = torch.div(rows, rows_per_block, rounding_mode="floor")
    cb = torch.div(torch.arange(idx.shape[-1]) * d, cols_per_block, rounding_mode="floor")
    flat = (rb[..., None] * ncb + cb) * ncent + idx
    vals = codebook.reshape(-1, d)[flat].flatten(-2)[..., :k].to(torch.float32)
    colb = torch.div(torch.arange(k), cols_per_block, rounding_mode="floor")
    return vals * codebook_scale[rb].to(torch.float32)[..., colb]


def vq_linear_decomposed(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                         act_int8=False):
    w = vq_dequantize(indices, codebook, codebook_scale, n, k, d, rows_per_block, cols_per_block)
    x = x.to(torch.float32)
    return F.linear(quantize_activations(x, cols_per_block) if act_int8 else x, w, bias)


@torch.library.impl(lib, "vq_linear", "CPU")
def _vq_linear_cpu(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                   act_int8=False):
    x = x.to(torch.float32).contiguous()
    if d <= MAX_VQ_DIM and kernel_rows_ok(x, k):
        return native.vq_linear(x, indices.contiguous(), codebook.contiguous(), codebook_scale.contiguous(),
                                n=n, k=k, d=d, rows_per_block=rows_per_block, cols_per_block=cols_per_block,
                                bias=bias32(bias), act_int8=act_int8)
    return vq_linear_decomposed(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                                act_int8)


@torch.library.impl(lib, "vq_linear.out", "CPU")
def _vq_linear_out_cpu(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                       act_int8=False, *, out):
    return write_out(out, _vq_linear_cpu(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block,
                                         cols_per_block, act_int8))


@torch.library.register_fake(f"{NAMESPACE}::vq_linear")
def _vq_linear_fake(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                    act_int8=False):
    check_x(x, k, "vq_linear")
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::vq_linear.out")
def _vq_linear_out_fake(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                        act_int8=False, *, out):
    return out


def _support(qweight) -> str | None:
    if qweight.codebook_kind != "int8":
        return f"VQ with {qweight.codebook_kind} codebooks has no kernel (only int8 codebooks do)"
    if qweight.svd is not None:
        return "VQ with SVD-compressed codebooks has no kernel"
    if qweight.norm is not None:
        return "VQ with blockwise normalization has no kernel"
    if qweight.geom.d > MAX_VQ_DIM:
        return f"VQ with vector dimension {qweight.geom.d} > {MAX_VQ_DIM} has no kernel"
    return None


def _run(qweight, x, bias, act_int8, decompose):
    n, k = qweight.shape
    g = qweight.geom
    args = (qweight.indices, qweight.codebook, qweight.codebook_scale, bias, n, k, g.d, g.rows_per_block,
            g.cols_per_block, bool(act_int8))
    return vq_linear_decomposed(x, *args) if decompose else torch.ops.vqmobile.vq_linear(x, *args)


register_binding("vq", Binding("vq_linear", _support, _run,
                               {torch.ops.vqmobile.vq_linear.default: vq_linear_decomposed}))
