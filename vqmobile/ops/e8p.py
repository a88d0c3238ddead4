"""vqmobile::e8p_linear: a linear layer over an E8P lattice-codebook weight (formats/e8p.py, QuIP#), kept packed.

    vqmobile::e8p_linear(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int n, int k, bool act_int8=False)
        -> Tensor

codes uint8 [n, bits, ceil(k/8)], scales float32 [stages]; plus its ``.out`` overload. int8 activations are quantized
per block of ACT_BLOCK columns. CPU: the native kernels for decode-sized inputs, else the decomposition (the table
decode + matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.e8p import stage_integers
from .library import (NAMESPACE, Binding, bias32, cached_decode, check_x, kernel_rows_ok, lib, native,
                      quantize_activations, register_binding, write_out)

ACT_BLOCK = 256  # int8 activation block: 32 codes, the kernels' chunk
_ARGS = "int n, int k, bool act_int8=False"

lib.define(f"e8p_linear(Tensor x, Tensor codes, Tensor scales, Tensor? bias, {_ARGS}) -> Tensor")
lib.define(f"e8p_linear.out(Tensor x, Tensor codes, Tensor scales, Tensor? bias, {_ARGS}, *, Tensor(a!) out) "
           "-> Tensor(a!)")


@cached_decode
def e8p_dequantize(codes: torch.Tensor, scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 weight [n, k] (standard ops; traceable)."""
    w = None
    for s, ints in enumerate(stage_integers(codes, codes.shape[1], k)):
        part = ints.to(torch.float32) * scales[s]
        w = part if w is None else w + part
    return w


def e8p_linear_decomposed(x, codes, scales, bias, n, k, act_int8=False):
    w = e8p_dequantize(codes, scales, n, k)
    x = x.to(torch.float32)
    return F.linear(quantize_activations(x, ACT_BLOCK) if act_int8 else x, w, bias)


@torch.library.impl(lib, "e8p_linear", "CPU")
def _e8p_linear_cpu(x, codes, scales, bias, n, k, act_int8=False):
    x = x.to(torch.float32).contiguous()
    if kernel_rows_ok(x, k):
        return native.e8p_linear(x, codes.contiguous(), scales.contiguous(), n=n, k=k, bias=bias32(bias),
                                 act_int8=act_int8)
    return e8p_linear_decomposed(x, codes, scales, bias, n, k, act_int8)


@torch.library.impl(lib, "e8p_linear.out", "CPU")
def _e8p_linear_out_cpu(x, codes, scales, bias, n, k, act_int8=False, *, out):
    return write_out(out, _e8p_linear_cpu(x, codes, scales, bias, n, k, act_int8))


@torch.library.register_fake(f"{NAMESPACE}::e8p_linear")
def _e8p_linear_fake(x, codes, scales, bias, n, k, act_int8=False):
    check_x(x, k, "e8p_linear")
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::e8p_linear.out")
def _e8p_linear_out_fake(x, codes, scales, bias, n, k, act_int8=False, *, out):
    return out


def _run(qweight, x, bias, act_int8, decompose):
    n, k = qweight.shape
    args = (qweight.codes, qweight.scales, bias, n, k, bool(act_int8))
    return e8p_linear_decomposed(x, *args) if decompose else torch.ops.vqmobile.e8p_linear(x, *args)


register_binding("e8p", Binding("e8p_linear", lambda qweight: None, _run,
                                {torch.ops.vqmobile.e8p_linear.default: e8p_linear_decomposed}))
