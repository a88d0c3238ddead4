"""The sequential layer-wise post-training quantization pipeline (the GPTQ procedure), shared by every method.

Calibration sequences run up to the first decoder layer; then, layer by layer: collect each linear's Hessian
H = 2 X^T X / n from its real inputs, quantize the layer's linears with the configured method, and run the calibration
batch through the *quantized* layer to produce the next layer's inputs. Memory stays bounded by one layer's
activations and Hessians. Methods plug in through QuantConfig; there is no other pipeline.

With `config.finetune` (vqmobile/finetune.py), the float layer's outputs from the Hessian pass are kept as targets and
the quantized layer is tuned towards them before it produces the next layer's inputs ("layer"), and/or the whole
quantized model is tuned towards a float copy's logits at the end ("model").
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .embedding import quantize_embeddings_
from .finetune import finetune_layer, finetune_model
from .hessian import HessianAccumulator
from .layers import QuantLinear
from .quantizers.base import QuantConfig
from .structure import decoder_layers, decoder_structure, layers_path


@dataclass
class QuantizeReport:
    method: str
    layers: int
    linears: int
    seconds: float
    peak_rss_mb: float
    per_layer_seconds: list[float] = field(default_factory=list)
    embedding_max_abs_error: float | None = None  # None: the embedding stayed float
    finetune: list[dict] = field(default_factory=list)  # one FinetuneReport per tuned layer, then the model's

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("method", "layers", "linears", "seconds", "peak_rss_mb",
                                               "embedding_max_abs_error", "finetune")}


class _StopForward(Exception):
    pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def linear_layers(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` while the model's forward runs: records what the layer receives and
    passes the hidden states through; the last one stops the forward (the norm and head are never computed)."""

    def __init__(self, index: int, last: bool, sink: list):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        self.sink.append((hidden.detach() if self.index == 0 else None, kwargs))
        if self.last:
            raise _StopForward
        return hidden


def _capture_layer_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int):
    """Run each calibration batch through the model with every decoder layer replaced by a recorder. Returns the
    first layer's inputs [(hidden states, kwargs) per batch] and every layer's own kwargs [layer][batch]: layers of
    different types get different ones (Gemma 3: the sliding-window mask and local RoPE, or the global ones)."""
    layers = decoder_layers(model)
    originals = list(layers)
    seen: list[list] = [[] for _ in originals]
    for i in range(len(layers)):
        layers[i] = _Recorder(i, i == len(originals) - 1, seen[i])
    try:
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    inputs = [(hidden, kwargs) for hidden, kwargs in seen[0]]
    return inputs, [[kwargs for _, kwargs in per_layer] for per_layer in seen]


def _with_kwargs(inputs, kwargs: list[dict]) -> list:
    """The same hidden states with another layer's kwargs."""
    return [(hidden, kw) for (hidden, _), kw in zip(inputs, kwargs)]


def _head_hessian(norm: nn.Module, outputs) -> torch.Tensor:
    """The Hessian of the head's inputs: the last decoder layer's outputs through the final norm."""
    acc = HessianAccumulator(outputs[0][0].shape[-1])
    with torch.no_grad():
        for hidden, _ in outputs:
            acc.add(norm(hidden))
    return acc.value()


def _run_layer(layer: nn.Module, inputs) -> list:
    outputs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outputs.append(((out[0] if isinstance(out, tuple) else out).detach(), kwargs))
    return outputs


def _collect_hessians(layer: nn.Module, linears: dict[str, nn.Linear], inputs, outputs: list | None = None
                      ) -> dict[str, torch.Tensor]:
    """Each linear's Hessian from one pass of the calibration batch. Linears that read the very same input tensor
    (q/k/v, gate/up) share one accumulator, so each distinct input costs one X^T X. The layer's outputs of that pass
    are appended to `outputs` when given."""
    accs: dict[str, HessianAccumulator] = {}
    seen: dict[int, tuple[torch.Tensor, HessianAccumulator]] = {}  # this batch: id(input) -> (input, accumulator)

    def hook(name: str):
        def record(_module, args, _output):
            x = args[0]
            if id(x) in seen:  # a sibling linear already added this very tensor
                accs.setdefault(name, seen[id(x)][1])
                return
            acc = accs.setdefault(name, HessianAccumulator(x.shape[-1]))
            acc.add(x)
            seen[id(x)] = (x, acc)  # holding x keeps its id unique for the rest of the batch
        return record

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    try:
        for batch in inputs:
            seen.clear()
            out = _run_layer(layer, [batch])
            if outputs is not None:
                outputs.append(out[0][0])
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    return {name: acc.value() for name, acc in accs.items()}


def check_model(model: nn.Module, config: QuantConfig) -> None:
    """Validate the config against every layer before any work starts."""
    prefix = layers_path(model)
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linear_layers(layer).items():
            config.check_layer(f"{prefix}.{i}.{name}", lin.out_features, lin.in_features)


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None, *,
              batch_size: int = 8, progress: bool = True) -> QuantizeReport:
    """Quantize every linear layer of every decoder layer of `model` in place, then the token embedding (and a head
    tied to it) as config.embedding says; an untied head stays float."""
    check_model(model, config)
    tune_layers = config.finetune in ("layer", "layer+model")
    tune_model = config.finetune in ("model", "layer+model")
    if (config.needs_hessian or config.finetune != "none") and calibration is None:
        raise ValueError(f"method {config.method} with finetune={config.finetune} needs calibration data")
    start = time.perf_counter()
    teacher = copy.deepcopy(model) if tune_model else None
    layers = decoder_layers(model)
    need_inputs = config.needs_hessian or tune_layers
    inputs, layer_kwargs = _capture_layer_inputs(model, calibration, batch_size) if need_inputs else (None, None)
    per_layer, nlinears, tuned = [], 0, []
    bar = tqdm(layers, desc=f"{config.method}", unit="layer", disable=not progress)
    for i, layer in enumerate(bar):
        t0 = time.perf_counter()
        linears = linear_layers(layer)
        hessians: dict[str, torch.Tensor] = {}
        targets: list | None = [] if tune_layers else None  # the float layer's outputs
        if inputs is not None:
            inputs = _with_kwargs(inputs, layer_kwargs[i])
        if config.needs_hessian:
            hessians = _collect_hessians(layer, linears, inputs, targets)
        elif tune_layers:
            targets = [out for out, _ in _run_layer(layer, inputs)]
        readers: dict[int, list[str]] = {}  # one Hessian per distinct input, with the linears reading it in order
        for name in linears:
            h = hessians.get(name)
            readers.setdefault(id(h) if h is not None else id(linears[name]), []).append(name)
        for names in readers.values():
            bar.set_postfix_str(f"layer {i} {'/'.join(names)}")
            qweights = config.quantize_readers([linears[n].weight.detach().float() for n in names],
                                               hessians.get(names[0]), [f"{i}.{n}" for n in names])
            for name, qweight in zip(names, qweights):
                _set_module(layer, name, QuantLinear(qweight, linears[name].bias))
            nlinears += len(names)
        hessians.clear()
        if tune_layers:
            lr, epochs, samples = config.layer_stage()
            rep, outs = finetune_layer(layer, inputs, targets, epochs=epochs, lr=lr, samples=samples, index=i,
                                       progress=bar.set_postfix_str)
            tuned.append(rep.to_dict())
            inputs = [(out, kwargs) for out, (_, kwargs) in zip(outs, inputs)]
        elif inputs is not None:
            inputs = _run_layer(layer, inputs)
        per_layer.append(time.perf_counter() - t0)
    head_hessian = None
    if config.embedding in ("int4", "vq") and inputs is not None:
        head_hessian = _head_hessian(decoder_structure(model).norm, inputs)
    inputs = None
    emb_err = None
    if config.embedding != "float":
        emb_err = quantize_embeddings_(model, config.embedding, head_hessian)
    if tune_model:
        lr, epochs, samples = config.model_stage()
        tuned.append(finetune_model(model, teacher, calibration, epochs=epochs, lr=lr, samples=samples,
                                    progress=progress).to_dict())
        teacher = None
    return QuantizeReport(config.method, len(layers), nlinears, time.perf_counter() - start, peak_rss_mb(), per_layer,
                          emb_err, tuned)
