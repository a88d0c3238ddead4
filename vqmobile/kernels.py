"""Python boundary of the native kernels (``vqmobile._native``, built by cffi from native/).

This module owns: the calls into the C kernels for ``y = W x + b`` with vector-quantized (GPTVQ) weights
(:func:`vq_linear`), group-wise integer weights (:func:`int_linear`), column-vector VQ (VPTQ) weights
(:func:`cvq_linear`) and E8P lattice-codebook weights (QuIP#, :func:`e8p_linear`), the random Hadamard transform of
incoherent weights (:func:`hadamard`), the nearest-centroid search of GPTVQ and VPTQ (:func:`nearest`), their one-time
validation (:func:`validate_vq`, :func:`validate_cvq`, :func:`validate_int`), the thread and implementation-path controls
(:func:`set_num_threads`, :func:`available_paths`, :func:`active_path`, :func:`set_path`, :func:`force_path`), and
plain numpy reference decoders (:func:`dequantize_vq`, :func:`dequantize_int`) used by tests and benchmarks.

Formats (read directly, no conversion; see native/README.md):

- VQ: ``indices`` uint8 [n, ceil(ceil(k/d)*b/8)] (per-row little-endian bitstream of b = ceil(log2(ncent))-bit
  indices), ``codebook`` int8 [ceil(n/R), ceil(k/C), ncent, d], ``codebook_scale`` fp16 [ceil(n/R), ceil(k/C)];
  ``W[r, j*d+t] = codebook[r//R, (j*d)//C, idx[r, j], t] * codebook_scale[r//R, (j*d)//C]``.
- int: ``codes`` uint8 [n, ceil(k*bits/8)] (same bitstream, unsigned q), ``scales`` fp16 [n, ceil(k/group)],
  ``zeros`` uint8 [n, ceil(k/group)] or None (symmetric, zero = 2**(bits-1));
  ``W[r, c] = (q[r, c] - zero[r, c//group]) * scales[r, c//group]``.
- column-vector VQ (VPTQ): see vqmobile/formats/cvqweight.py and native/include/vqmobile.h (``vqm_cvq_weight``).

Here ``n``/``k`` are the weight's rows (out features) and columns (in features); the number of centroids is
``codebook.shape[2]``. Arrays may be torch CPU tensors or numpy arrays (C-contiguous); fp16 arrays may be
float16 or their raw bits as int16/uint16. ``x`` is float32 [..., k]; the result is float32 [..., n] of the same
kind (torch in -> torch out, numpy in -> numpy out).

``act_int8=True`` quantizes each row of x per activation block (the codebook column block C for VQ, the group for
int weights) to int8 (scale = max|x|/127, round half to even) and uses integer dot products; it is the fast mode.
``act_int8=False`` keeps float activations.

Batch: any number of rows; the kernels process up to 8 activation rows per pass over the weights (decode is shared
across them), larger batches are processed in passes of 8 (weights are re-read per pass).

Cost per call: only cheap checks (dtype, shape, contiguity). Index range checks happen in :func:`validate_vq`,
which the checkpoint loader must run once; for power-of-two ``ncent`` every b-bit index is in range by
construction, and the kernels clamp out-of-range indices otherwise, so they never read outside a codebook.

Threads: ``threads=None`` uses the global setting (:func:`set_num_threads`, default: environment variable
``VQMOBILE_NUM_THREADS`` or all online CPUs); rows are split over a persistent thread pool.
Paths: "ref" (portable C), "avx2", "avx512", "neon", "neon_dot" (as available); the environment variable
``VQMOBILE_PATH`` selects one at start-up (:func:`check_env_path` reports a name this CPU cannot run; the CLI
calls it before any command), :func:`set_path` /
:func:`force_path` at run time. A path without a specialised kernel for a configuration runs the reference for it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - torch is a dependency, but keep numpy-only use possible
    torch = None

from . import _native
from .errors import UserError

ffi = _native.ffi
lib = _native.lib

__all__ = [
    "vq_linear", "int_linear", "validate_vq", "validate_int", "set_num_threads", "get_num_threads",
    "available_paths", "active_path", "set_path", "force_path", "has_kernel", "vq_index_bits",
    "vq_row_bytes", "int_row_bytes", "dequantize_vq", "dequantize_int", "quantize_act", "stream_read",
    "MAX_KERNEL_BATCH", "nearest", "e8p_linear", "hadamard", "e8p_tables", "cvq_linear", "validate_cvq",
]

MAX_KERNEL_BATCH = 8
_PATHS = {"ref": 0, "avx2": 1, "avx512": 2, "neon": 3, "neon_dot": 4}
_ERRORS = {-1: "invalid argument", -2: "index out of range", -3: "out of memory", -4: "path not available"}


# ---------------------------------------------------------------------------------------------- paths, threads
def available_paths() -> list[str]:
    """Implementation paths usable on this CPU, reference first (e.g. ``["ref", "avx2"]``)."""
    return [name for name, p in _PATHS.items() if lib.vqm_path_available(p)]


def check_env_path() -> None:
    """Raise UserError when VQMOBILE_PATH names a path that is unknown or that this CPU cannot run (the kernels
    would otherwise quietly pick another one)."""
    rc = lib.vqm_path_from_env(ffi.new("int *"))
    if rc == 0:
        return
    value = os.environ.get("VQMOBILE_PATH", "")
    if rc == -4:
        raise UserError(f"VQMOBILE_PATH={value} is not available on this CPU (available: "
                        f"{', '.join(available_paths())}): unset it or pick one of those")
    raise UserError(f"VQMOBILE_PATH={value} is not a kernel path: use auto or one of {', '.join(_PATHS)}")


def active_path() -> str:
    """The path the kernels currently use ("ref", "avx2", "neon", "neon_dot")."""
    return ffi.string(lib.vqm_path_name(lib.vqm_get_path())).decode()


def set_path(name: str | None) -> None:
    """Select the implementation path for all later calls; None or "auto" restores the best available."""
    if name is None or name == "auto":
        lib.vqm_set_path(-1)
        return
    if name not in _PATHS:
        raise ValueError(f"unknown kernel path {name!r}; known: {sorted(_PATHS)}")
    if lib.vqm_set_path(_PATHS[name]) != 0:
        raise ValueError(f"kernel path {name!r} is not available on this CPU (available: {available_paths()})")


@contextlib.contextmanager
def force_path(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls on path ``name``, then restore the previous path."""
    prev = active_path()
    set_path(name)
    try:
        yield
    finally:
        set_path(prev)


def set_num_threads(n: int | None) -> None:
    """Threads used by calls with ``threads=None``; None or <= 0 means all online CPUs."""
    lib.vqm_set_num_threads(0 if n is None else int(n))


def get_num_threads() -> int:
    return int(lib.vqm_get_num_threads())


# ---------------------------------------------------------------------------------------------- array helpers
_NP = {"uint8": np.uint8, "int8": np.int8, "float16": np.float16, "int16": np.int16, "uint16": np.uint16,
       "float32": np.float32}


def _info(a: Any, name: str) -> tuple[str, tuple[int, ...], bool, int]:
    """(dtype name, shape, c-contiguous, data address) of a torch CPU tensor or numpy array."""
    if torch is not None and isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {a.device}")
        return str(a.dtype).replace("torch.", ""), tuple(a.shape), a.is_contiguous(), a.data_ptr()
    if isinstance(a, np.ndarray):
        return a.dtype.name, a.shape, bool(a.flags.c_contiguous), a.ctypes.data
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(a).__name__}")


def _check(a: Any, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None) -> int:
    dt, sh, contig, ptr = _info(a, name)
    if dt not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(dtypes)}, got {dt}")
    if shape is not None and tuple(sh) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(sh)}")
    if not contig:
        raise ValueError(f"{name} must be C-contiguous (call .contiguous() / np.ascontiguousarray first)")
    return ptr


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def vq_index_bits(ncent: int) -> int:
    """Bits per VQ index for ``ncent`` centroids: ceil(log2(ncent)), at least 1."""
    if not 1 <= ncent <= 256:
        raise ValueError(f"number of centroids must be in [1, 256], got {ncent}")
    return max(1, (ncent - 1).bit_length())


def vq_row_bytes(k: int, d: int, ncent: int) -> int:
    """Bytes per row of the VQ indices array."""
    return _cdiv(_cdiv(k, d) * vq_index_bits(ncent), 8)


def int_row_bytes(k: int, bits: int) -> int:
    """Bytes per row of the int codes array."""
    return _cdiv(k * bits, 8)


def _vq_struct(indices, codebook, codebook_scale, n, k, d, rows_per_block, cols_per_block):
    for nm, v in (("n", n), ("k", k), ("d", d), ("rows_per_block", rows_per_block),
                  ("cols_per_block", cols_per_block)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if d > 8:
        raise ValueError(f"vector dimension d must be <= 8, got {d}")
    if cols_per_block % d:
        raise ValueError(f"cols_per_block ({cols_per_block}) must be a multiple of d ({d})")
    if cols_per_block > 65536 or n >= 2**31 or k >= 2**31:
        raise ValueError("cols_per_block must be <= 65536 and n, k < 2**31")
    _, cbs, _, _ = _info(codebook, "codebook")
    if len(cbs) != 4:
        raise ValueError(f"codebook must be 4-D [row_blocks, col_blocks, ncent, d], got shape {tuple(cbs)}")
    ncent = int(cbs[2])
    nrb, ncb = _cdiv(n, rows_per_block), _cdiv(k, cols_per_block)
    p_idx = _check(indices, "indices", ("uint8",), (n, vq_row_bytes(k, d, ncent)))
    p_cb = _check(codebook, "codebook", ("int8",), (nrb, ncb, ncent, d))
    p_sc = _check(codebook_scale, "codebook_scale", ("float16", "int16", "uint16"), (nrb, ncb))
    w = ffi.new("vqm_vq_weight *")
    w.n, w.k, w.d, w.ncent = int(n), int(k), int(d), ncent
    w.rows_per_block, w.cols_per_block = int(rows_per_block), int(cols_per_block)
    w.indices = ffi.cast("const uint8_t *", p_idx)
    w.codebook = ffi.cast("const int8_t *", p_cb)
    w.scale = ffi.cast("const uint16_t *", p_sc)
    return w


def _int_struct(codes, scales, zeros, n, k, bits, group):
    for nm, v in (("n", n), ("k", k), ("bits", bits), ("group", group)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if bits > 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if group > 65536 or n >= 2**31 or k >= 2**31:
        raise ValueError("group must be <= 65536 and n, k < 2**31")
    ng = _cdiv(k, group)
    p_c = _check(codes, "codes", ("uint8",), (n, int_row_bytes(k, bits)))
    p_s = _check(scales, "scales", ("float16", "int16", "uint16"), (n, ng))
    p_z = _check(zeros, "zeros", ("uint8",), (n, ng)) if zeros is not None else 0
    w = ffi.new("vqm_int_weight *")
    w.n, w.k, w.bits, w.group = int(n), int(k), int(bits), int(group)
    w.codes = ffi.cast("const uint8_t *", p_c)
    w.scales = ffi.cast("const uint16_t *", p_s)
    w.zeros = ffi.cast("const uint8_t *", p_z) if zeros is not None else ffi.NULL
    return w


def _cvq_struct(indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale, n, k, v,
                outlier_cols, cols_per_group):
    for nm, val in (("n", n), ("k", k), ("v", v), ("cols_per_group", cols_per_group)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{nm} must be a positive int, got {val!r}")
    if v > 8 or k > 32768 or n >= 2**31 or not 0 <= outlier_cols < k:
        raise ValueError(f"cvq parameters out of range: v={v} (<= 8), k={k} (<= 32768), outlier_cols={outlier_cols}")
    _, cbs, _, _ = _info(codebook, "codebook")
    if len(cbs) != 3 or cbs[2] != v:
        raise ValueError(f"codebook must be 3-D [groups, ncent, {v}], got shape {tuple(cbs)}")
    ng, ncent = int(cbs[0]), int(cbs[1])
    if ng != (1 if outlier_cols else 0) + _cdiv(k - outlier_cols, cols_per_group):
        raise ValueError(f"codebook has {ng} groups, the parameters imply "
                         f"{(1 if outlier_cols else 0) + _cdiv(k - outlier_cols, cols_per_group)}")
    nv = _cdiv(n, v)

    def bits(c: int) -> int:
        return max(1, (c - 1).bit_length())

    w = ffi.new("vqm_cvq_weight *")
    w.n, w.k, w.v, w.ncent = int(n), int(k), int(v), ncent
    w.outlier_cols, w.cols_per_group = int(outlier_cols), int(cols_per_group)
    w.indices = ffi.cast("const uint8_t *", _check(indices, "indices", ("uint8",), (nv, _cdiv(k * bits(ncent), 8))))
    w.codebook = ffi.cast("const int8_t *", _check(codebook, "codebook", ("int8",), (ng, ncent, v)))
    w.scale = ffi.cast("const uint16_t *", _check(codebook_scale, "codebook_scale", ("float16", "int16", "uint16"), (ng,)))
    w.col_scale = ffi.cast("const uint16_t *", _check(col_scale, "col_scale", ("float16", "int16", "uint16"), (k,)))
    w.perm = ffi.cast("const int16_t *", _check(perm, "perm", ("int16",), (k,)))
    if res_codebook is not None:
        _, rs, _, _ = _info(res_codebook, "res_codebook")
        rk = int(rs[1]) if len(rs) == 3 else -1
        w.res_ncent = rk
        w.res_indices = ffi.cast("const uint8_t *", _check(res_indices, "res_indices", ("uint8",),
                                                           (nv, _cdiv(k * bits(max(rk, 2)), 8))))
        w.res_codebook = ffi.cast("const int8_t *", _check(res_codebook, "res_codebook", ("int8",), (ng, rk, v)))
        w.res_scale = ffi.cast("const uint16_t *", _check(res_scale, "res_scale", ("float16", "int16", "uint16"), (ng,)))
    return w


# ---------------------------------------------------------------------------------------------- validation
def validate_cvq(indices: Any, codebook: Any, codebook_scale: Any, col_scale: Any, perm: Any, res_indices: Any = None,
                 res_codebook: Any = None, res_scale: Any = None, *, n: int, k: int, v: int, outlier_cols: int,
                 cols_per_group: int) -> None:
    """Check a column-vector VQ weight once: dtypes, shapes, parameters, every index < its codebook size and perm a
    permutation. Raises ValueError with a one-line message on the first problem."""
    w = _cvq_struct(indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale, n, k, v,
                    outlier_cols, cols_per_group)
    bad_row, bad_col = ffi.new("int64_t *", -1), ffi.new("int64_t *", -1)
    rc = lib.vqm_cvq_validate(w, bad_row, bad_col)
    if rc == -2:
        if bad_row[0] < 0:
            raise ValueError(f"cvq perm is not a permutation of 0..{k - 1} (position {bad_col[0]})")
        raise ValueError(f"cvq index out of range: vector row {bad_row[0]}, column {bad_col[0]}")
    if rc != 0:
        raise ValueError(f"invalid cvq weight parameters ({_ERRORS.get(rc, rc)}): n={n} k={k} v={v}")


def validate_vq(indices: Any, codebook: Any, codebook_scale: Any, *, n: int, k: int, d: int,
                rows_per_block: int, cols_per_block: int) -> None:
    """Check a VQ weight once (at load): dtypes, shapes, contiguity, parameters and every index < ncent.

    Raises ValueError with a one-line message on the first problem."""
    w = _vq_struct(indices, codebook, codebook_scale, n, k, d, rows_per_block, cols_per_block)
    bad_row, bad_pos = ffi.new("int64_t *", -1), ffi.new("int64_t *", -1)
    rc = lib.vqm_vq_validate(w, bad_row, bad_pos)
    if rc == -2:
        raise ValueError(f"VQ index out of range: row {bad_row[0]}, vector {bad_pos[0]} has an index >= "
                         f"{w.ncent} (number of centroids)")
    if rc != 0:
        raise ValueError(f"invalid VQ weight parameters ({_ERRORS.get(rc, rc)}): n={n} k={k} d={d} "
                         f"ncent={w.ncent} R={rows_per_block} C={cols_per_block}")


def validate_int(codes: Any, scales: Any, zeros: Any, *, n: int, k: int, bits: int, group: int) -> None:
    """Check a group-wise integer weight once: dtypes, shapes, contiguity, parameters. Raises ValueError."""
    w = _int_struct(codes, scales, zeros, n, k, bits, group)
    rc = lib.vqm_int_validate(w)
    if rc != 0:
        raise ValueError(f"invalid int weight parameters ({_ERRORS.get(rc, rc)}): n={n} k={k} bits={bits} "
                         f"group={group}")


# ---------------------------------------------------------------------------------------------- products
def _prep_x(x: Any, k: int, n: int, bias: Any):
    dt, sh, contig, ptr = _info(x, "x")
    if dt != "float32":
        raise ValueError(f"x must be float32, got {dt}")
    if len(sh) < 1 or sh[-1] != k:
        raise ValueError(f"x must have shape [..., {k}], got {tuple(sh)}")
    if not contig:
        raise ValueError("x must be C-contiguous")
    batch = int(np.prod(sh[:-1], dtype=np.int64)) if len(sh) > 1 else 1
    out_shape = tuple(sh[:-1]) + (n,)
    if torch is not None and isinstance(x, torch.Tensor):
        y = torch.empty(out_shape, dtype=torch.float32)
        yptr = y.data_ptr()
    else:
        y = np.empty(out_shape, dtype=np.float32)
        yptr = y.ctypes.data
    bptr = ffi.NULL
    if bias is not None:
        bptr = ffi.cast("const float *", _check(bias, "bias", ("float32",), (n,)))
    return batch, ffi.cast("const float *", ptr), bptr, y, ffi.cast("float *", yptr)


def _threads(threads: int | None) -> int:
    if threads is None:
        return 0
    if not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return int(threads)


def vq_linear(x: Any, indices: Any, codebook: Any, codebook_scale: Any, *, n: int, k: int, d: int,
              rows_per_block: int, cols_per_block: int, bias: Any = None, act_int8: bool = False,
              threads: int | None = None, path: str | None = None) -> Any:
    """y = x @ W.T + bias for a VQ weight W [n, k] (format in the module docstring).

    x: float32 [..., k]; returns float32 [..., n] (torch if x is a tensor, else numpy). bias: float32 [n] or None.
    act_int8: int8 activations per codebook column block + integer dot products (fast mode).
    threads: None = global setting. path: force an implementation path for this call (None = active path).
    Only cheap checks here; run :func:`validate_vq` once when the weight is loaded."""
    w = _vq_struct(indices, codebook, codebook_scale, n, k, d, rows_per_block, cols_per_block)
    batch, xp, bp, y, yp = _prep_x(x, k, n, bias)
    p = -1 if path is None else _path_id(path)
    rc = lib.vqm_vq_linear_path(p, w, xp, batch, bp, yp, 1 if act_int8 else 0, _threads(threads))
    if rc != 0:
        raise ValueError(f"vq_linear failed: {_ERRORS.get(rc, rc)}")
    return y


def cvq_linear(x: Any, indices: Any, codebook: Any, codebook_scale: Any, col_scale: Any, perm: Any,
               res_indices: Any = None, res_codebook: Any = None, res_scale: Any = None, *, n: int, k: int, v: int,
               outlier_cols: int, cols_per_group: int, bias: Any = None, act_int8: bool = False,
               threads: int | None = None, path: str | None = None) -> Any:
    """y = x @ W.T + bias for a column-vector VQ (VPTQ) weight W [n, k] (formats/cvqweight.py); the residual stage's
    three arrays are given together or not at all. Same conventions as :func:`vq_linear`; act_int8 quantizes the
    permuted, column-scaled activations per block of at most 256 columns of a codebook group."""
    w = _cvq_struct(indices, codebook, codebook_scale, col_scale, perm, res_indices, res_codebook, res_scale, n, k, v,
                    outlier_cols, cols_per_group)
    batch, xp, bp, y, yp = _prep_x(x, k, n, bias)
    p = -1 if path is None else _path_id(path)
    rc = lib.vqm_cvq_linear_path(p, w, xp, batch, bp, yp, 1 if act_int8 else 0, _threads(threads))
    if rc != 0:
        raise ValueError(f"cvq_linear failed: {_ERRORS.get(rc, rc)}")
    return y


def int_linear(x: Any, codes: Any, scales: Any, zeros: Any, *, n: int, k: int, bits: int, group: int,
               bias: Any = None, act_int8: bool = False, threads: int | None = None,
               path: str | None = None) -> Any:
    """y = x @ W.T + bias for a group-wise integer weight W [n, k] (zeros=None: symmetric, zero 2**(bits-1)).

    Same conventions as :func:`vq_linear`; act_int8 quantizes x per group. SIMD kernels cover bits=4; other
    widths run the reference."""
    w = _int_struct(codes, scales, zeros, n, k, bits, group)
    batch, xp, bp, y, yp = _prep_x(x, k, n, bias)
    p = -1 if path is None else _path_id(path)
    rc = lib.vqm_int_linear_path(p, w, xp, batch, bp, yp, 1 if act_int8 else 0, _threads(threads))
    if rc != 0:
        raise ValueError(f"int_linear failed: {_ERRORS.get(rc, rc)}")
    return y


def nearest(x: "torch.Tensor", w: "torch.Tensor", centroids: "torch.Tensor", *, threads: int | None = None,
            path: str | None = None) -> "torch.Tensor":
    """GPTVQ's assignment step: for B problems, the index of the nearest centroid of each vector under the
    per-component weighted squared distance sum_t w_t (x_t - c_t)^2 (first index among equal minima).

    x [B, M, d] float32, w broadcastable to [B, M, d], centroids [B, k, d] (d <= 8, k <= 65536) -> int64 [B, M].
    Every path returns the reference's exact indices (same float operations per distance)."""
    b, m, d = x.shape
    k = centroids.shape[1]
    if centroids.shape != (b, k, d):
        raise ValueError(f"centroids must have shape [{b}, k, {d}], got {tuple(centroids.shape)}")
    x = x.to(torch.float32).contiguous()
    w = w.to(torch.float32).expand(b, m, d).contiguous()
    c = centroids.to(torch.float32).contiguous()
    out = torch.empty(b, m, dtype=torch.int64)
    p = -1 if path is None else _path_id(path)
    rc = lib.vqm_nearest_path(p, ffi.cast("const float *", x.data_ptr()), ffi.cast("const float *", w.data_ptr()),
                              ffi.cast("const float *", c.data_ptr()), b, m, d, k,
                              ffi.cast("int64_t *", out.data_ptr()), _threads(threads))
    if rc != 0:
        raise ValueError(f"nearest failed ({_ERRORS.get(rc, rc)}): B={b} M={m} d={d} k={k}")
    return out


def _e8p_struct(codes, scales, n, k):
    for nm, v in (("n", n), ("k", k)):
        if not isinstance(v, (int, np.integer)) or v < 1 or v >= 2**31:
            raise ValueError(f"{nm} must be a positive int < 2**31, got {v!r}")
    _, cs, _, _ = _info(codes, "codes")
    if len(cs) != 3 or cs[1] not in (2, 3, 4):
        raise ValueError(f"codes must be uint8 [n, bits (2..4), ceil(k/8)], got shape {tuple(cs)}")
    bits = int(cs[1])
    p_c = _check(codes, "codes", ("uint8",), (n, bits, _cdiv(k, 8)))
    p_s = _check(scales, "scales", ("float32",), (1 if bits == 2 else 2,))
    w = ffi.new("vqm_e8p_weight *")
    w.n, w.k, w.bits = int(n), int(k), bits
    w.codes = ffi.cast("const uint8_t *", p_c)
    w.scales = ffi.cast("const float *", p_s)
    return w


def e8p_linear(x: Any, codes: Any, scales: Any, *, n: int, k: int, bias: Any = None, act_int8: bool = False,
               threads: int | None = None, path: str | None = None) -> Any:
    """y = x @ W.T + bias for an E8P weight W [n, k] (QuIP#; vqmobile/formats/e8p.py): codes uint8
    [n, bits, ceil(k/8)], scales float32 [stages]. act_int8: int8 activations per 256 columns. Every byte is a
    valid code, so there is nothing to validate beyond the shapes."""
    w = _e8p_struct(codes, scales, n, k)
    batch, xp, bp, y, yp = _prep_x(x, k, n, bias)
    p = -1 if path is None else _path_id(path)
    rc = lib.vqm_e8p_linear_path(p, w, xp, batch, bp, yp, 1 if act_int8 else 0, _threads(threads))
    if rc != 0:
        raise ValueError(f"e8p_linear failed: {_ERRORS.get(rc, rc)}")
    return y


def hadamard(x: Any, signs: Any, had: Any, *, m: int, p: int, transpose: bool = False,
             path: str | None = None) -> Any:
    """One block of the random Hadamard transform along the last dimension of x float32 [..., m*p]: H (s * x), or
    s * (H^T x) with transpose (native/include/vqmobile.h). signs uint8 [ceil(m p / 8)], had int8 [m, m]."""
    dt, sh, contig, ptr = _info(x, "x")
    n = int(m) * int(p)
    if dt != "float32" or not sh or sh[-1] != n or not contig:
        raise ValueError(f"x must be C-contiguous float32 [..., {n}], got {dt} {tuple(sh)}")
    p_s = _check(signs, "signs", ("uint8",), (_cdiv(n, 8),))
    p_h = _check(had, "had", ("int8",), (m, m))
    batch = int(np.prod(sh[:-1], dtype=np.int64)) if len(sh) > 1 else 1
    if torch is not None and isinstance(x, torch.Tensor):
        y = torch.empty(tuple(sh), dtype=torch.float32)
        yptr = y.data_ptr()
    else:
        y = np.empty(tuple(sh), dtype=np.float32)
        yptr = y.ctypes.data
    pid = -1 if path is None else _path_id(path)
    rc = lib.vqm_hadamard_path(pid, ffi.cast("const float *", ptr), ffi.cast("float *", yptr), batch, int(m), int(p),
                               ffi.cast("const int8_t *", p_h), ffi.cast("const uint8_t *", p_s),
                               1 if transpose else 0)
    if rc != 0:
        raise ValueError(f"hadamard failed ({_ERRORS.get(rc, rc)}): m={m} p={p}")
    return y


def e8p_tables() -> tuple[np.ndarray, np.ndarray]:
    """The kernels' decode tables: (A4 int8 [256, 8], 2x E81B int8 [256, 8])."""
    a = np.empty((256, 8), np.int8)
    e = np.empty((256, 8), np.int8)
    lib.vqm_e8p_tables(ffi.cast("int8_t *", a.ctypes.data), ffi.cast("int8_t *", e.ctypes.data))
    return a, e


def _path_id(name: str) -> int:
    if name not in _PATHS:
        raise ValueError(f"unknown kernel path {name!r}; known: {sorted(_PATHS)}")
    if not lib.vqm_path_available(_PATHS[name]):
        raise ValueError(f"kernel path {name!r} is not available on this CPU (available: {available_paths()})")
    return _PATHS[name]


def has_kernel(path: str, *, vq: dict | None = None, int_: dict | None = None, e8p_bits: int | None = None,
               cvq: dict | None = None) -> bool:
    """Whether ``path`` has a specialised kernel for a configuration (else it runs the reference).

    vq: dict(d=, ncent=, rows_per_block=, cols_per_block=); int_: dict(bits=, group=); e8p_bits: 2, 3 or 4;
    cvq: dict(v=, ncent=)."""
    pid = _path_id(path)
    if e8p_bits is not None:
        w = ffi.new("vqm_e8p_weight *")
        w.n, w.k, w.bits = 1, 256, int(e8p_bits)
        dummy = ffi.new("uint8_t[4]")
        w.codes, w.scales = dummy, ffi.cast("float *", dummy)
        return bool(lib.vqm_e8p_path_has_kernel(pid, w))
    if cvq is not None:
        w = ffi.new("vqm_cvq_weight *")
        w.n, w.k, w.v, w.ncent, w.cols_per_group = 1, 1, cvq["v"], cvq["ncent"], 1
        dummy = ffi.new("uint8_t[2]")
        w.indices, w.codebook, w.scale = dummy, ffi.cast("int8_t *", dummy), ffi.cast("uint16_t *", dummy)
        w.col_scale, w.perm = ffi.cast("uint16_t *", dummy), ffi.cast("int16_t *", dummy)
        return bool(lib.vqm_cvq_path_has_kernel(pid, w))
    if vq is not None:
        w = ffi.new("vqm_vq_weight *")
        w.n, w.k, w.d, w.ncent = 1, vq["cols_per_block"], vq["d"], vq["ncent"]
        w.rows_per_block, w.cols_per_block = vq["rows_per_block"], vq["cols_per_block"]
        dummy = ffi.new("uint8_t[1]")
        w.indices, w.codebook, w.scale = dummy, ffi.cast("int8_t *", dummy), ffi.cast("uint16_t *", dummy)
        return bool(lib.vqm_vq_path_has_kernel(pid, w))
    if int_ is not None:
        w = ffi.new("vqm_int_weight *")
        w.n, w.k, w.bits, w.group = 1, int_["group"], int_["bits"], int_["group"]
        dummy = ffi.new("uint8_t[1]")
        w.codes, w.scales, w.zeros = dummy, ffi.cast("uint16_t *", dummy), ffi.NULL
        return bool(lib.vqm_int_path_has_kernel(pid, w))
    raise ValueError("pass vq=... or int_=...")


# ---------------------------------------------------------------------------------------------- references
def _np(a: Any) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _f16(a: Any) -> np.ndarray:
    a = _np(a)
    if a.dtype != np.float16:
        a = a.view(np.float16)
    return a.astype(np.float32)


def unpack_codes(packed: Any, count: int, bits: int) -> np.ndarray:
    """Unpack a [rows, bytes] little-endian bitstream into [rows, count] int codes (numpy)."""
    p = _np(packed).astype(np.uint8)
    bitsarr = np.unpackbits(p, axis=1, bitorder="little")[:, : count * bits]
    bitsarr = bitsarr.reshape(p.shape[0], count, bits).astype(np.int64)
    return (bitsarr << np.arange(bits, dtype=np.int64)).sum(axis=2)


def dequantize_vq(indices: Any, codebook: Any, codebook_scale: Any, *, n: int, k: int, d: int,
                  rows_per_block: int, cols_per_block: int) -> np.ndarray:
    """Reference decode of a VQ weight to float64 [n, k] (numpy; independent of the C code)."""
    cb = _np(codebook).astype(np.float64)
    ncent = cb.shape[2]
    v = _cdiv(k, d)
    idx = unpack_codes(indices, v, vq_index_bits(ncent))
    if idx.max(initial=0) >= ncent:
        raise ValueError("VQ index out of range")
    sc = _f16(codebook_scale).astype(np.float64)
    cols = np.arange(k)
    rows = np.arange(n)
    rb = (rows // rows_per_block)[:, None]
    cbi = (cols // cols_per_block)[None, :]
    j = cols // d
    t = (cols % d)[None, :]
    return cb[rb, cbi, idx[:, j], t] * sc[rb, cbi]


def dequantize_int(codes: Any, scales: Any, zeros: Any, *, n: int, k: int, bits: int, group: int) -> np.ndarray:
    """Reference decode of a group-wise integer weight to float64 [n, k] (numpy)."""
    q = unpack_codes(codes, k, bits).astype(np.float64)
    g = np.arange(k) // group
    s = _f16(scales).astype(np.float64)[:, g]
    z = (_np(zeros).astype(np.float64)[:, g] if zeros is not None else float(1 << (bits - 1)))
    return (q - z) * s


def quantize_act(x: Any, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The int8 activation quantization of ``act_int8`` for one row x [k] (numpy float32):
    returns (q int8 [k], scales float32 [ceil(k/block)]) computed by the C library."""
    xa = np.ascontiguousarray(_np(x), dtype=np.float32).reshape(-1)
    q = np.empty(xa.shape[0], dtype=np.int8)
    s = np.empty(_cdiv(xa.shape[0], block), dtype=np.float32)
    lib.vqm_quantize_act(ffi.cast("const float *", xa.ctypes.data), xa.shape[0], block,
                         ffi.cast("int8_t *", q.ctypes.data), ffi.cast("float *", s.ctypes.data))
    return q, s


def stream_read(buf: np.ndarray, threads: int = 1) -> int:
    """Read a whole (8-byte aligned) buffer as fast as possible, split over threads; returns a checksum.
    Used to measure streaming memory bandwidth."""
    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous or buf.ctypes.data % 8:
        raise ValueError("buf must be a C-contiguous, 8-byte aligned numpy array")
    return int(lib.vqm_stream_read(ffi.cast("const void *", buf.ctypes.data), buf.nbytes, int(threads)))


def attention(q: "torch.Tensor", k_cache: "torch.Tensor", v_cache: "torch.Tensor", pos: int, scale: float,
              window: int = 0, *, threads: int | None = None) -> "torch.Tensor":
    """Attention of queries q [t, heads, d] at positions pos .. pos+t-1 over a static KV cache, k_cache
    [kv_heads, d, max_seq] (keys transposed) and v_cache [kv_heads, max_seq, d], both float32 or both float16,
    reading only the positions each query sees (window > 0: the last `window`); float32 [t, heads, d]. See
    vqm_attention and vqm_attention_f16 in native/include/vqmobile.h."""
    t, heads, d = q.shape
    kv_heads, dk, max_seq = k_cache.shape
    if dk != d or tuple(v_cache.shape) != (kv_heads, max_seq, d):
        raise ValueError(f"attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit q "
                         f"{tuple(q.shape)}")
    q = q.to(torch.float32).contiguous()
    kc = _check(k_cache, "k_cache", ("float32", "float16"), None)
    kdt = _info(k_cache, "k_cache")[0]
    vc = _check(v_cache, "v_cache", (kdt,), None)
    out = torch.empty_like(q)
    run, elem = (lib.vqm_attention, "const float *") if kdt == "float32" else (lib.vqm_attention_f16,
                                                                               "const uint16_t *")
    rc = run(ffi.cast("const float *", q.data_ptr()), ffi.cast(elem, kc), ffi.cast(elem, vc), heads, kv_heads, t, d,
             max_seq, int(pos), float(scale), int(window), ffi.cast("float *", out.data_ptr()), _threads(threads))
    if rc != 0:
        raise ValueError(f"attention failed ({_ERRORS.get(rc, rc)}): heads={heads} kv_heads={kv_heads} t={t} "
                         f"pos={pos} max_seq={max_seq}")
    return out


def rms_norm(x: "torch.Tensor", weight: "torch.Tensor", eps: float, offset: float = 0.0,
             residual: "torch.Tensor | None" = None):
    """RMSNorm over the last dimension of float32 x: (x * rsqrt(mean(x^2) + eps)) * (offset + weight). With a
    residual: (x + residual, the norm of that sum). See vqm_rms_norm and vqm_add_rms_norm in
    native/include/vqmobile.h."""
    d = x.shape[-1]
    x = x.to(torch.float32).contiguous()
    w = _check(weight, "weight", ("float32",), (d,))
    out = torch.empty_like(x)
    args = (x.numel() // d, d, float(eps), float(offset))
    if residual is None:
        rc = lib.vqm_rms_norm(ffi.cast("const float *", x.data_ptr()), ffi.cast("const float *", w), *args,
                              ffi.cast("float *", out.data_ptr()))
    else:
        residual = residual.to(torch.float32).contiguous()
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
        total = torch.empty_like(x)
        rc = lib.vqm_add_rms_norm(ffi.cast("const float *", x.data_ptr()), ffi.cast("const float *",
                                  residual.data_ptr()), ffi.cast("const float *", w), *args,
                                  ffi.cast("float *", total.data_ptr()), ffi.cast("float *", out.data_ptr()))
    if rc != 0:
        raise ValueError(f"rms_norm failed ({_ERRORS.get(rc, rc)}): x {tuple(x.shape)}")
    return out if residual is None else (total, out)


def rope(x: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor") -> "torch.Tensor":
    """Rotary position embedding (rotate-half) of x float32 [t, heads, d] with cos and sin [t, rot] (any leading
    dimensions of size 1), returned in x's layout. See vqm_rope in native/include/vqmobile.h."""
    t, heads, d = x.shape
    rot = cos.shape[-1]
    x = x.to(torch.float32).contiguous()
    cos, sin = cos.reshape(t, rot).contiguous(), sin.reshape(t, rot).contiguous()  # held until the call returns
    c, s = _check(cos, "cos", ("float32",), (t, rot)), _check(sin, "sin", ("float32",), (t, rot))
    out = torch.empty_like(x)
    rc = lib.vqm_rope(ffi.cast("const float *", x.data_ptr()), ffi.cast("const float *", c),
                      ffi.cast("const float *", s), t, heads, d, rot, ffi.cast("float *", out.data_ptr()))
    if rc != 0:
        raise ValueError(f"rope failed ({_ERRORS.get(rc, rc)}): x {tuple(x.shape)}, rotary dim {rot}")
    return out


def silu_mul(x: "torch.Tensor") -> "torch.Tensor":
    """silu(gate) * up of float32 x [..., 2n] holding [gate | up] side by side (a stacked gate/up projection's
    output): float32 [..., n]. See vqm_silu_mul in native/include/vqmobile.h."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_mul: x has {x.shape[-1]} features, not [gate | up] of equal halves")
    n = x.shape[-1] // 2
    x = x.to(torch.float32).contiguous()
    out = x.new_empty((*x.shape[:-1], n))
    rc = lib.vqm_silu_mul(ffi.cast("const float *", x.data_ptr()), x.numel() // (2 * n) if n else 0, n,
                          ffi.cast("float *", out.data_ptr()))
    if rc != 0:
        raise ValueError(f"silu_mul failed ({_ERRORS.get(rc, rc)}): x {tuple(x.shape)}")
    return out


def kv_write(k: "torch.Tensor", v: "torch.Tensor", k_cache: "torch.Tensor", v_cache: "torch.Tensor", pos: int) -> None:
    """Write the new keys and values k, v [t, kv_heads, d] into k_cache [kv_heads, d, max_seq] and v_cache [kv_heads,
    max_seq, d] (both float32 or both float16, C-contiguous; changed in place) at positions pos .. pos+t-1. See
    vqm_kv_write in native/include/vqmobile.h."""
    t, kv_heads, d = k.shape
    max_seq = k_cache.shape[2]
    if tuple(v.shape) != (t, kv_heads, d) or tuple(k_cache.shape) != (kv_heads, d, max_seq) or \
            tuple(v_cache.shape) != (kv_heads, max_seq, d):
        raise ValueError(f"kv_write: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit the caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    kc = _check(k_cache, "k_cache", ("float32", "float16"), None)
    kdt = _info(k_cache, "k_cache")[0]
    vc = _check(v_cache, "v_cache", (kdt,), None)
    k, v = k.to(torch.float32).contiguous(), v.to(torch.float32).contiguous()
    rc = lib.vqm_kv_write(ffi.cast("const float *", k.data_ptr()), ffi.cast("const float *", v.data_ptr()),
                          ffi.cast("void *", kc), ffi.cast("void *", vc), int(kdt == "float16"), kv_heads, t, d,
                          max_seq, int(pos))
    if rc != 0:
        raise ValueError(f"kv_write failed ({_ERRORS.get(rc, rc)}): t={t} pos={pos} max_seq={max_seq}")
