"""The packed checkpoint: a directory holding the quantized layers' packed tensors, the float tensors, the config,
the tokenizer and a JSON manifest. Written atomically (a temporary sibling renamed into place), validated on load.

Layout:
  vqmobile.json          manifest: format version, method and config, per-layer kind/spec/bits, totals, source
                         fingerprint, calibration settings, sha256 of both tensor files
  quantized.safetensors  packed tensors of every quantized linear and of a quantized embedding (whose tied head
                         shares them), keyed "<module path>.<tensor name>"
  model.safetensors      every other tensor (a float embedding, norms, biases), tied weights stored once
  config.json, tokenizer files
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic
from .embedding import QuantEmbedding, tied_head, use_quantized_embedding
from .errors import FormatError, UserError
from .formats import weight_from_stored
from .formats.intweight import IntWeight
from .hashing import sha256_file
from .layers import QuantLinear

FORMAT_VERSION = 1
MANIFEST = "vqmobile.json"
QUANTIZED_FILE = "quantized.safetensors"
FLOAT_FILE = "model.safetensors"


@dataclass
class Checkpoint:
    model: torch.nn.Module
    tokenizer: Any
    manifest: dict[str, Any]
    path: Path


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def quantized_modules(model: torch.nn.Module) -> dict[str, QuantLinear]:
    """The quantized linears, by module path. A head tied to a quantized embedding is not one of them: it is the
    embedding's weight, stored and counted with the embedding (the manifest's `embedding` entry)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = emb.qweight if isinstance(emb, QuantEmbedding) else None
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.qweight is not tied}


def _float_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def prepare_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Check where a result will go before any long work starts, so a bad --out fails in the first second."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another --out or pass --overwrite")
    # Missing parent folders are created when the result is written (like mkdir -p), not now: a run that fails
    # before then leaves nothing behind. The nearest existing ancestor decides whether that can work.
    base = out.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{base} is not a folder: choose another --out")
    if not os.access(base, os.W_OK):
        raise UserError(f"cannot write to {base}: choose another --out")
    return out


def save(model: torch.nn.Module, tokenizer, out: str | Path, *, config: dict[str, Any], source: dict[str, Any],
         calibration: dict[str, Any] | None, report: dict[str, Any] | None = None, overwrite: bool = False) -> dict:
    """Write the checkpoint of an already-quantized model; returns the manifest."""
    out = prepare_output_dir(out, overwrite)
    emb_name, emb = _embedding_module(model)
    emb_qw = emb.qweight if isinstance(emb, QuantEmbedding) else None
    qmods = quantized_modules(model)
    if not qmods:
        raise ValueError("the model has no quantized layers")
    packed: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    embedding = None
    if emb_qw is not None:
        packed.update({f"{emb_name}.{t}": v.contiguous() for t, v in emb_qw.tensors().items()})
        embedding = {"module": emb_name, "kind": emb_qw.kind, "spec": emb_qw.spec(), "bytes": emb_qw.stored_bytes(),
                     "bits_per_weight": emb_qw.bits_per_weight(), "tied_head": tied_head(model)}
    qbytes = qweights = 0
    for name, mod in qmods.items():
        qw = mod.qweight
        for tname, t in qw.tensors().items():
            packed[f"{name}.{tname}"] = t.contiguous()
        n, k = qw.shape
        layers[name] = {"kind": qw.kind, "spec": qw.spec(), "bytes": qw.stored_bytes(),
                        "bits_per_weight": qw.bits_per_weight()}
        qbytes += qw.stored_bytes()
        qweights += n * k
    floats = _float_tensors(model)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": config["method"],
        "config": config,
        "source": source,
        "calibration": calibration,
        "layers": layers,
        "quantized_weights": qweights,
        "quantized_bytes": qbytes,
        "bits_per_weight": 8 * qbytes / qweights,
        "embedding": embedding,  # None: the embedding is among the float tensors
        "float_bytes": sum(t.numel() * t.element_size() for t in floats.values()),
        "report": report,
    }

    def write(tmp: Path) -> None:
        save_file(packed, str(tmp / QUANTIZED_FILE), metadata={"format": "vqmobile"})
        save_file(floats, str(tmp / FLOAT_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest["sha256"] = {f: sha256_file(tmp / f) for f in (QUANTIZED_FILE, FLOAT_FILE)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    atomic.directory(out, write)
    return manifest


def _embedding_module(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    emb = model.get_input_embeddings()
    return next(name for name, m in model.named_modules() if m is emb), emb


def _load_embedding(model: torch.nn.Module, entry: Any, packed: dict[str, torch.Tensor], tie_config: bool,
                    path: Path) -> bool:
    """Install the stored quantized embedding (and the head tied to it); False when the embedding is float."""
    if entry is None:
        return False
    name, emb = _embedding_module(model)
    if not isinstance(entry, dict) or entry.get("module") != name:
        raise FormatError(f"{path / MANIFEST}: its embedding entry does not name this model's embedding {name}")
    if bool(entry.get("tied_head")) != tie_config:  # a tied head has no float weight of its own to fall back on
        raise FormatError(f"{path / MANIFEST}: its embedding entry says tied_head={entry.get('tied_head')}, "
                          f"config.json says tie_word_embeddings={tie_config}")
    tensors = {k[len(name) + 1:]: v for k, v in packed.items() if k.startswith(f"{name}.")}
    qw = weight_from_stored(entry.get("kind"), entry.get("spec", {}), tensors)
    if not isinstance(qw, IntWeight) or qw.bits != 8 or not qw.symmetric or qw.shape != tuple(emb.weight.shape):
        raise FormatError(f"{path / MANIFEST}: the embedding must be 8-bit symmetric integers of shape "
                          f"{tuple(emb.weight.shape)}")
    use_quantized_embedding(model, qw, bool(entry.get("tied_head")))
    return True


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read {path / MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path} has checkpoint format version {manifest.get('format_version') if isinstance(manifest, dict) else '?'}, "
                          f"this vqmobile reads version {FORMAT_VERSION}")
    for f in (QUANTIZED_FILE, FLOAT_FILE):
        if not (path / f).is_file():
            raise FormatError(f"checkpoint {path} is incomplete: {f} is missing")
        expected = manifest.get("sha256", {}).get(f)
        if expected != sha256_file(path / f):
            raise FormatError(f"checkpoint file {path / f} does not match the manifest's sha256: it is corrupt or was modified")
    return manifest


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise FormatError(f"corrupt safetensors file {path}: {e}") from None


def load(path: str | Path) -> Checkpoint:
    """Load a checkpoint as a working torch model whose quantized linears run from the packed representation."""
    from transformers import AutoConfig, AutoTokenizer

    from .model import check_architecture, model_from_config, quiet_libraries

    quiet_libraries()
    path = Path(path)
    if not is_checkpoint(path):
        raise UserError(f"{path} is not a vqmobile checkpoint: it has no {MANIFEST}")
    manifest = _read_manifest(path)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    check_architecture(getattr(hf_config, "model_type", None), path)
    model = model_from_config(hf_config)  # the structure the checkpoint's layer names refer to

    packed = _read_safetensors(path / QUANTIZED_FILE)
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise FormatError(f"{path / MANIFEST} lists no quantized layers")
    for name, entry in layers.items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"the manifest names layer {name}, which this model does not have") from None
        if not isinstance(target, torch.nn.Linear):
            raise FormatError(f"the manifest names {name}, which is not a linear layer")
        prefix = f"{name}."
        tensors = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
        qw = weight_from_stored(entry.get("kind"), entry.get("spec", {}), tensors)
        if qw.shape != (target.out_features, target.in_features):
            raise FormatError(f"layer {name} is stored as {qw.shape}, the model config implies "
                              f"{(target.out_features, target.in_features)}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(qw, target.bias))

    tie_config = bool(getattr(hf_config, "tie_word_embeddings", False))
    quantized_embedding = _load_embedding(model, manifest.get("embedding"), packed, tie_config, path)

    floats = _read_safetensors(path / FLOAT_FILE)
    missing, unexpected = model.load_state_dict(floats, strict=False)
    tied = {"lm_head.weight"} if tie_config else set()
    if unexpected or set(missing) - tied:
        raise FormatError(f"{path / FLOAT_FILE} does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    if tied and not quantized_embedding:
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return Checkpoint(model, tokenizer, manifest, path)
