"""QuantLinear, the torch module that runs a stored quantized weight in place of nn.Linear, and the activation mode
(float or int8 per block) its operator computes with."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import UserError
from .formats.base import QuantizedWeight
from .ops import op_forward


class QuantLinear(nn.Module):
    """Drop-in replacement for nn.Linear whose weight lives in a QuantizedWeight. `act_int8` (an execution
    setting, not part of the stored weight; see set_activations) selects int8 activations."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.act_int8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The format's vqmobile operator (vqmobile/ops/): the one definition that eager PyTorch, export and the
        # runtimes share.
        return op_forward(self.qweight, x, self.bias, self.act_int8)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={self.qweight.kind}, "
            f"bpw={self.qweight.bits_per_weight():.3f}{', act_int8' if self.act_int8 else ''}"
        )


ACTIVATIONS = ("float", "int8")


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise UserError(f"--activations {activations} is not supported: use {' or '.join(ACTIVATIONS)}")


def set_activations(model: nn.Module, activations: str) -> nn.Module:
    """Run every quantized linear of `model` with float or int8 activations (ops.quantize_activations); returns
    the model. int8 is the kernels' fast mode (integer dot products); float is the exact product."""
    check_activations(activations)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.act_int8 = activations == "int8"
    return model


@contextlib.contextmanager
def activations_set(model: nn.Module, activations: str) -> Iterator[nn.Module]:
    """set_activations for the duration of the block; every layer gets its own setting back afterwards."""
    saved = {mod: mod.act_int8 for mod in model.modules() if isinstance(mod, QuantLinear)}
    try:
        yield set_activations(model, activations)
    finally:
        for mod, act_int8 in saved.items():
            mod.act_int8 = act_int8
