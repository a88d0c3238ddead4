"""vqmobile::int_linear: a linear layer over a group-wise integer weight (formats/intweight.py), kept packed.

    vqmobile::int_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias,
                         int n, int k, int bits, int group, bool act_int8=False) -> Tensor

plus its ``.out`` overload. CPU: the native kernels for decode-sized inputs, else the decomposition
(:func:`int_dequantize` + matmul). It also runs the lm_head tied to the int8 embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import (NAMESPACE, Binding, bias32, cached_decode, check_x, kernel_rows_ok, lib, native,
                      quantize_activations, register_binding, unpack_bits, write_out)

_ARGS = "int n, int k, int bits, int group, bool act_int8=False"

lib.define(f"int_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, {_ARGS}) -> Tensor")
lib.define(f"int_linear.out(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, {_ARGS}, *, "
           "Tensor(a!) out) -> Tensor(a!)")


@cached_decode
def int_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int, k: int, bits: int,
                   group: int) -> torch.Tensor:
    """The float32 weight [n, k] of a group-wise integer weight (standard ops; traceable)."""
    q = unpack_bits(codes, k, bits).to(torch.float32)
    g = torch.div(torch.arange(k), group, rounding_mode="floor")
    s = scales.to(torch.float32)[:, g]
    z = zeros.to(torch.float32)[:, g] if zeros is not None else float(1 << (bits - 1))
    return (q - z) * s


def int_linear_decomposed(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False):
    w = int_dequantize(codes, scales, zeros, n, k, bits, group)
    x = x.to(torch.float32)
    return F.linear(quantize_activations(x, group) if act_int8 else x, w, bias)


# Weight rows dequantized at once on the GEMM path: a 262,144-row head (Gemma 3's vocabulary, tied to the int8
# embedding) then never exists in float32 as a whole (671 MB, several times that in temporaries).
GEMM_ROWS = 16384


def _int_linear_gemm(x, codes, scales, zeros, bias, n, k, bits, group, act_int8):
    """The decomposition's arithmetic, GEMM_ROWS output features at a time."""
    if n <= GEMM_ROWS:
        return int_linear_decomposed(x, codes, scales, zeros, bias, n, k, bits, group, act_int8)
    xa = quantize_activations(x, group) if act_int8 else x
    out = x.new_empty((*x.shape[:-1], n))
    for s in range(0, n, GEMM_ROWS):
        e = min(n, s + GEMM_ROWS)
        w = int_dequantize(codes[s:e], scales[s:e], None if zeros is None else zeros[s:e], e - s, k, bits, group)
        out[..., s:e] = F.linear(xa, w, None if bias is None else bias[s:e])
    return out


@torch.library.impl(lib, "int_linear", "CPU")
def _int_linear_cpu(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False):
    x = x.to(torch.float32).contiguous()
    if kernel_rows_ok(x, k):
        return native.int_linear(x, codes.contiguous(), scales.contiguous(),
                                 None if zeros is None else zeros.contiguous(), n=n, k=k, bits=bits, group=group,
                                 bias=bias32(bias), act_int8=act_int8)
    return _int_linear_gemm(x, codes, scales, zeros, bias32(bias), n, k, bits, group, act_int8)


@torch.library.impl(lib, "int_linear.out", "CPU")
def _int_linear_out_cpu(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False, *, out):
    return write_out(out, _int_linear_cpu(x, codes, scales, zeros, bias, n, k, bits, group, act_int8))


@torch.library.register_fake(f"{NAMESPACE}::int_linear")
def _int_linear_fake(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False):
    check_x(x, k, "int_linear")
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::int_linear.out")
def _int_linear_out_fake(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False, *, out):
    return out


def _support(qweight) -> str | None:
    return None if 1 <= qweight.bits <= 8 else f"int weights with {qweight.bits} bits have no kernel"


def _run(qweight, x, bias, act_int8, decompose):
    n, k = qweight.shape
    args = (qweight.codes, qweight.scales, qweight.zeros, bias, n, k, qweight.bits, qweight.group, bool(act_int8))
    return int_linear_decomposed(x, *args) if decompose else torch.ops.vqmobile.int_linear(x, *args)


register_binding("int", Binding("int_linear", _support, _run,
                                {torch.ops.vqmobile.int_linear.default: int_linear_decomposed}))
