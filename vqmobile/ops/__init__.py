"""The ``vqmobile`` torch.library operators: quantized linear layers that keep their weights packed.

One operator per stored format with a native kernel, each in its own module (``vq_linear`` in ops/vq.py,
``int_linear`` in ops/intlinear.py, ``cvq_linear`` in ops/cvq.py, ``e8p_linear`` in ops/e8p.py), ``hadamard`` (ops/hadamard.py) for the online
transforms of incoherent weights (ops/incoherent.py runs them around the inner weight's operator), ``dense_linear``
(ops/dense.py) for a float head tied to the embedding, ``attention`` (ops/attention.py), the exported decoders'
attention over their static KV cache, and ``rms_norm``, ``add_rms_norm``, ``rope`` and ``silu_mul``
(ops/decoder_steps.py), their norms (with the residual sum before them), rotary embedding and gated MLP product.
Every operator has an ``.out`` overload (``..., *, Tensor(a!) out) -> Tensor(a!)``) that ExecuTorch's memory planning
needs and that the C++ adapter in export/runtime/ implements, a fake kernel for torch.export, and a decomposition into
standard aten ops (the portable export option, ``decompose=True``, traces those). ``x`` is float32 [..., k]; the
result is float32 [..., n]. Stored tensors are used as they are in the checkpoint.

``act_int8`` selects the activation semantics: False multiplies the float activations; True first rounds each
activation row to int8 per block (the codebook column block for VQ, the group for int; symmetric, scale
max|x| / 127, round half to even: :func:`quantize_activations`), which is what the kernels' integer dot products
compute and how phone int4 kernels get their speed. Both semantics are defined for every implementation.

:func:`op_forward` is the single entry point QuantLinear uses, so eager PyTorch, export and the runtimes share one
definition. Weights no operator covers run as a dense matmul with the dequantized weight (:func:`op_support` says why).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F

# each module defines its operator and registers its binding
from . import attention, cvq, decoder_steps, dense, e8p, hadamard, incoherent, intlinear, vq  # noqa: F401
from .library import BINDINGS, KERNEL_MAX_ROWS, decode_cache, native_available, quantize_activations

__all__ = ["KERNEL_MAX_ROWS", "decode_cache", "decomposed", "decomposing", "decomposition_table", "dense_weight",
           "native_available", "op_forward", "op_support", "quantize_activations"]

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
    binding = BINDINGS.get(kind)
    if binding is None:
        return None, f"weight kind {kind!r} has no vqmobile operator"
    why = binding.support(qweight)
    return (None, why) if why else (binding.op, f"{kind} weight")


def dense_weight(qweight) -> torch.Tensor:
    """The dequantized weight of a layer no operator covers, computed once and kept with the weight."""
    w = qweight.__dict__.get("_dense")
    if w is None:
        w = qweight.__dict__["_dense"] = qweight.dequantize()
    return w


def op_forward(qweight, x: torch.Tensor, bias: torch.Tensor | None, act_int8: bool = False) -> torch.Tensor:
    """y = x W^T + b through the vqmobile operator for this weight's format (float32 result), or, for formats
    without one, a dense matmul with the dequantized weight (standard ops, float activations)."""
    op, _ = op_support(qweight)
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    if op is not None:
        y = BINDINGS[qweight.kind].run(qweight, xf, bias, act_int8, decomposing())
    else:
        y = F.linear(xf, dense_weight(qweight), None if bias is None else bias.to(torch.float32))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def decomposition_table() -> dict:
    """{operator overload: standard-op implementation}, e.g. for ExportedProgram.run_decompositions."""
    table = {torch.ops.vqmobile.dense_linear.default: dense.dense_linear_decomposed,
             torch.ops.vqmobile.attention.default: attention.attention_decomposed,
             torch.ops.vqmobile.rms_norm.default: decoder_steps.rms_norm_decomposed,
             torch.ops.vqmobile.add_rms_norm.default: decoder_steps.add_rms_norm_decomposed,
             torch.ops.vqmobile.rope.default: decoder_steps.rope_decomposed,
             torch.ops.vqmobile.silu_mul.default: decoder_steps.silu_mul_decomposed}
    for binding in BINDINGS.values():
        table.update(binding.decomposition)
    return table
