"""The vqmobile torch.library namespace and what every operator module shares: the kernels' row limit, activation
rounding (the int8 activation semantics, bit for bit the kernels'), bit unpacking with standard ops, the decode cache
of the GEMM path, and the registry that maps a stored format's kind to the operator that runs it."""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

try:  # the cffi kernels; absent when the package was installed without building them
    from .. import kernels as native
except ImportError:  # pragma: no cover - exercised only on installs without the native module
    native = None

NAMESPACE = "vqmobile"
# The kernels are matrix-vector products (decode) that stream the weights once per 8 activation rows; above this
# many rows (prefill, perplexity windows, calibration batches) one dequantization plus a GEMM is much faster.
KERNEL_MAX_ROWS = 8

lib = torch.library.Library(NAMESPACE, "FRAGMENT")


@dataclass(frozen=True)
class Binding:
    """How weights of one stored kind run: `support(qweight)` is None when the operator covers that weight, else the
    reason it does not; `run(qweight, x, bias, act_int8, decompose)` computes y through the operator, or through its
    standard-op decomposition when `decompose`; `decomposition` maps the operator's overload to that decomposition."""

    op: str
    support: Callable[[object], str | None]
    run: Callable[..., torch.Tensor]
    decomposition: dict


BINDINGS: dict[str, Binding] = {}


def register_binding(kind: str, binding: Binding) -> None:
    BINDINGS[kind] = binding


def native_available() -> bool:
    return native is not None


@dataclass
class DecodeCacheStats:
    hits: int = 0
    misses: int = 0
    bytes: int = 0


_cache = threading.local()


@contextlib.contextmanager
def decode_cache(budget_bytes: int = 1 << 30) -> Iterator[DecodeCacheStats]:
    """Within this block the GEMM path's weight decodes (functions marked @cached_decode) keep their float32 results,
    up to `budget_bytes` of them: a perplexity run feeds every weight hundreds of windows, and decoding it again for
    each one took a fifth of the time. The results are the same tensors bit for bit; the stored tensors must not
    change inside the block (evaluation only)."""
    prev = getattr(_cache, "state", None)
    stats = DecodeCacheStats()
    _cache.state = ({}, budget_bytes, stats)
    try:
        yield stats
    finally:
        _cache.state = prev


def _key(a):
    if isinstance(a, torch.Tensor):  # a view of the stored tensor (a row range) is as good a key as the tensor
        return ("tensor", a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a._version)
    return a


def cached_decode(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A stored-weight decode that decode_cache() may answer from its cache (positional arguments only)."""

    @functools.wraps(fn)
    def decode(*args):
        state = getattr(_cache, "state", None)
        if state is None:
            return fn(*args)
        entries, budget, stats = state
        key = (fn.__qualname__, *map(_key, args))
        hit = entries.get(key)
        if hit is not None:
            stats.hits += 1
            return hit[0]
        stats.misses += 1
        w = fn(*args)
        size = w.numel() * w.element_size()
        if stats.bytes + size <= budget:
            stats.bytes += size
            entries[key] = (w, args)  # holding the arguments keeps their addresses from being reused by other tensors
        return w

    return decode


def kernel_rows_ok(x: torch.Tensor, k: int) -> bool:
    """Whether the native kernels take this call (decode-sized x), else the decomposition runs it."""
    return native is not None and x.numel() <= KERNEL_MAX_ROWS * k


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


def bias32(bias):
    return None if bias is None else bias.to(torch.float32).contiguous()


def write_out(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out.resize_(y.shape)
    out.copy_(y)
    return out


def check_x(x, k: int, what: str) -> None:
    torch._check(x.shape[-1] == k, lambda: f"{what}: x has {x.shape[-1]} input features, the weight {k}")
