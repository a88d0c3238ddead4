"""Hadamard matrices of any width and the orthonormal random Hadamard transform built from them (QuIP#'s incoherence
processing): construction, the block plan for a width, the transform in torch, and sign vectors.

A width n is covered by blocks; block i spans m_i * p_i consecutive columns and applies H_{m_i} (x) H_{p_i} scaled to be
orthonormal, where p_i is a power of two (Sylvester, applied as a fast Walsh-Hadamard transform) and m_i is 1 or a
Paley order (a dense m x m product). Inside a block, column i * p + j sits at row i, column j of an [m, p] view:

    y[i, j] = sum_{i', j'} H_m[i, i'] H_p[j, j'] x[i', j'] / sqrt(m p)

Most widths are one block (576 = 36 x 16, 1536 = 12 x 128, 192 = 12 x 16, 4096 = 1 x 4096): a full Hadamard mixes every
column with every other, which is what bounds the incoherence of the result. Widths with no such factorization here
(172 = 4 x 43, odd widths, ...) fall back to a block-diagonal of such blocks, chosen to make the smallest block as large
as possible (172 = 84 + 88): orthogonal and cheap, but it only mixes within blocks.

Paley construction I gives order q + 1 for a prime q = 3 mod 4 (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...),
construction II order 2 (q + 1) for a prime q = 1 mod 4 (12, 28, 36, 60, 76, 108, 124, ...). Prime powers (GF(27) for
28 is also reached by construction II, 52 needs GF(25)) and Williamson-type orders (92, 116, 172) are not built.

The random Hadamard transform of a vector is x -> H (s * x) with a random sign vector s (input side); its transpose
x -> s * (H^T x) undoes it (output side).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

MAX_SMALL = 256  # largest dense factor m: its product costs m operations per element


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % f for f in range(2, math.isqrt(q) + 1))


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m from Paley's construction over a prime field, or None."""
    q = m - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 3:  # construction I: skew, order q + 1
        chi = _quadratic_character(q)
        idx = np.arange(q)
        jac = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal matrix, skew-symmetric
        h = np.ones((m, m), np.int64)
        h[1:, 0] = -1
        h[1:, 1:] = jac + np.eye(q, dtype=np.int64)
        return h
    q = m // 2 - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 1:  # construction II: order 2 (q + 1)
        chi = _quadratic_character(q)
        idx = np.arange(q)
        conf = np.zeros((q + 1, q + 1), np.int64)  # symmetric conference matrix
        conf[0, 1:] = 1
        conf[1:, 0] = 1
        conf[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
        return np.kron(conf, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                                    np.array([[1, -1], [-1, -1]]))
    return None


def _quadratic_character(q: int) -> np.ndarray:
    chi = -np.ones(q, np.int64)
    chi[0] = 0
    chi[sorted({(i * i) % q for i in range(1, q)})] = 1
    return chi


def _small_ok(m: int) -> bool:
    return m == 1 or (m <= MAX_SMALL and _paley(m) is not None)


def _factor(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two and m the smallest buildable factor, or None."""
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        if _small_ok(n // p):
            return n // p, p
        p //= 2
    return None


def _buildable(n: int) -> bool:
    return n in (1, 2) or _factor(n) is not None


@functools.lru_cache(maxsize=None)
def plan(n: int) -> tuple[tuple[int, int], ...]:
    """The blocks (m, p) covering width n: one Kronecker block where possible, else the block-diagonal with the
    fewest blocks and, among those, the largest smallest block (larger blocks first)."""
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    for k in range(1, 9):
        sizes = _split(n, k, n)
        if sizes is not None:
            return tuple(_factor(s) if s > 2 else (1, s) for s in sizes)
    raise ValueError(f"no Hadamard block plan for width {n}")  # pragma: no cover - 1 and 2 are buildable


@functools.lru_cache(maxsize=None)
def _split(n: int, k: int, cap: int) -> tuple[int, ...] | None:
    """n as k buildable sizes, each <= cap, in decreasing order, maximizing the smallest; None if impossible."""
    if k == 1:
        return (n,) if n <= cap and _buildable(n) else None
    for b in range(min(n // k, cap), 0, -1):  # b: the smallest block
        if not _buildable(b):
            continue
        rest = _split(n - b, k - 1, cap)
        if rest is not None and rest[-1] >= b:
            return rest + (b,)
    return None


def small(m: int) -> torch.Tensor:
    """The dense factor H_m as int8 [m, m] (entries +-1); [[1]] for m = 1."""
    return torch.from_numpy(_small_int8(m))


@functools.lru_cache(maxsize=None)
def _small_int8(m: int) -> np.ndarray:
    if m == 1:
        return np.ones((1, 1), np.int8)
    h = _paley(m)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {m} is built here")
    return h.astype(np.int8)


def sylvester(p: int) -> torch.Tensor:
    """H_p (Sylvester, natural order) as float32 [p, p]: H[i, j] = (-1)^popcount(i & j)."""
    return torch.from_numpy(_sylvester(p))


# The caches hold numpy arrays, turned into tensors on each call: a tensor first made inside a torch.export trace
# would be a fake one, and cached it would poison every later export.
@functools.lru_cache(maxsize=None)
def _sylvester(p: int) -> np.ndarray:
    if not is_pow2(p):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {p}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def check_plan(n: int, blocks) -> tuple[tuple[int, int], ...]:
    """Validate a stored block plan (untrusted): ValueError naming the problem."""
    out = []
    for b in blocks:
        m, p = (int(v) for v in b)
        if not (is_pow2(p) and _small_ok(m)):
            raise ValueError(f"Hadamard block {m} x {p} is not buildable (p a power of two, m 1 or a Paley order)")
        out.append((m, p))
    if sum(m * p for m, p in out) != n:
        raise ValueError(f"Hadamard blocks {out} do not cover width {n}")
    return tuple(out)


def transform(x: torch.Tensor, blocks, signs: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The orthonormal random Hadamard transform along the last dimension: H (s * x), or s * (H^T x) with
    transpose. signs: bool [n] (True = negate). Standard ops only (traceable)."""
    s = 1.0 - 2.0 * signs.to(x.dtype)
    if not transpose:
        x = x * s
    outs, off = [], 0
    for m, p in blocks:
        xb = x[..., off:off + m * p].reshape(*x.shape[:-1], m, p)
        if p > 1:
            xb = xb @ sylvester(p).to(x.dtype)  # symmetric
        if m > 1:
            h = small(m).to(x.dtype)
            xb = (h.T if transpose else h) @ xb
        outs.append(xb.reshape(*x.shape[:-1], m * p) * (1.0 / math.sqrt(m * p)))
        off += m * p
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return y * s if transpose else y


def matrix(n: int, signs: torch.Tensor | None = None, blocks=None) -> torch.Tensor:
    """The dense orthonormal float64 matrix V with transform(x) = V x (for tests and small problems)."""
    blocks = plan(n) if blocks is None else blocks
    signs = torch.zeros(n, dtype=torch.bool) if signs is None else signs
    return transform(torch.eye(n, dtype=torch.float64), blocks, signs).T


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).bool()
