"""Incoherent weights (formats/incoherent.py) run as three operators: vqmobile::hadamard on the input (one call per
block of the transform), the inner weight's own operator, vqmobile::hadamard (transposed) on its output; the bias is
added last. The decoder that calls QuantLinear needs no change, and an exported graph shows the online transforms as
nodes of their own (export/ counts and times them). Weights whose inner format has no operator run dense."""

from __future__ import annotations

import torch

from ..formats.incoherent import pack_signs
from . import hadamard
from .library import BINDINGS, Binding, register_binding


def _block_signs(qweight) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The packed signs of each block of both transforms, computed once per weight (one block: the stored tensor)."""
    cached = qweight.__dict__.get("_block_signs")
    if cached is None:
        s_in, s_out = qweight.signs()
        cached = qweight.__dict__["_block_signs"] = (
            _split(qweight.in_signs, s_in, qweight.in_blocks), _split(qweight.out_signs, s_out, qweight.out_blocks))
    return cached


def _split(packed: torch.Tensor, signs: torch.Tensor, blocks) -> list[torch.Tensor]:
    if len(blocks) == 1:
        return [packed]
    out, off = [], 0
    for m, p in blocks:
        out.append(pack_signs(signs[off:off + m * p]))
        off += m * p
    return out


def _support(qweight) -> str | None:
    inner = BINDINGS.get(qweight.inner.kind)
    if inner is None:
        return f"the inner weight kind {qweight.inner.kind!r} has no vqmobile operator"
    return inner.support(qweight.inner)


def _run(qweight, x, bias, act_int8, decompose):
    s_in, s_out = _block_signs(qweight)
    xt = hadamard.transform(x, qweight.in_blocks, s_in, False, decompose)
    yt = BINDINGS[qweight.inner.kind].run(qweight.inner, xt, None, act_int8, decompose)
    y = hadamard.transform(yt, qweight.out_blocks, s_out, True, decompose)
    return y if bias is None else y + bias.to(torch.float32)


register_binding("incoherent", Binding("hadamard", _support, _run,
                                       {torch.ops.vqmobile.hadamard.default: hadamard.hadamard_decomposed}))
