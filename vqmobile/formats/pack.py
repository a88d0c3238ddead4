"""Bit packing of quantization codes: one little-endian bitstream per row, padded to whole bytes.

Code i of a row occupies bits [i*b, (i+1)*b) counting from bit 0 of the row's first byte, b in 1..16. This is the
layout the checkpoint stores and the native kernels read directly (for b=4: low nibble first; b=8: one byte per code;
b=16: one little-endian uint16 per code).
"""

from __future__ import annotations

import numpy as np
import torch

MAX_BITS = 16


def row_bytes(ncodes: int, bits: int) -> int:
    return (ncodes * bits + 7) // 8


def _code_bytes(bits: int) -> int:
    return 1 if bits <= 8 else 2


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack an integer tensor [rows, ncodes] with values in [0, 2**bits) into uint8 [rows, row_bytes]."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    c = codes.detach().cpu().numpy()
    if c.size and (int(c.max()) >= (1 << bits) or int(c.min()) < 0):
        raise ValueError(f"code {int(c.max())} does not fit in {bits} bits")
    rows, n = c.shape
    nb = _code_bytes(bits)
    # Each code as its little-endian bytes, expanded into bits (LSB first), then the row's bitstream regrouped.
    c = c.astype("<u2" if nb == 2 else np.uint8, copy=False).view(np.uint8).reshape(rows, n, nb)
    bitplanes = np.unpackbits(c, axis=2, bitorder="little")[:, :, :bits].reshape(rows, n * bits)
    packed = np.packbits(bitplanes, axis=1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(packed))


def gather_codes(packed: torch.Tensor, bits: int, ncodes: int) -> torch.Tensor:
    """uint8 [..., row_bytes] rows (already gathered) -> int32 [..., ncodes] codes of at most 8 bits, with
    integer arithmetic only (no shifts or bitwise ops), so a model that decodes rows in its forward exports to
    ExecuTorch's portable operators and to ONNX as is. A code of b <= 8 bits spans at most two bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"gather_codes unpacks codes of 1..8 bits, got {bits}")
    q = packed.to(torch.int32)
    if bits == 8:
        return q[..., :ncodes]
    first = torch.arange(ncodes) * bits
    byte, shift = torch.div(first, 8, rounding_mode="floor"), torch.remainder(first, 8)
    q = torch.nn.functional.pad(q, (0, 1))  # the byte after the last: a code ending the row reads a zero
    word = q[..., byte] + q[..., byte + 1] * 256
    v = torch.div(word, (2 ** shift).to(torch.int32), rounding_mode="floor")
    return v - torch.div(v, 1 << bits, rounding_mode="floor") * (1 << bits)


def unpack_rows(packed: torch.Tensor, bits: int, ncodes: int) -> torch.Tensor:
    """Inverse of pack_rows: uint8 [rows, row_bytes] -> int64 [rows, ncodes]."""
    p = packed.detach().cpu().numpy()
    rows = p.shape[0]
    if p.shape[1] != row_bytes(ncodes, bits):
        raise ValueError(f"packed rows have {p.shape[1]} bytes, expected {row_bytes(ncodes, bits)}")
    nb = _code_bytes(bits)
    # Regroup each code's bits into bytes of its own and let packbits assemble them: uint8 all the way, so
    # unpacking the 28M-code SmolLM2 embedding costs a few hundred MB, not the 4 GB of an int64 bit matrix.
    bitstream = np.unpackbits(p, axis=1, bitorder="little")[:, : ncodes * bits].reshape(rows, ncodes, bits)
    if bits < 8 * nb:
        bitstream = np.concatenate([bitstream, np.zeros((rows, ncodes, 8 * nb - bits), np.uint8)], axis=2)
    codes = np.packbits(bitstream, axis=2, bitorder="little").reshape(rows, ncodes * nb)
    if nb == 2:
        codes = codes.view("<u2")
    return torch.from_numpy(codes.reshape(rows, ncodes).astype(np.int64))
