"""The quantized-weight interface every stored format implements, and the registry the checkpoint loads kinds from.

A format (integer groups, VQ codebooks, ...) subclasses QuantizedWeight: it knows how to dequantize itself, which
tensors it stores and how to rebuild and validate itself from them. The checkpoint code only talks to this interface,
so a new method adds a format module without touching the pipeline or the file layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch

from ..errors import FormatError

_FORMATS: dict[str, type["QuantizedWeight"]] = {}


def register_format(cls: type["QuantizedWeight"]) -> type["QuantizedWeight"]:
    _FORMATS[cls.kind] = cls
    return cls


def weight_from_stored(kind: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
    if kind not in _FORMATS:
        raise FormatError(f"unknown quantized weight kind '{kind}' (known: {', '.join(sorted(_FORMATS))})")
    return _FORMATS[kind].from_stored(spec, tensors)


@dataclass
class Trainable:
    """A weight's continuous parameters (codebook entries, scales) as float32 tensors, and the weight as a
    differentiable function of them with every discrete part (codes, indices) fixed: what fine-tuning optimizes."""

    params: dict[str, torch.Tensor]
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    # parameter name -> a key: the parameters of several weights under one key are one tensor (a codebook the
    # linears reading one input share), tuned once. Parameters not named are this weight's own.
    tied: dict[str, Any] = field(default_factory=dict)


class QuantizedWeight(ABC):
    kind: ClassVar[str]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the original weight."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] this format represents."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the checkpoint stores for this weight, in its stored dtypes."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serializable configuration needed to interpret tensors()."""

    @classmethod
    @abstractmethod
    def from_stored(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Rebuild from a checkpoint, validating every shape, dtype and code range (files are untrusted)."""

    def trainable(self) -> Trainable | None:
        """The continuous parameters as fresh float32 copies and the differentiable decode (vqmobile/finetune.py);
        None when this weight has nothing continuous to tune."""
        return None

    def load_trainable(self, params: dict[str, torch.Tensor]) -> None:
        """Store tuned `params` (trainable()'s keys) rounded to this format's stored dtypes: the stored layout does not
        change, so the kernels, checkpoints and exporters keep working."""
        self._store_trainable({k: v.detach().float() for k, v in params.items()})
        self.__dict__.pop("_dense", None)  # ops.dense_weight's copy of the old weight

    def _store_trainable(self, params: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no trainable parameters")

    @classmethod
    def stack_rows(cls, parts: list["QuantizedWeight"]) -> "QuantizedWeight | None":
        """One weight whose rows are those of `parts` in order, each row decoding exactly as it did, or None where
        this format cannot join them. Linears that read the same input (q/k/v, gate/up) then run as one call."""
        return None

    def shared_tensors(self) -> dict[str, str]:
        """Tensor name -> the name of a set of weights that all hold this very tensor (a codebook the linears reading
        one input share): stored once for the set. Empty: every tensor is this weight's own."""
        return {}

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        n, k = self.shape
        return 8 * self.stored_bytes() / (n * k)


def distinct_bytes(weights: Iterable["QuantizedWeight"]) -> int:
    """Stored bytes of `weights` with a tensor several of them share (shared_tensors) counted once, as the
    checkpoint stores it."""
    seen: set[tuple[str, str]] = set()
    total = 0
    for w in weights:
        shared = w.shared_tensors()
        for name, t in w.tensors().items():
            key = (shared[name], name) if name in shared else None
            if key is None or key not in seen:
                total += t.numel() * t.element_size()
            if key is not None:
                seen.add(key)
    return total


def expect_tensor(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Fetch a stored tensor and check it has exactly the dtype and shape the spec implies."""
    if name not in tensors:
        raise FormatError(f"quantized weight is missing its '{name}' tensor")
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise FormatError(
            f"tensor '{name}' is {t.dtype} {tuple(t.shape)}, the manifest implies {dtype} {tuple(shape)}"
        )
    return t
