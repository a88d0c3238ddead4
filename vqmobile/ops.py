"""The ``vqmobile`` torch.library operators: quantized linear layers that keep their weights packed.

Two operators, one per stored format with a native kernel (``vqmobile.kernels``, C sources in native/):

    vqmobile::vq_linear(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor? bias,
                        int n, int k, int d, int rows_per_block, int cols_per_block, bool act_int8=False) -> Tensor
    vqmobile::int_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias,
                         int n, int k, int bits, int group, bool act_int8=False) -> Tensor

plus ``vqmobile::dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor`` (a float32 linear whose weight is
read in place as [n, k]; the exported decoders use it for an lm_head tied to the embedding, so that the program
stores that matrix once instead of once more inside an XNNPACK delegate), each with an ``.out`` overload (``..., *, Tensor(a!) out) -> Tensor(a!)``) that ExecuTorch's memory planning needs
and that the C++ adapter in export/runtime/ implements for the ExecuTorch runtime. ``x`` is float32 [..., k]; the
result is float32 [..., n]. Stored tensors are used as they are in the checkpoint (uint8 bitstreams, int8 codebooks,
fp16 scales); their layouts are documented in vqmobile/kernels.py.

``act_int8`` selects the activation semantics: False multiplies the float activations; True first rounds each
activation row to int8 per block (the codebook column block for VQ, the group for int; symmetric, scale
max|x| / 127, round half to even: :func:`quantize_activations`), which is what the kernels' integer dot products
compute and how phone int4 kernels get their speed. Both semantics are defined for every implementation below.

Implementations:
- CPU (eager and the reference for every runtime): the native kernels with float activations when the cffi module
  ``vqmobile._native`` imports, else a torch dequantize + matmul (:func:`vq_dequantize` / :func:`int_dequantize`).
- Fake (meta) kernels for torch.export.
- Decompositions into standard aten ops (:func:`vq_linear_decomposed`, :func:`int_linear_decomposed`): the portable
  export option (``decompose=True``) traces those instead of the operators, for runtimes without our kernels.

:func:`op_forward` is the single entry point QuantLinear uses, so eager PyTorch, export and the runtimes share this
definition. Weights the operators do not cover (VQ with fp16/int4/SVD codebooks, normalization or d > 8) run as a
dense matmul with the dequantized weight (:func:`op_support` says why).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F

try:  # the cffi kernels; absent when the package was installed without building them
    from . import kernels as _kernels
except ImportError:  # pragma: no cover - exercised only on installs without the native module
    _kernels = None

NAMESPACE = "vqmobile"
MAX_VQ_DIM = 8  # the native kernels handle d <= 8
# The kernels are matrix-vector products (decode) that stream the weights once per 8 activation rows; above this
# many rows (prefill, perplexity windows, calibration batches) one dequantization plus a GEMM is much faster.
KERNEL_MAX_ROWS = 8

_VQ_ARGS = "int n, int k, int d, int rows_per_block, int cols_per_block, bool act_int8=False"
_INT_ARGS = "int n, int k, int bits, int group, bool act_int8=False"

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define(f"vq_linear(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor? bias, {_VQ_ARGS}) "
            "-> Tensor")
_lib.define(f"vq_linear.out(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor? bias, "
            f"{_VQ_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.define("dense_linear.out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define(f"int_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, {_INT_ARGS}) -> Tensor")
_lib.define(f"int_linear.out(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, {_INT_ARGS}, *, "
            "Tensor(a!) out) -> Tensor(a!)")


def native_available() -> bool:
    return _kernels is not None


# ------------------------------------------------------------------------------------------ torch dequantization
def unpack_bits(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """uint8 [N, B] per-row little-endian bitstream -> int64 [N, count] codes, with standard ops only."""
    n = packed.shape[0]
    if bits == 8:
        return packed[:, :count].to(torch.int64)
    if bits == 4:
        lo = torch.bitwise_and(packed, 15)
        hi = torch.bitwise_right_shift(packed, 4)
        return torch.stack([lo, hi], dim=-1).reshape(n, -1)[:, :count].to(torch.int64)
    shifts = torch.arange(8, dtype=torch.uint8)
    b = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), shifts), 1)
    b = b.reshape(n, -1)[:, : count * bits].reshape(n, count, bits).to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(bits, dtype=torch.int64), torch.arange(bits, dtype=torch.int64))
    return (b * weights).sum(-1)


def vq_dequantize(indices: torch.Tensor, codebook: torch.Tensor, codebook_scale: torch.Tensor, n: int, k: int, d: int,
                  rows_per_block: int, cols_per_block: int) -> torch.Tensor:
    """The float32 weight [n, k] of a plain int8-codebook VQ weight (standard ops; traceable)."""
    ncent = codebook.shape[2]
    nvec = -(-k // d)
    bits = max(1, (ncent - 1).bit_length())
    ncb = codebook.shape[1]
    idx = unpack_bits(indices, nvec, bits)  # [n, V]
    rb = torch.div(torch.arange(n), rows_per_block, rounding_mode="floor")
    cb = torch.div(torch.arange(nvec) * d, cols_per_block, rounding_mode="floor")
    flat = (rb[:, None] * ncb + cb[None, :]) * ncent + idx
    vals = codebook.to(torch.float32).reshape(-1, d)[flat].reshape(n, nvec * d)[:, :k]
    colb = torch.div(torch.arange(k), cols_per_block, rounding_mode="floor")
    scale = codebook_scale.to(torch.float32)[rb][:, colb]
    return vals * scale


def int_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int, k: int, bits: int,
                   group: int) -> torch.Tensor:
    """The float32 weight [n, k] of a group-wise integer weight (standard ops; traceable)."""
    q = unpack_bits(codes, k, bits).to(torch.float32)
    g = torch.div(torch.arange(k), group, rounding_mode="floor")
    s = scales.to(torch.float32)[:, g]
    z = zeros.to(torch.float32)[:, g] if zeros is not None else float(1 << (bits - 1))
    return (q - z) * s


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x float32 [..., k] rounded to int8 per block of `block` columns and scaled back (standard ops; traceable):
    the activations the kernels' act_int8 mode multiplies (native/src/dispatch.c vqm_quantize_act, bit for bit)."""
    k = x.shape[-1]
    nblk = -(-k // block)
    xb = F.pad(x, (0, nblk * block - k)).reshape(*x.shape[:-1], nblk, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(torch.clamp(xb * inv, -127.0, 127.0))
    return (q * (amax / 127.0)).reshape(*x.shape[:-1], nblk * block)[..., :k]


def vq_linear_decomposed(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                         act_int8=False):
    w = vq_dequantize(indices, codebook, codebook_scale, n, k, d, rows_per_block, cols_per_block)
    x = x.to(torch.float32)
    return F.linear(quantize_activations(x, cols_per_block) if act_int8 else x, w, bias)


def int_linear_decomposed(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False):
    w = int_dequantize(codes, scales, zeros, n, k, bits, group)
    x = x.to(torch.float32)
    return F.linear(quantize_activations(x, group) if act_int8 else x, w, bias)


# ------------------------------------------------------------------------------------------------ CPU kernels
def _bias32(bias):
    return None if bias is None else bias.to(torch.float32).contiguous()


@torch.library.impl(_lib, "vq_linear", "CPU")
def _vq_linear_cpu(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                   act_int8=False):
    x = x.to(torch.float32).contiguous()
    if _kernels is not None and d <= MAX_VQ_DIM and x.numel() <= KERNEL_MAX_ROWS * k:
        return _kernels.vq_linear(x, indices.contiguous(), codebook.contiguous(), codebook_scale.contiguous(),
                                  n=n, k=k, d=d, rows_per_block=rows_per_block, cols_per_block=cols_per_block,
                                  bias=_bias32(bias), act_int8=act_int8)
    return vq_linear_decomposed(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                                act_int8)


@torch.library.impl(_lib, "int_linear", "CPU")
def _int_linear_cpu(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False):
    x = x.to(torch.float32).contiguous()
    if _kernels is not None and x.numel() <= KERNEL_MAX_ROWS * k:
        return _kernels.int_linear(x, codes.contiguous(), scales.contiguous(),
                                   None if zeros is None else zeros.contiguous(), n=n, k=k, bits=bits, group=group,
                                   bias=_bias32(bias), act_int8=act_int8)
    return int_linear_decomposed(x, codes, scales, zeros, bias, n, k, bits, group, act_int8)


@torch.library.impl(_lib, "dense_linear", "CPU")
def _dense_linear_cpu(x, weight, bias):
    return F.linear(x.to(torch.float32), weight.to(torch.float32), _bias32(bias))


@torch.library.impl(_lib, "dense_linear.out", "CPU")
def _dense_linear_out_cpu(x, weight, bias, *, out):
    return _write_out(out, _dense_linear_cpu(x, weight, bias))


@torch.library.register_fake(f"{NAMESPACE}::dense_linear")
def _dense_linear_fake(x, weight, bias):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "dense_linear: x and weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::dense_linear.out")
def _dense_linear_out_fake(x, weight, bias, *, out):
    return out


def _write_out(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out.resize_(y.shape)
    out.copy_(y)
    return out


@torch.library.impl(_lib, "vq_linear.out", "CPU")
def _vq_linear_out_cpu(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                       act_int8=False, *, out):
    return _write_out(out, _vq_linear_cpu(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block,
                                          cols_per_block, act_int8))


@torch.library.impl(_lib, "int_linear.out", "CPU")
def _int_linear_out_cpu(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False, *, out):
    return _write_out(out, _int_linear_cpu(x, codes, scales, zeros, bias, n, k, bits, group, act_int8))


# ----------------------------------------------------------------------------------------------- fake kernels
def _check_x(x, k: int, what: str) -> None:
    torch._check(x.shape[-1] == k, lambda: f"{what}: x has {x.shape[-1]} input features, the weight {k}")


@torch.library.register_fake(f"{NAMESPACE}::vq_linear")
def _vq_linear_fake(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                    act_int8=False):
    _check_x(x, k, "vq_linear")
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::int_linear")
def _int_linear_fake(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False):
    _check_x(x, k, "int_linear")
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::vq_linear.out")
def _vq_linear_out_fake(x, indices, codebook, codebook_scale, bias, n, k, d, rows_per_block, cols_per_block,
                        act_int8=False, *, out):
    return out


@torch.library.register_fake(f"{NAMESPACE}::int_linear.out")
def _int_linear_out_fake(x, codes, scales, zeros, bias, n, k, bits, group, act_int8=False, *, out):
    return out


# ------------------------------------------------------------------------------------------- dispatch from formats
_state = threading.local()


def decomposing() -> bool:
    return bool(getattr(_state, "decompose", False))


@contextlib.contextmanager
def decomposed(enabled: bool = True) -> Iterator[None]:
    """Within this context op_forward runs the standard-op decompositions instead of the custom operators (the
    portable export option traces under it)."""
    prev = decomposing()
    _state.decompose = enabled
    try:
        yield
    finally:
        _state.decompose = prev


def op_support(qweight) -> tuple[str | None, str]:
    """(operator name or None, reason): which vqmobile operator runs this weight, or why none does."""
    kind = getattr(qweight, "kind", None)
    if kind == "int":
        if not 1 <= qweight.bits <= 8:
            return None, f"int weights with {qweight.bits} bits have no kernel"
        return "int_linear", "group-wise integer weight"
    if kind == "vq":
        g = qweight.geom
        if qweight.codebook_kind != "int8":
            return None, f"VQ with {qweight.codebook_kind} codebooks has no kernel (only int8 codebooks do)"
        if qweight.svd is not None:
            return None, "VQ with SVD-compressed codebooks has no kernel"
        if qweight.norm is not None:
            return None, "VQ with blockwise normalization has no kernel"
        if g.d > MAX_VQ_DIM:
            return None, f"VQ with vector dimension {g.d} > {MAX_VQ_DIM} has no kernel"
        return "vq_linear", "int8-codebook VQ weight"
    return None, f"weight kind {kind!r} has no vqmobile operator"


def _dense(qweight) -> torch.Tensor:
    dense = qweight.__dict__.get("_dense")
    if dense is None:
        dense = qweight.__dict__["_dense"] = qweight.dequantize()
    return dense


def op_forward(qweight, x: torch.Tensor, bias: torch.Tensor | None, act_int8: bool = False) -> torch.Tensor:
    """y = x W^T + b through the vqmobile operator for this weight's format (float32 result), or, for formats
    without one, a dense matmul with the dequantized weight (standard ops, float activations)."""
    op, _ = op_support(qweight)
    n, k = qweight.shape
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    if op == "vq_linear":
        g = qweight.geom
        args = (qweight.indices, qweight.codebook, qweight.codebook_scale, bias, n, k, g.d, g.rows_per_block,
                g.cols_per_block, bool(act_int8))
        y = vq_linear_decomposed(xf, *args) if decomposing() else torch.ops.vqmobile.vq_linear(xf, *args)
    elif op == "int_linear":
        args = (qweight.codes, qweight.scales, qweight.zeros, bias, n, k, qweight.bits, qweight.group, bool(act_int8))
        y = int_linear_decomposed(xf, *args) if decomposing() else torch.ops.vqmobile.int_linear(xf, *args)
    else:
        y = F.linear(xf, _dense(qweight), None if bias is None else bias.to(torch.float32))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def decomposition_table() -> dict:
    """{operator overload: standard-op implementation}, e.g. for ExportedProgram.run_decompositions."""
    return {torch.ops.vqmobile.vq_linear.default: vq_linear_decomposed,
            torch.ops.vqmobile.dense_linear.default: lambda x, w, b: F.linear(x.to(torch.float32), w, b),
            torch.ops.vqmobile.int_linear.default: int_linear_decomposed}
