"""Incoherence processing (QuIP#, Tseng et al. 2024), an option of every method: before a layer is quantized its weight
and Hessian are rotated by random Hadamard transforms, W' = U W V^T and H' = V H V^T (U = H_n S_n, V = H_k S_k, see
vqmobile/hadamard.py), which spreads outliers evenly over all entries; the method quantizes W' against H' (the layer's
loss tr((W - Q) H (W - Q)^T) is unchanged by the rotation) and the result is stored with its signs
(formats/incoherent.py), whose operator applies V to the input and U^T to the output at run time.

Linears that read the same input (q/k/v, gate/up) get the same input signs, as in QuIP#'s fused layers, so a runtime
can share their input transform.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch

from .. import hadamard
from ..formats.base import QuantizedWeight
from ..formats.incoherent import IncoherentWeight

MODES = ("none", "hadamard")


def signs_for(width: int, key: str) -> torch.Tensor:
    """A deterministic random sign vector (bool [width], True = negate) for a string key."""
    return hadamard.random_signs(width, torch.Generator().manual_seed(zlib.crc32(key.encode())))


def rotate_weight(w: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """U W V^T."""
    n, k = w.shape
    wv = hadamard.transform(w.double(), hadamard.plan(k), s_in)  # each row r -> V w_r, i.e. W V^T
    return hadamard.transform(wv.T, hadamard.plan(n), s_out).T.float()


def rotate_hessian(h: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """V H V^T (H symmetric), in float64 so the rotated Hessian stays symmetric to the last bit that matters."""
    blocks = hadamard.plan(h.shape[0])
    hv = hadamard.transform(h.double(), blocks, s_in)  # H V^T
    out = hadamard.transform(hv.T.contiguous(), blocks, s_in)  # V H V^T
    return (0.5 * (out + out.T)).float()


def quantize_incoherent(quantize: Callable[[torch.Tensor, torch.Tensor | None], QuantizedWeight], weight: torch.Tensor,
                        hessian: torch.Tensor | None, in_key: str, out_key: str) -> IncoherentWeight:
    """Rotate, quantize with `quantize(W', H')`, wrap. in_key/out_key seed the input and output signs."""
    n, k = weight.shape
    s_in, s_out = signs_for(k, in_key), signs_for(n, out_key)
    h = None
    if hessian is not None:
        h = hessian.clone()
        # An input no calibration token reached is exactly zero; rotated, that zero row would spread over every
        # column. Zero weights there first (what the column pass does to such columns anyway).
        dead = torch.diag(h) == 0
        if bool(dead.any()):
            weight = weight.clone()
            weight[:, dead] = 0.0
        h = rotate_hessian(h, s_in)
    inner = quantize(rotate_weight(weight, s_in, s_out), h)
    return IncoherentWeight.from_signs(inner, s_in, s_out)
