"""VPTQ (Liu et al., 2024): column-vector quantization with codebooks from a Hessian-weighted k-means, residual and
outlier codebooks, and GPTQ's channel-independent column pass. config.py holds the options, quantize.py the
algorithm; the stored format is formats/cvqweight.py."""

from .config import PRESETS, VPTQConfig, stored_bits
from .quantize import vptq_quantize

__all__ = ["PRESETS", "VPTQConfig", "stored_bits", "vptq_quantize"]
