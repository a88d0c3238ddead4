"""The base class every quantization method's configuration derives from.

A config is a dataclass of user-facing options plus the one function that turns a float weight (and, for
Hessian-aware methods, its layer's Hessian) into a QuantizedWeight. The layer-wise pipeline only sees this interface:
it calls quantize(), which adds the options every method shares (incoherence processing) around quantize_weight().
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..errors import UserError
from ..formats.base import QuantizedWeight
from . import incoherence as incoh

# The token embedding (and a head tied to it): int8 or int4 groups of 32, GPTVQ's mobile VQ (vqmobile/embedding.py), or
# float as loaded.
EMBEDDINGS = ("int8", "int4", "vq", "float")
# Fine-tuning after quantization (vqmobile/finetune.py): per decoder layer, of the whole model, both, or none.
FINETUNE = ("none", "layer", "model", "layer+model")


@dataclasses.dataclass
class QuantConfig(ABC):
    """Options common to every method: `embedding` is one of EMBEDDINGS, `incoherence` one of incoherence.MODES
    (hadamard: quantize U W V^T against V H V^T and store the random Hadamard transforms with the result), `finetune`
    one of FINETUNE."""

    method: ClassVar[str]
    needs_hessian: ClassVar[bool] = True

    embedding: str = "int8"
    incoherence: str = "none"
    finetune: str = "none"
    finetune_lr: float = 1e-2  # Adam's step size relative to each parameter tensor's RMS
    finetune_epochs: int = 2  # passes over the finetune_samples sequences
    finetune_samples: int = 32  # calibration sequences the fine-tuning trains on (0 = all)
    # The model stage's own settings (None: the ones above). Its KL on the logits wants more sequences seen fewer
    # times than the layer stage's output error, and a smaller step where codebooks shared by many weights move.
    finetune_model_lr: float | None = None
    finetune_model_epochs: int | None = None
    finetune_model_samples: int | None = None

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise UserError(f"--embedding {self.embedding} is not supported: use {' or '.join(EMBEDDINGS)}")
        if self.incoherence not in incoh.MODES:
            raise UserError(f"--incoherence {self.incoherence} is not supported: use {' or '.join(incoh.MODES)}")
        if self.finetune not in FINETUNE:
            raise UserError(f"--finetune {self.finetune} is not supported: use one of {', '.join(FINETUNE)}")
        for stage, (lr, epochs, samples) in (("", self.layer_stage()), ("-model", self.model_stage())):
            if not (lr > 0 and epochs >= 1 and samples >= 0):
                raise UserError(f"fine-tuning needs --finetune{stage}-lr > 0, --finetune{stage}-epochs >= 1 and "
                                f"--finetune{stage}-samples >= 0 (got {lr}, {epochs}, {samples})")
        self.check()

    def layer_stage(self) -> tuple[float, int, int]:
        """The layer stage's (lr, epochs, samples)."""
        return self.finetune_lr, self.finetune_epochs, self.finetune_samples

    def model_stage(self) -> tuple[float, int, int]:
        """The model stage's (lr, epochs, samples): its own where given, else the layer stage's."""
        return tuple(own if own is not None else shared for own, shared in
                     zip((self.finetune_model_lr, self.finetune_model_epochs, self.finetune_model_samples),
                         self.layer_stage()))

    def check(self) -> None:
        """Validate the options on their own; raise UserError naming the bad option and the valid range."""

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        """Validate the options against one layer's shape before any work starts; raise UserError if they cannot fit."""

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None, *, key: str = "",
                 input_key: str | None = None) -> QuantizedWeight:
        """Quantize one layer with this method and the shared options. key names the layer (it seeds the output
        signs of incoherence processing); layers that read the same input pass the same input_key (default: key)."""
        if self.incoherence == "hadamard":
            return incoh.quantize_incoherent(self.quantize_weight, weight, hessian, f"in:{input_key or key}",
                                             f"out:{key}")
        return self.quantize_weight(weight, hessian)

    def quantize_readers(self, weights: list[torch.Tensor], hessian: torch.Tensor | None, keys: list[str]
                         ) -> list[QuantizedWeight]:
        """Quantize the linears that read one input (q/k/v, gate/up: one Hessian), keys[0] naming that input. Each
        alone here; a method that shares parameters between them (VPTQ's `shared="input"`) overrides this."""
        return [self.quantize(w, hessian, key=k, input_key=keys[0]) for w, k in zip(weights, keys)]

    @abstractmethod
    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> QuantizedWeight:
        """Quantize a float32 weight [out, in]; hessian is 2 X^T X [in, in] from calibration inputs, or None."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}
