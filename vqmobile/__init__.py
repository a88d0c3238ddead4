"""vqmobile: vector-quantized LLMs for phone CPUs.

    import vqmobile
    result = vqmobile.quantize("smollm2", vqmobile.GPTQConfig(bits=4, group=128), "out/smollm2-gptq4")
    model = vqmobile.load("out/smollm2-gptq4")

Configs are dataclasses (RTNConfig, GPTQConfig, GPTVQConfig, QuIPConfig; GPTVQConfig.from_target(bpv=..., preset=...);
every one takes incoherence="hadamard"); `quantize_(model, config, calibration_ids)` quantizes
an in-memory model in place with the same layer-wise pipeline; `set_activations(model, "int8")` runs its quantized
linears with the kernels' int8 activations.
"""

from .api import CalibrationSpec, evaluate, load, open_model, quantize
from .checkpoint import load as load_checkpoint
from .errors import FormatError, UserError
from .layers import set_activations
from .model import load_model, prepare_default_model
from .pipeline import quantize_
from .quantizers.gptq import GPTQConfig
from .quantizers.gptvq import GPTVQConfig
from .quantizers.quip import QuIPConfig
from .quantizers.rtn import RTNConfig

__all__ = [
    "CalibrationSpec", "FormatError", "GPTQConfig", "GPTVQConfig", "QuIPConfig", "RTNConfig", "UserError", "evaluate", "load", "load_checkpoint",
    "load_model", "open_model", "prepare_default_model", "quantize", "quantize_", "set_activations",
]
