"""Fine-tuning of a quantized model's continuous parameters with every discrete choice (codes, indices) fixed: the
stage any method can use after the pipeline quantizes a decoder layer (`finetune="layer"`) or the whole model
(`finetune="model"`).

What is tuned: every quantized linear's continuous quantization parameters, as its format exposes them
(QuantizedWeight.trainable: codebook entries, scales, VPTQ's column scales; a codebook shared by several linears is
one set of tensors), and the normalization weights (RMSNorm) in scope, which are float parameters of the model
anyway. After tuning, each weight stores its parameters rounded to
its own dtypes (int8 codebooks with their fp16 scale, fp16 scales), so the format, the kernels and the exporters do
not change.

- Layer (`finetune_layer`): after a decoder layer is quantized, Adam minimizes the relative squared error between its
  outputs and the float layer's outputs on the same calibration inputs (computed before it was quantized), for
  `finetune_epochs` passes over the batches of the first `finetune_samples` calibration sequences (one batch per
  step; a SmolLM2 layer's step of 8 x 512 tokens takes seconds, so training on every sequence would dominate the
  quantization time).
- Model (`finetune_model`): after every layer is quantized, Adam minimizes the KL divergence from the float model's
  next-token distribution to the quantized model's on `finetune_model_samples` calibration sequences, one sequence
  per step (memory: one sequence's activations and gradients). Its step size, epochs and sequences are its own
  (QuantConfig.model_stage(); by default the layer stage's): on VPTQ's shared codebooks it wants more sequences,
  seen once, at a smaller step than the layer stage.

Adam's step size is `finetune_lr` times each parameter tensor's RMS, so one setting suits codebook entries, fp16
scales and norm weights of very different magnitudes. Tuning is kept only if it generalizes: the loss is measured
before and after (with the stored, rounded parameters) on calibration sequences the stage did not train on (as many
as it trained on, at most 8 for the model stage), and the parameters are put back if it did not go down. A tuner
with hundreds of thousands of values (VPTQ's codebooks) can lower its training loss while the model gets worse; only
when the calibration set holds no other sequences does the decision fall back to the training ones (the report's
`probe` says which). Both stages keep the model unchanged if interrupted (the parameters are written back only at the
end).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .formats.base import Trainable
from .layers import QuantLinear
from .threads import num_threads

# Multiply-adds per training step from which all threads are used: a small layer's many tiny ops run far faster on
# one thread of a loaded machine (see threads.py), a real model's layer gains from all of them.
PARALLEL_STEP_WORK = 1 << 30


@dataclass
class FinetuneReport:
    scope: str  # "layer N" or "model"
    loss_before: float
    loss_after: float
    steps: int
    parameters: int  # trainable scalars
    seconds: float
    kept: bool  # False: the tuned parameters did not lower the loss and were put back
    probe: str  # what loss_before and loss_after were measured on: "held-out" or "training" sequences

    def to_dict(self) -> dict:
        return asdict(self)


class _TunedLinear(nn.Module):
    """Stands in for a QuantLinear while tuning: y = x W^T + b with W decoded from trainable parameters (a fixed
    dequantized weight for linears outside the scope, e.g. a head tied to the embedding)."""

    def __init__(self, base: QuantLinear, trainable: Trainable | None):
        super().__init__()
        self.base, self.trainable = base, trainable
        self.fixed = base.qweight.dequantize() if trainable is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fixed if self.trainable is None else self.trainable.decode(self.trainable.params)
        return F.linear(x, w, self.base.bias)


def _norm_weights(root: nn.Module) -> list[nn.Parameter]:
    """The normalization weights under `root`: 1-D `weight` parameters of modules that are not linears/embeddings."""
    out = []
    for mod in root.modules():
        w = mod._parameters.get("weight") if not isinstance(mod, (nn.Linear, nn.Embedding, QuantLinear)) else None
        if isinstance(w, nn.Parameter) and w.dim() == 1:
            out.append(w)
    return out


@contextlib.contextmanager
def _tuning(root: nn.Module, tuned: dict[str, QuantLinear]) -> Iterator[list[tuple[QuantLinear, Trainable]]]:
    """Replace every QuantLinear under `root` by a _TunedLinear (trainable for those in `tuned`) for the duration;
    yields the (layer, trainable) pairs."""
    swapped, pairs, tied = [], [], {}
    for name, mod in list(root.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        tr = mod.qweight.trainable() if name in tuned else None
        if tr is not None:
            for pname, key in tr.tied.items():  # a shared codebook: every holder decodes from the first one's tensor
                tr.params[pname] = tied.setdefault(key, tr.params[pname])
            pairs.append((mod, tr))
        parent, _, child = name.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        setattr(owner, child, _TunedLinear(mod, tr))
        swapped.append((owner, child, mod))
    try:
        yield pairs
    finally:
        for owner, child, mod in swapped:
            setattr(owner, child, mod)


class _Tuner:
    """Adam over the trainable parameters of the QuantLinears in scope plus the norm weights, with a per-tensor step
    size; knows how to store the result and how to put the original back."""

    def __init__(self, pairs: list[tuple[QuantLinear, Trainable]], norms: list[nn.Parameter], lr: float):
        self.pairs, self.norms = pairs, norms
        self.initial = [{k: v.clone() for k, v in tr.params.items()} for _, tr in pairs]
        self.norms_initial = [p.detach().clone() for p in norms]
        self.norms_grad = [p.requires_grad for p in norms]
        groups, seen = [], set()
        for _, tr in pairs:
            for t in tr.params.values():
                if id(t) not in seen:  # tied parameters (a shared codebook set) are one tensor, tuned once
                    seen.add(id(t))
                    t.requires_grad_(True)
                    groups.append(t)
        for p in norms:
            p.requires_grad_(True)
        groups += norms
        self.count = sum(t.numel() for t in groups)
        self.opt = torch.optim.Adam([{"params": [t], "lr": lr * _rms(t)} for t in groups]) if groups else None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The training loop's context: if it is interrupted (or fails), the norm weights Adam moved in place are put
        back; the quantized weights were never touched (their parameters are copies until store())."""
        try:
            yield
        except BaseException:
            self.store(tuned=False, weights=False)
            raise

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def store(self, tuned: bool, weights: bool = True) -> None:
        """Write the tuned (or, tuned=False, the original) parameters into the weights, rounded to their dtypes, and
        into the norm weights."""
        with torch.no_grad():
            for (mod, tr), init in zip(self.pairs, self.initial if weights else []):
                mod.qweight.load_trainable(tr.params if tuned else init)
            for p, init, grad in zip(self.norms, self.norms_initial, self.norms_grad):
                if not tuned:
                    p.copy_(init)
                p.requires_grad_(grad)


def _rms(t: torch.Tensor) -> float:
    r = float(t.detach().pow(2).mean().sqrt()) if t.numel() else 0.0
    return r if r > 0 and math.isfinite(r) else 1e-3


def _layer_out(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _rel_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)


def finetune_layer(layer: nn.Module, inputs: list, targets: list[torch.Tensor], *, epochs: int, lr: float,
                   samples: int = 0, index: int = 0, progress: Callable[[str], None] | None = None
                   ) -> tuple[FinetuneReport, list[torch.Tensor]]:
    """Tune one quantized decoder layer towards the float layer's outputs `targets` on `inputs` (the pipeline's
    [(hidden, kwargs)] batches), training on the batches that hold the first `samples` sequences (0: all). Returns
    the report (losses on those batches) and the tuned layer's outputs on all `inputs` (the next layer's inputs),
    computed with the stored parameters."""
    scope = {name: m for name, m in layer.named_modules() if isinstance(m, QuantLinear)}
    work = inputs[0][0].shape[:-1].numel() * sum(m.in_features * m.out_features for m in scope.values())
    count, used = 0, 0
    for hidden, _ in inputs:
        if samples and count >= samples:
            break
        count += hidden.shape[0]
        used += 1
    with num_threads(torch.get_num_threads() if work >= PARALLEL_STEP_WORK else 1):
        return _finetune_layer(layer, scope, inputs, targets, used, epochs, lr, index, progress)


def _finetune_layer(layer, scope, inputs, targets, used, epochs, lr, index, progress):
    t0 = time.perf_counter()
    probe = list(range(used, min(len(inputs), 2 * used))) or list(range(used))

    def loss(outs) -> float:
        return sum(float(_rel_mse(outs[b], targets[b])) for b in probe) / len(probe)

    with torch.no_grad():
        loss_before = loss({b: _layer_out(layer, *inputs[b]) for b in probe})
    steps = 0
    with _tuning(layer, scope) as pairs, torch.enable_grad():
        tuner = _Tuner(pairs, _norm_weights(layer), lr)
        with tuner.running():
            for epoch in range(epochs if tuner.opt is not None else 0):
                for b in range(used):
                    (hidden, kwargs), target = inputs[b], targets[b]
                    tuner.step(_rel_mse(_layer_out(layer, hidden, kwargs), target))
                    steps += 1
                    if progress:
                        progress(f"layer {index} finetune epoch {epoch + 1}/{epochs} batch {b + 1}/{used}")
        tuner.store(tuned=True)
    with torch.no_grad():
        after = [_layer_out(layer, h, kw) for h, kw in inputs]
    loss_after = loss(after)
    kept = loss_after < loss_before
    if not kept:
        tuner.store(tuned=False)
        with torch.no_grad():
            after = [_layer_out(layer, h, kw) for h, kw in inputs]
        loss_after = loss_before
    report = FinetuneReport(f"layer {index}", loss_before, loss_after, steps, tuner.count,
                            time.perf_counter() - t0, kept, "held-out" if probe[0] >= used else "training")
    return report, after


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def finetune_model(model: nn.Module, teacher: nn.Module, calibration: torch.Tensor, *, epochs: int, lr: float,
                   samples: int, progress: bool = True) -> FinetuneReport:
    """Tune every quantized linear and norm weight of `model` towards the float `teacher`'s logits (KL divergence)
    on the first `samples` calibration sequences, one sequence per Adam step."""
    from .checkpoint import quantized_modules

    t0 = time.perf_counter()
    seqs = calibration[: samples or len(calibration)]
    held_out = calibration[len(seqs): len(seqs) + 8]
    probe = held_out if len(held_out) else seqs[:8]  # teacher logits recomputed each time: no 49k-wide cache

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(float(_kl(teacher(input_ids=s[None], use_cache=False).logits,
                                 model(input_ids=s[None], use_cache=False).logits)) for s in probe) / len(probe)

    loss_before = probe_loss()
    steps = 0
    with _tuning(model, quantized_modules(model)) as pairs, torch.enable_grad():
        tuner = _Tuner(pairs, _norm_weights(model), lr)
        with tuner.running(), tqdm(total=epochs * len(seqs), desc="finetune model (KL)", unit="seq",
                                   disable=not progress) as bar:
            for _ in range(epochs if tuner.opt is not None else 0):
                for s in seqs:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=s[None], use_cache=False).logits
                    tuner.step(_kl(t_logits, model(input_ids=s[None], use_cache=False).logits))
                    steps += 1
                    bar.update(1)
        tuner.store(tuned=True)
    loss_after = probe_loss()
    kept = loss_after < loss_before
    if not kept:
        tuner.store(tuned=False)
        loss_after = loss_before
    return FinetuneReport("model", loss_before, loss_after, steps, tuner.count, time.perf_counter() - t0, kept,
                          "held-out" if len(held_out) else "training")
