"""vqmobile: vector-quantized LLMs for phone CPUs.

    import vqmobile
    result = vqmobile.quantize("smollm2", vqmobile.GPTQConfig(bits=4, group=128), "out/smollm2-gptq4")
    model = vqmobile.load("out/smollm2-gptq4")

Configs are dataclasses (RTNConfig, GPTQConfig, GPTVQConfig, QuIPConfig; GPTVQConfig.from_target(bpv=..., preset=...);
every one takes incoherence="hadamard"); `quantize_(model, config, calibration_ids)` quantizes
an in-memory model in place with the same layer-wise pipeline; `set_activations(model, "int8")` runs its quantized
linears with the kernels' int8 activations.
"""

from __future__ import annotations

import importlib
import sys
import types

# name -> (module, attribute). Imported on first use (PEP 562), so that `import vqmobile.cli` or vqmobile.errors
# does not load torch: the command line answers a mistyped path before paying for the heavy imports.
_EXPORTS = {
    "CalibrationSpec": (".api", "CalibrationSpec"), "evaluate": (".api", "evaluate"), "load": (".api", "load"),
    "open_model": (".api", "open_model"), "quantize": (".api", "quantize"),
    "load_checkpoint": (".checkpoint", "load"),
    "FormatError": (".errors", "FormatError"), "UserError": (".errors", "UserError"),
    "set_activations": (".layers", "set_activations"),
    "load_model": (".model", "load_model"), "prepare_model": (".model", "prepare_model"),
    "quantize_": (".pipeline", "quantize_"),
    "GPTQConfig": (".quantizers.gptq", "GPTQConfig"), "GPTVQConfig": (".quantizers.gptvq", "GPTVQConfig"),
    "QuIPConfig": (".quantizers.quip", "QuIPConfig"), "RTNConfig": (".quantizers.rtn", "RTNConfig"),
    "VPTQConfig": (".quantizers.vptq", "VPTQConfig"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqmobile' has no attribute '{name}'")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule vqmobile.evaluate binds it on the package; the public name is the function.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
