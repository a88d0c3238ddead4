"""vqmobile::hadamard: one block of the random Hadamard transform (vqmobile/hadamard.py) along the last dimension.

    vqmobile::hadamard(Tensor x, Tensor signs, Tensor had, int m, int p, bool transpose=False) -> Tensor

x float32 [..., m * p]; signs uint8 [ceil(m p / 8)] (bit j set: negate element j); had int8 [m, m] (+-1, [[1]] for
m = 1); p a power of two. transpose=False computes H (s * x), transpose=True s * (H^T x), with H = (H_m (x) H_p) /
sqrt(m p) on the [m, p] view of x. Plus its ``.out`` overload. CPU: the native fast Walsh-Hadamard transform for
decode-sized inputs, else the decomposition (a product with H_p and one with H_m, which BLAS runs faster on many rows).
"""

from __future__ import annotations

import math

import torch

from ..hadamard import sylvester
from .library import NAMESPACE, kernel_rows_ok, lib, native, unpack_bits, write_out

_ARGS = "int m, int p, bool transpose=False"

lib.define(f"hadamard(Tensor x, Tensor signs, Tensor had, {_ARGS}) -> Tensor")
lib.define(f"hadamard.out(Tensor x, Tensor signs, Tensor had, {_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def hadamard_decomposed(x, signs, had, m, p, transpose=False):
    n = m * p
    s = 1.0 - 2.0 * unpack_bits(signs[None], n, 1)[0].to(torch.float32)
    x = x.to(torch.float32)
    if not transpose:
        x = x * s
    xb = x.reshape(*x.shape[:-1], m, p)
    if p > 1:
        xb = xb @ sylvester(p)
    if m > 1:
        h = had.to(torch.float32)
        xb = (h.T if transpose else h) @ xb
    y = xb.reshape(*x.shape[:-1], n) * (1.0 / math.sqrt(n))
    return y * s if transpose else y


@torch.library.impl(lib, "hadamard", "CPU")
def _hadamard_cpu(x, signs, had, m, p, transpose=False):
    if kernel_rows_ok(x, m * p):
        return native.hadamard(x.to(torch.float32).contiguous(), signs.contiguous(), had.contiguous(), m=m, p=p,
                               transpose=transpose)
    return hadamard_decomposed(x, signs, had, m, p, transpose)


@torch.library.impl(lib, "hadamard.out", "CPU")
def _hadamard_out_cpu(x, signs, had, m, p, transpose=False, *, out):
    return write_out(out, _hadamard_cpu(x, signs, had, m, p, transpose))


@torch.library.register_fake(f"{NAMESPACE}::hadamard")
def _hadamard_fake(x, signs, had, m, p, transpose=False):
    torch._check(x.shape[-1] == m * p, lambda: f"hadamard: x has {x.shape[-1]} features, the transform {m * p}")
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::hadamard.out")
def _hadamard_out_fake(x, signs, had, m, p, transpose=False, *, out):
    return out


def transform(x: torch.Tensor, blocks, block_signs, block_had, transpose: bool, decompose: bool) -> torch.Tensor:
    """The whole transform of a width covered by `blocks`, one operator call per block, with each block's packed
    signs and H_m."""
    run = hadamard_decomposed if decompose else torch.ops.vqmobile.hadamard
    outs, off = [], 0
    for (m, p), s, h in zip(blocks, block_signs, block_had):
        xb = x if len(blocks) == 1 else x[..., off:off + m * p]
        outs.append(run(xb, s, h, m, p, transpose))
        off += m * p
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def share_transforms(graph_module: torch.fx.GraphModule) -> int:
    """Merge vqmobile::hadamard calls with identical arguments (linears that read one input and carry the same signs,
    e.g. q/k/v or gate/up) into one, in place; returns how many calls were removed. The operator is a pure function
    of its arguments, so this is exact."""
    target = torch.ops.vqmobile.hadamard.default
    seen: dict = {}
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target != target:
            continue
        key = (tuple(node.args), tuple(sorted(node.kwargs.items())))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph_module.graph.erase_node(node)
            removed += 1
    if removed:
        graph_module.recompile()
    return removed
