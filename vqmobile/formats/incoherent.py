"""Incoherent weights: any stored format wrapped in QuIP#'s random Hadamard transforms, kind "incoherent".

W (n x k) is stored as W' = U W V^T, quantized by any method, with U = H_n diag(s_out) and V = H_k diag(s_in) the
orthonormal random Hadamard transforms of vqmobile/hadamard.py. Running the layer undoes them around the inner product:

    y = W x = U^T (W' (V x)):   x~ = H_k (s_in * x),  y~ = W' x~,  y = s_out * (H_n^T y~)

Stored tensors: `in_signs` uint8 [ceil(k/8)] and `out_signs` uint8 [ceil(n/8)] (bit j of byte j // 8, LSB first, set =
negate; padding bits 0), then the inner weight's tensors prefixed "inner.". The spec holds both block plans and the
inner weight's kind and spec. Bits per weight count the signs with the inner weight.

Fine-tuning (vqmobile/finetune.py) may add `out_gain` fp16 [n]: y = out_gain * (U^T W' V x). It is QuIP#'s tuned
sign vectors made continuous on the output side only: a gain on the input side is redundant with what is tuned
anyway (the RMSNorm before q/k/v and gate/up; v's output gains for o, up's for down), and would stop q, k and v
from sharing their input transform.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .. import hadamard
from ..errors import FormatError
from .base import QuantizedWeight, Trainable, expect_tensor, register_format, weight_from_stored
from .pack import pack_rows, row_bytes, unpack_rows

INNER = "inner."
GAIN = "out_gain"


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    return pack_rows(signs.to(torch.int64)[None], 1)[0]


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_rows(packed[None], 1, n)[0].bool()


# Equal constants are one tensor: layers that read the same input carry the same input signs, and sharing the object
# lets an exported graph compute that transform once (ops/incoherent.py). Weak values: nothing outlives its weights.
_INTERNED: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def _intern(t: torch.Tensor) -> torch.Tensor:
    key = (str(t.dtype), tuple(t.shape), t.numpy().tobytes())
    found = _INTERNED.get(key)
    if found is None:
        _INTERNED[key] = found = t
    return found


def _per_block(packed: torch.Tensor, n: int, blocks) -> list[torch.Tensor]:
    if len(blocks) == 1:
        return [_intern(packed)]
    signs, out, off = unpack_signs(packed, n), [], 0
    for m, p in blocks:
        out.append(_intern(pack_signs(signs[off:off + m * p])))
        off += m * p
    return out


@register_format
class IncoherentWeight(QuantizedWeight):
    kind = "incoherent"

    def __init__(self, inner: QuantizedWeight, in_signs: torch.Tensor, out_signs: torch.Tensor,
                 in_blocks=None, out_blocks=None, out_gain: torch.Tensor | None = None):
        """inner: the quantized W'; in_signs/out_signs: packed uint8 sign vectors; blocks default to the plan;
        out_gain: fp16 [n] or None (all ones)."""
        self.inner, self.out_gain = inner, out_gain
        n, k = inner.shape
        self.in_signs, self.out_signs = in_signs, out_signs
        self.in_blocks = hadamard.plan(k) if in_blocks is None else tuple(in_blocks)
        self.out_blocks = hadamard.plan(n) if out_blocks is None else tuple(out_blocks)
        # what an operator takes per block, made now (tracing cannot unpack bits): packed signs, H_m
        self.in_block_signs = _per_block(in_signs, k, self.in_blocks)
        self.out_block_signs = _per_block(out_signs, n, self.out_blocks)
        self.in_block_had = [_intern(hadamard.small(m)) for m, _ in self.in_blocks]
        self.out_block_had = [_intern(hadamard.small(m)) for m, _ in self.out_blocks]

    @classmethod
    def from_signs(cls, inner: QuantizedWeight, in_signs: torch.Tensor, out_signs: torch.Tensor) -> "IncoherentWeight":
        """in_signs/out_signs as bool vectors [k] / [n]."""
        return cls(inner, pack_signs(in_signs), pack_signs(out_signs))

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    def signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(in, out) as bool vectors."""
        n, k = self.shape
        return unpack_signs(self.in_signs, k), unpack_signs(self.out_signs, n)

    def dequantize(self) -> torch.Tensor:
        return self._unrotate(self.inner.dequantize(), self.gain())

    def _unrotate(self, inner: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
        s_in, s_out = self.signs()
        w = hadamard.transform(inner, self.in_blocks, s_in, transpose=True)  # W' V
        w = hadamard.transform(w.T, self.out_blocks, s_out, transpose=True).T  # U^T W' V
        return w if gain is None else w * gain[:, None]

    def gain(self) -> torch.Tensor | None:
        return None if self.out_gain is None else self.out_gain.float()

    def trainable(self) -> Trainable:
        """The output gains and the inner weight's parameters, decoded through the fixed transforms: tuning sees the
        weight the layer computes with, while the inner parameters stay in the rotated basis they are stored in."""
        inner = self.inner.trainable()
        fixed = self.inner.dequantize() if inner is None else None  # nothing inside to tune: decoded once
        gain = self.gain()
        params = {GAIN: torch.ones(self.shape[0]) if gain is None else gain}
        params.update({} if inner is None else inner.params)

        def decode(p: dict[str, torch.Tensor]) -> torch.Tensor:
            w = fixed if inner is None else inner.decode({k: v for k, v in p.items() if k != GAIN})
            return self._unrotate(w, p[GAIN])  # a gain of exactly 1 changes no bit

        return Trainable(params, decode)

    def _store_trainable(self, params: dict[str, torch.Tensor]) -> None:
        inner = {k: v for k, v in params.items() if k != GAIN}
        if inner:
            self.inner.load_trainable(inner)
        fp16_max = float(torch.finfo(torch.float16).max)
        gain = params[GAIN].clamp(-fp16_max, fp16_max).to(torch.float16).contiguous()
        self.out_gain = None if bool((gain == 1).all()) else gain  # untuned weights keep their size

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"in_signs": self.in_signs, "out_signs": self.out_signs}
        if self.out_gain is not None:
            out[GAIN] = self.out_gain
        out.update({INNER + name: t for name, t in self.inner.tensors().items()})
        return out

    def spec(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "in_blocks": [list(b) for b in self.in_blocks],
                "out_blocks": [list(b) for b in self.out_blocks], "inner_kind": self.inner.kind,
                "inner": self.inner.spec()}

    @classmethod
    def from_stored(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "IncoherentWeight":
        try:
            n, k = (int(v) for v in spec["shape"])
            inner_kind, inner_spec = str(spec["inner_kind"]), spec["inner"]
            in_blocks, out_blocks = list(spec["in_blocks"]), list(spec["out_blocks"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"incoherent weight spec is malformed ({e!r})") from None
        if inner_kind == cls.kind:
            raise FormatError("an incoherent weight cannot wrap another incoherent weight")
        if n < 1 or k < 1 or not isinstance(inner_spec, dict):
            raise FormatError(f"incoherent weight spec is out of range: shape={n}x{k}")
        try:
            in_blocks = hadamard.check_plan(k, in_blocks)
            out_blocks = hadamard.check_plan(n, out_blocks)
        except (TypeError, ValueError) as e:
            raise FormatError(f"incoherent weight spec: {e}") from None
        s_in = expect_tensor(tensors, "in_signs", torch.uint8, (row_bytes(k, 1),))
        s_out = expect_tensor(tensors, "out_signs", torch.uint8, (row_bytes(n, 1),))
        for name, t, width in (("in_signs", s_in, k), ("out_signs", s_out, n)):
            if width % 8 and int(t[-1]) >> (width % 8):
                raise FormatError(f"tensor '{name}' has bits set beyond its {width} signs")
        gain = None
        if GAIN in tensors:
            gain = expect_tensor(tensors, GAIN, torch.float16, (n,))
            if not bool(torch.isfinite(gain).all()):
                raise FormatError(f"tensor '{GAIN}' of an incoherent weight has non-finite values")
        extra = set(tensors) - {"in_signs", "out_signs", GAIN} - {t for t in tensors if t.startswith(INNER)}
        if extra:
            raise FormatError(f"incoherent weight has unexpected tensors: {', '.join(sorted(extra))}")
        inner = weight_from_stored(inner_kind, inner_spec,
                                   {t[len(INNER):]: v for t, v in tensors.items() if t.startswith(INNER)})
        if inner.shape != (n, k):
            raise FormatError(f"incoherent weight of shape {n}x{k} wraps an inner weight of shape {inner.shape}")
        return cls(inner, s_in, s_out, in_blocks, out_blocks, gain)
