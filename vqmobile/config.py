"""The base class every quantization method's configuration derives from.

A config is a dataclass of user-facing options plus the one function that turns a float weight (and, for
Hessian-aware methods, its layer's Hessian) into a QuantizedWeight. The layer-wise pipeline only sees this interface.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .qweight import QuantizedWeight


@dataclasses.dataclass
class QuantConfig(ABC):
    method: ClassVar[str]
    needs_hessian: ClassVar[bool] = True

    # The token embedding (and a head tied to it): "int8" groups of 32 (embedding.py), or "float" as loaded.
    embedding: str = "int8"

    def __post_init__(self) -> None:
        from .embedding import check_embedding

        check_embedding(self.embedding)
        self.check()

    def check(self) -> None:
        """Validate the options on their own; raise UserError naming the bad option and the valid range."""

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        """Validate the options against one layer's shape before any work starts; raise UserError if they cannot fit."""

    @abstractmethod
    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> QuantizedWeight:
        """Quantize a float32 weight [out, in]; hessian is 2 X^T X [in, in] from calibration inputs, or None."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}
