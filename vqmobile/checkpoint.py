"""The packed checkpoint: a directory holding the quantized layers' packed tensors, the float tensors, the config,
the tokenizer and a JSON manifest. Written atomically (a temporary sibling renamed into place), validated on load.

Layout:
  vqmobile.json          manifest: format version, method and config, per-layer kind/spec/bits, totals, source
                         fingerprint, calibration settings, sha256 of every other file (older checkpoints:
                         of the two tensor files only)
  quantized.safetensors  packed tensors of every quantized linear and of a quantized embedding (whose tied head
                         shares them), keyed "<module path>.<tensor name>"; a tensor several linears share (VPTQ's
                         codebook of the linears reading one input) is stored once, the manifest's "aliases" naming
                         the key that holds it
  model.safetensors      every other tensor (a float embedding, norms, biases), tied weights stored once
  config.json, tokenizer files
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic
from .embedding import QuantEmbedding, tied_head, unsupported, use_quantized_embedding
from .errors import FormatError, UserError, first_line
from .formats import weight_from_stored
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


def save(model: torch.nn.Module, tokenizer, out: str | Path, *, config: dict[str, Any], source: dict[str, Any],
         calibration: dict[str, Any] | None, report: dict[str, Any] | None = None, overwrite: bool = False) -> dict:
    """Write the checkpoint of an already-quantized model; returns the manifest."""
    out = atomic.check_output(out, overwrite=overwrite)
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
    holders: dict[tuple[str, str], str] = {}  # (shared set, tensor name) -> the packed key holding the tensor
    aliases: dict[str, str] = {}  # a shared tensor of a linear -> the key of the set's first holder
    for name, mod in qmods.items():
        qw = mod.qweight
        shared = qw.shared_tensors()
        for tname, t in qw.tensors().items():
            key = f"{name}.{tname}"
            first = holders.setdefault((shared[tname], tname), key) if tname in shared else key
            if first != key:
                if not torch.equal(t, packed[first]):
                    raise ValueError(f"{key} differs from {first}, which its shared set '{shared[tname]}' holds")
                aliases[key] = first
                continue
            packed[key] = t.contiguous()
            qbytes += t.numel() * t.element_size()
        n, k = qw.shape
        layers[name] = {"kind": qw.kind, "spec": qw.spec(), "bytes": qw.stored_bytes(),
                        "bits_per_weight": qw.bits_per_weight()}
        qweights += n * k
    floats = _float_tensors(model)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": config["method"],
        "config": config,
        "source": source,
        "calibration": calibration,
        "layers": layers,  # each with its own bytes; the totals below count a shared tensor once
        "aliases": aliases,
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
        # every file the folder holds, config and tokenizer included: loading trusts none that does not match
        manifest["sha256"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
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
        raise _damaged(path, f"its embedding entry does not name this model's embedding {name}")
    if bool(entry.get("tied_head")) != tie_config:  # a tied head has no float weight of its own to fall back on
        raise _damaged(path, f"its embedding entry says tied_head={entry.get('tied_head')}, config.json says "
                             f"tie_word_embeddings={tie_config}")
    qw = _stored_weight(path, name, entry, packed)
    why = unsupported(qw) or (None if qw.shape == tuple(emb.weight.shape) else
                              f"its shape {qw.shape} is not the model's {tuple(emb.weight.shape)}")
    if why:
        raise _damaged(path, f"the embedding {name} cannot be loaded ({why})")
    use_quantized_embedding(model, qw, bool(entry.get("tied_head")))
    return True


_WHAT_TO_DO = "the checkpoint is damaged or was modified: quantize the model again (or restore the folder from a copy)"


def _damaged(path: Path, what: str) -> FormatError:
    """A one-line error naming the checkpoint, what is wrong in it, and what to do."""
    return FormatError(f"checkpoint {path}: {what}; {_WHAT_TO_DO}")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise _damaged(path, f"cannot read {MANIFEST} ({first_line(e)})") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"{MANIFEST} is not a vqmobile manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"checkpoint {path} has format version {manifest.get('format_version')!r}; this vqmobile "
                          f"reads version {FORMAT_VERSION}: quantize the model again with this version")
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or not {QUANTIZED_FILE, FLOAT_FILE} <= set(hashes):
        raise _damaged(path, f"{MANIFEST} has no sha256 of {QUANTIZED_FILE} and {FLOAT_FILE}")
    for f, expected in hashes.items():  # the tensor files, and config and tokenizer files in newer checkpoints
        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
            raise _damaged(path, f"{MANIFEST} lists a file outside the checkpoint folder: {f!r}")
        if not (path / f).is_file():
            raise _damaged(path, f"{f} is missing")
        if expected != sha256_file(path / f):
            raise _damaged(path, f"{f} does not match the manifest's sha256")
    for key, kind in (("method", str), ("layers", dict), ("bits_per_weight", (int, float))):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise _damaged(path, f"{MANIFEST} has no valid '{key}' entry")
    if not manifest["layers"]:
        raise _damaged(path, f"{MANIFEST} lists no quantized layers")
    return manifest


def _read_safetensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path / name), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for one user problem: a file it cannot parse
        raise _damaged(path, f"{name} is not a readable safetensors file ({first_line(e)})") from None


def _stored_weight(path: Path, name: str, entry: Any, packed: dict[str, torch.Tensor]):
    """The quantized weight of module `name` from its manifest entry and packed tensors, validated by its format."""
    if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str) or not isinstance(entry.get("spec"), dict):
        raise _damaged(path, f"layer {name}: its manifest entry has no valid 'kind' and 'spec'")
    prefix = f"{name}."
    tensors = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
    try:
        return weight_from_stored(entry["kind"], entry["spec"], tensors)
    except FormatError as e:
        raise _damaged(path, f"layer {name}: {e}") from None


def _build(hf_config) -> torch.nn.Module:
    """The model structure the checkpoint's module names refer to (fused projections split), in float32."""
    from .model import model_from_config

    return model_from_config(hf_config)


def _check_shapes(path: Path, hf_config, layers: dict[str, Any], floats: dict[str, torch.Tensor]) -> None:
    """Match config.json against what the files hold before allocating anything: a config that does not fit the
    tensors (or asks for an enormous model) fails here in a second, with the first mismatch named."""
    with torch.device("meta"):
        meta = _build(hf_config)
    implied = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    for name in layers:
        try:
            target = meta.get_submodule(name)
        except AttributeError:
            raise _damaged(path, f"the manifest names layer {name}, which this model (config.json) does not have") \
                from None
        if not isinstance(target, torch.nn.Linear):
            raise _damaged(path, f"the manifest names {name}, which is not a linear layer of this model")
    for key, t in floats.items():
        if key not in implied:
            raise _damaged(path, f"{FLOAT_FILE} holds {key}, which this model (config.json) does not have")
        if tuple(t.shape) != implied[key]:
            raise _damaged(path, f"{FLOAT_FILE} holds {key} as {tuple(t.shape)}, config.json implies {implied[key]}")


def load(path: str | Path) -> Checkpoint:
    """Load a checkpoint as a working torch model whose quantized linears run from the packed representation.

    Every file is untrusted: hashes, the manifest's entries, every tensor's shape, dtype and code range, and the fit
    of config.json to the stored tensors are checked before the model runs; any failure is one FormatError line that
    names the checkpoint (and the layer) and says what to do."""
    from transformers import AutoConfig, AutoTokenizer

    from .model import check_architecture, quiet_libraries

    quiet_libraries()
    path = Path(path)
    if not is_checkpoint(path):
        raise UserError(f"{path} is not a vqmobile checkpoint: it has no {MANIFEST}")
    manifest = _read_manifest(path)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for one problem: a bad config.json
        raise _damaged(path, f"cannot read config.json ({first_line(e)})") from None
    check_architecture(getattr(hf_config, "model_type", None), path)

    packed = _read_safetensors(path, QUANTIZED_FILE)
    floats = _read_safetensors(path, FLOAT_FILE)
    layers = manifest["layers"]
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict):
        raise _damaged(path, f"{MANIFEST} has an 'aliases' entry that is not a table")
    for key, target in aliases.items():
        if not isinstance(target, str) or key in packed or target not in packed:
            raise _damaged(path, f"{MANIFEST} aliases {key!r} to {target!r}, which {QUANTIZED_FILE} does not hold "
                                 f"(or holds both)")
    packed.update({key: packed[target] for key, target in aliases.items()})
    weights = {name: _stored_weight(path, name, entry, packed) for name, entry in layers.items()}
    try:
        _check_shapes(path, hf_config, layers, floats)
    except UserError:
        raise
    except Exception as e:  # config values transformers cannot build a model from, whatever it raises for them
        raise _damaged(path, f"config.json does not describe a buildable model ({first_line(e)})") from None
    model = _build(hf_config)
    model.eval()
    for name, qw in weights.items():
        target = model.get_submodule(name)
        if qw.shape != (target.out_features, target.in_features):
            raise _damaged(path, f"layer {name} is stored as {qw.shape}, config.json implies "
                                 f"{(target.out_features, target.in_features)}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(qw, target.bias))

    tie_config = bool(getattr(hf_config, "tie_word_embeddings", False))
    quantized_embedding = _load_embedding(model, manifest.get("embedding"), packed, tie_config, path)

    missing, unexpected = model.load_state_dict(floats, strict=False)
    tied = {"lm_head.weight"} if tie_config else set()
    if unexpected or set(missing) - tied:
        raise _damaged(path, f"{FLOAT_FILE} does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
    if tied and not quantized_embedding:
        model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # as for config.json: many error types, one problem
        raise _damaged(path, f"cannot load its tokenizer ({first_line(e)})") from None
    return Checkpoint(model, tokenizer, manifest, path)
