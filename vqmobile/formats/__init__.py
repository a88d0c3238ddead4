"""Stored weight formats: what a quantizer produces, the checkpoint stores and an operator runs.

Importing this package registers every format's kind, so a checkpoint can be loaded whatever its layers hold.
"""

from . import cvqweight, e8p, incoherent, intweight, vqweight  # noqa: F401  (each registers its kind)
from .base import QuantizedWeight, expect_tensor, register_format, weight_from_stored

__all__ = ["QuantizedWeight", "expect_tensor", "register_format", "weight_from_stored"]
