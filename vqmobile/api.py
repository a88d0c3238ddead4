"""The public workflow: open a model or checkpoint, quantize it to a checkpoint, evaluate perplexity.

The CLI is a thin layer over these functions; each returns plain dataclasses that say what was produced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import atomic, checkpoint
from .data import calibration_data, wikitext_test_ids
from .errors import UserError
from .evaluate import Perplexity, perplexity
from .model import load_model, resolve
from .pipeline import QuantizeReport, quantize_
from .quantizers.base import QuantConfig


@dataclass
class OpenedModel:
    model: torch.nn.Module
    tokenizer: Any
    kind: str  # "float" or "checkpoint"
    bits_per_weight: float | None
    source: str
    fingerprint: str | None = None


def open_model(spec: str) -> OpenedModel:
    """A float model (HF directory, GGUF file, 'smollm2') or a vqmobile checkpoint, whichever `spec` names."""
    path = resolve(spec)
    if path.is_dir() and checkpoint.is_checkpoint(path):
        ck = checkpoint.load(path)
        return OpenedModel(ck.model, ck.tokenizer, "checkpoint", ck.manifest["bits_per_weight"], spec)
    loaded = load_model(spec)
    return OpenedModel(loaded.model, loaded.tokenizer, "float", None, spec, loaded.fingerprint)


def load(path: str | Path) -> torch.nn.Module:
    """A vqmobile checkpoint as a working torch model whose quantized linears run from the packed weights."""
    return checkpoint.load(path).model


@dataclass
class CalibrationSpec:
    path: str | None = None  # None: WikiText-2 validation tokens
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0


@dataclass
class QuantizeResult:
    out: Path
    manifest: dict[str, Any]
    report: QuantizeReport


def quantize(model_spec: str, config: QuantConfig, out: str | Path, calibration: CalibrationSpec | None = None,
             *, overwrite: bool = False, progress: bool = True) -> QuantizeResult:
    """Load a float model, quantize it layer by layer with `config`, and write a packed checkpoint to `out`."""
    out = atomic.check_output(out, overwrite=overwrite)
    calibration = calibration or CalibrationSpec()
    if checkpoint.is_checkpoint(resolve(model_spec)):
        raise UserError(f"{model_spec} is already a quantized checkpoint: quantize the float model instead")
    loaded = load_model(model_spec)
    from .pipeline import check_model

    check_model(loaded.model, config)  # before spending time on calibration data
    calib_ids, calib_meta = None, None
    if config.needs_hessian:
        calib_ids = calibration_data(loaded.tokenizer, calibration.path, calibration.nsamples, calibration.seqlen,
                                     calibration.seed)
        calib_meta = {
            "file": str(calibration.path or "wikitext2/wiki.valid.tokens"),
            "nsamples": calibration.nsamples, "seqlen": calibration.seqlen, "seed": calibration.seed,
            "tokens_sha256": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest(),
        }
    report = quantize_(loaded.model, config, calib_ids, progress=progress)
    manifest = checkpoint.save(
        loaded.model, loaded.tokenizer, out, config=config.to_dict(),
        source={"model": model_spec, "sha256": loaded.fingerprint}, calibration=calib_meta,
        report=report.to_dict(), overwrite=overwrite,
    )
    return QuantizeResult(out, manifest, report)


def default_context(model: torch.nn.Module) -> int:
    return min(2048, int(getattr(model.config, "max_position_embeddings", 2048)))


def evaluate(model: torch.nn.Module, tokenizer, *, ctx: int | None = None, windows: int | None = None,
             data: str | None = None, progress: bool = True) -> Perplexity:
    """WikiText-2 test perplexity (or of another raw text file) with the papers' windowing."""
    ctx = ctx or default_context(model)
    limit = int(getattr(model.config, "max_position_embeddings", ctx))
    if ctx < 2 or ctx > limit:
        raise UserError(f"--ctx {ctx} is out of range for this model: use 2..{limit}")
    if windows is not None and windows < 1:
        raise UserError(f"--windows {windows} must be at least 1")
    ids = wikitext_test_ids(tokenizer, data)
    if ids.numel() < ctx:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {ctx}")
    return perplexity(model, ids, ctx, windows, progress=progress)
