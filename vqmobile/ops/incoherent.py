"""Incoherent weights (formats/incoherent.py) run as three operators: vqmobile::hadamard on the input (one call per
block of the transform), the inner weight's own operator, vqmobile::hadamard (transposed) on its output; a tuned
weight's output gain (a plain multiply) and the bias come last. The decoder that calls QuantLinear needs no change,
and an exported graph shows the online transforms as nodes of their own (export/ counts and times them). Weights
whose inner format has no operator run dense."""

from __future__ import annotations

import torch

from . import hadamard
from .library import BINDINGS, Binding, register_binding


def _support(qweight) -> str | None:
    inner = BINDINGS.get(qweight.inner.kind)
    if inner is None:
        return f"the inner weight kind {qweight.inner.kind!r} has no vqmobile operator"
    return inner.support(qweight.inner)


def _run(qweight, x, bias, act_int8, decompose):
    xt = hadamard.transform(x, qweight.in_blocks, qweight.in_block_signs, qweight.in_block_had, False, decompose)
    yt = BINDINGS[qweight.inner.kind].run(qweight.inner, xt, None, act_int8, decompose)
    y = hadamard.transform(yt, qweight.out_blocks, qweight.out_block_signs, qweight.out_block_had, True, decompose)
    gain = qweight.gain()
    if gain is not None:
        y = y * gain
    return y if bias is None else y + bias.to(torch.float32)


register_binding("incoherent", Binding("hadamard", _support, _run,
                                       {torch.ops.vqmobile.hadamard.default: hadamard.hadamard_decomposed}))
