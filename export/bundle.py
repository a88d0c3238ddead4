"""The deployable bundle: what `vqmobile export` writes, and its validation on open.

Layout (written atomically: a temporary sibling renamed into place, never half-written):

    bundle.json                         manifest: target, formats, bpv, sizes, model config, sha256 of every file
    model.pte                           ExecuTorch program (vqmobile custom ops + XNNPACK delegates)
    model.onnx                          ONNX model (vqmobile-domain nodes with model-local functions)
    lib/libvqmobile_executorch.so       the ExecuTorch adapter + native kernels, built for the target
    lib/libexecutorch*.so               (arm64 only) the ExecuTorch runtime the runner links, from the aarch64 wheel
    bin/vqm_runner                      the latency benchmark (android_demo/runner), built for the target
    tokenizer/                          the tokenizer files
    checkpoint/                         the vqmobile checkpoint the graphs were exported from: the PyTorch
                                        reference for `vqmobile check` (not needed on the device)
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from vqmobile import atomic
from vqmobile.errors import FormatError, UserError, VQMobileWarning, first_line
from vqmobile.hashing import sha256_file

from .runtime.build import TARGETS, _compilers

# what the .pte's KV cache holds: float16 halves the bytes attention reads per token at long contexts
KV_CACHES = ("float32", "float16")

MANIFEST = "bundle.json"
FORMAT = "vqmobile-bundle"
FORMAT_VERSION = 1
PTE = "model.pte"
ONNX = "model.onnx"
LIB_DIR = "lib"
BIN_DIR = "bin"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoint"
FORMATS = ("executorch", "onnx")
DEFAULT_MAX_SEQ = 512
# Tokens per forward call of the .pte: a longer prompt goes in several calls. The runtime plans (and touches) memory
# for the largest call, whose logits alone are T x vocab floats (12.6 MB at 64 for a 49152-word vocabulary, 100 MB
# at 512); prefill at 64 per call ran as fast as in one call of 448 (README, "Prefill in chunks").
DEFAULT_PREFILL_CHUNK = 64


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def pte(self) -> Path | None:
        return self.path / PTE if "executorch" in self.manifest["formats"] else None

    @property
    def onnx(self) -> Path | None:
        return self.path / ONNX if "onnx" in self.manifest["formats"] else None

    @property
    def library(self) -> Path | None:
        lib = self.manifest.get("library")
        return self.path / lib["path"] if lib else None

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def max_seq(self) -> int:
        return int(self.manifest["max_seq"])

    @property
    def prefill_chunk(self) -> int:
        """Most tokens per forward call of the .pte (max_seq for bundles written before the option)."""
        return int(self.manifest.get("prefill_chunk", self.max_seq))

    @property
    def kv_cache(self) -> str:
        """dtype of the .pte's KV cache ('float32' for bundles written before the option)."""
        return str(self.manifest.get("kv_cache", "float32"))

    @property
    def activations(self) -> str:
        """Activation semantics of the .pte's quantized linears ('float' for bundles written before the option)."""
        return str(self.manifest.get("activations", {}).get("executorch", "float"))

    def host_library(self, progress=None) -> Path | None:
        """The adapter library this machine can load: the bundle's when it was built for this machine, else one
        built here (cached). None for a decomposed program (no custom ops)."""
        if self.library is None:
            return None
        from .runtime.build import build_adapter, host_target

        if self.target == host_target():
            return self.library
        return build_adapter(host_target(), progress=progress)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / TOKENIZER_DIR, local_files_only=True)


def _damaged(p: Path, what: str) -> FormatError:
    return FormatError(f"bundle {p}: {what}; the bundle is damaged or was modified: export it again")


def _relative_file(p: Path, rel: Any) -> Path:
    """A path the manifest names, kept inside the bundle (a tampered manifest must not send us elsewhere)."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise _damaged(p, f"{MANIFEST} names a file outside the bundle: {rel!r}")
    return p / rel


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open and validate a bundle: manifest readable and of this format, every listed file present (with its
    sha256 when verify), the kernel library present when the program needs it. verify=False skips only the hashes
    (the CLI's first check, before the heavy imports). Raises a one-line FormatError / UserError."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"bundle {p} does not exist or is not a folder: pass the --out folder of `vqmobile export`")
    mf = p / MANIFEST
    if not mf.is_file():
        raise FormatError(f"{p} is not a vqmobile bundle: it has no {MANIFEST} (an incomplete export?); "
                          "export it again")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise _damaged(p, f"cannot read {MANIFEST} ({first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{mf} is not a vqmobile bundle manifest: pass the --out folder of `vqmobile export`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"bundle {p} has format version {manifest.get('format_version')!r}, this vqmobile reads "
                          f"version {FORMAT_VERSION}: export it again with this version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _damaged(p, f"{MANIFEST} lists no files")
    formats = manifest.get("formats")
    if not isinstance(formats, list) or not formats or not all(f in FORMATS for f in formats):
        raise _damaged(p, f"{MANIFEST} has no valid 'formats' entry (a list of {', '.join(FORMATS)})")
    if manifest.get("target") not in TARGETS:
        raise _damaged(p, f"{MANIFEST} has no valid 'target' entry ({' or '.join(TARGETS)})")
    max_seq = manifest.get("max_seq")
    if not isinstance(max_seq, int) or isinstance(max_seq, bool) or max_seq < 2:
        raise _damaged(p, f"{MANIFEST} has no valid 'max_seq' entry")
    activations = manifest.get("activations", {})
    if not isinstance(activations, dict) or activations.get("executorch", "float") not in ("float", "int8"):
        raise _damaged(p, f"{MANIFEST} has no valid 'activations' entry")
    chunk = manifest.get("prefill_chunk", max_seq)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 2 <= chunk <= max_seq:
        raise _damaged(p, f"{MANIFEST} has no valid 'prefill_chunk' entry (2 to max_seq)")
    if manifest.get("kv_cache", "float32") not in KV_CACHES:
        raise _damaged(p, f"{MANIFEST} has no valid 'kv_cache' entry ({' or '.join(KV_CACHES)})")
    for fmt, name in (("executorch", PTE), ("onnx", ONNX)):
        if fmt in formats and name not in files:
            raise _damaged(p, f"{MANIFEST} lists the {fmt} format but not its file {name}")
    lib = manifest.get("library")
    if lib is not None:
        if not isinstance(lib, dict) or not isinstance(lib.get("path"), str) or lib["path"] not in files:
            raise _damaged(p, f"{MANIFEST} has no valid 'library' entry")
        if not _relative_file(p, lib["path"]).is_file():
            raise FormatError(f"bundle {p} is missing its kernel library {lib['path']}: export the bundle again")
    for rel, entry in files.items():
        f = _relative_file(p, rel)
        if not isinstance(entry, dict):
            raise _damaged(p, f"{MANIFEST} has no size and sha256 for {rel}")
        if not f.is_file():
            raise FormatError(f"bundle {p} is incomplete: {rel} is missing; export it again")
        if verify and (f.stat().st_size != entry.get("bytes") or sha256_file(f) != entry.get("sha256")):
            raise _damaged(p, f"{rel} does not match the manifest's sha256")
    return Bundle(p, manifest)


def check_export(formats: list[str], target: str, *, decompose: bool, max_seq: int | None, out: str | Path,
                 overwrite: bool, kv_cache: str = "float32",
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> tuple[list[str], str, Path]:
    """The export's own arguments, checked before any heavy import or work: formats, target, the cross compiler
    the kernel library needs, --max-seq, --prefill-chunk, --kv-cache and the output location. Returns (formats,
    target, absolute out)."""
    if kv_cache not in KV_CACHES:
        raise UserError(f"--kv-cache {kv_cache} is not supported: use {' or '.join(KV_CACHES)}")
    formats = list(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown format {', '.join(bad) or '(none)'}: use executorch, onnx or both")
    target = {"aarch64": "arm64", "amd64": "x86_64", "x86-64": "x86_64"}.get(target, target)
    if target not in TARGETS:
        raise UserError(f"unknown target {target}: use {' or '.join(TARGETS)}")
    if "executorch" in formats and not decompose:
        _compilers(target)  # a missing cross compiler fails now, not after the export
    if max_seq is not None and max_seq < 2:
        raise UserError(f"--max-seq {max_seq} must be at least 2")
    if prefill_chunk < 2:
        raise UserError(f"--prefill-chunk {prefill_chunk} must be at least 2 (tokens per forward call)")
    return formats, target, atomic.check_output(out, overwrite=overwrite)


def _resolve_checkpoint(model_spec: str, tmp: Path, calibration, progress) -> tuple[Path, bool]:
    """A checkpoint directory for model_spec: the checkpoint itself, or the float model quantized with the default
    mobile recipe (GPTVQ 2D, 3.125 bpv) into tmp/checkpoint."""
    from vqmobile import checkpoint
    from vqmobile.model import resolve

    path = resolve(model_spec)
    if path.is_dir() and checkpoint.is_checkpoint(path):
        return path, False
    try:
        from vqmobile.quantizers.gptvq import GPTVQConfig

        config = GPTVQConfig.from_target(preset="mobile")
    except (ImportError, AttributeError) as e:
        raise UserError(f"{model_spec} is a float model and the default mobile recipe (GPTVQ) is not available "
                        f"({e}): quantize it first with `vqmobile quantize` and export the checkpoint") from None
    from vqmobile.api import CalibrationSpec, quantize

    if progress:
        progress(f"{model_spec} is a float model: quantizing it with the mobile recipe ({config.describe()}) ...")
    out = tmp / CHECKPOINT_DIR
    quantize(model_spec, config, out, calibration or CalibrationSpec(), progress=progress is not None)
    return out, True


def export_bundle(model_spec: str, out: str, *, target: str, formats: list[str], overwrite: bool = False,
                  decompose: bool = False, max_seq: int | None = None, calibration=None,
                  activations: str = "float", kv_cache: str = "float32", prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                  progress: Callable[[str], None] | None = print) -> dict:
    """Export `model_spec` (a vqmobile checkpoint, or a HF directory / GGUF file / 'smollm2' that is first quantized
    with the mobile recipe) to a bundle at `out`. Returns the manifest plus 'out' and 'warnings'.

    decompose=True exports the quantized layers as standard ops (portable .pte, no kernel library needed).
    activations: the .pte's activation semantics, 'float' (default: exact, what check gates strictly) or 'int8'
    (the kernels' integer dot products, the fast mode; see export/check.py for how it is checked); the ONNX file
    always defines float activations. kv_cache: the .pte's KV cache dtype, 'float32' or 'float16' (half the bytes
    read per token at long contexts; its PyTorch reference in `check` rounds keys and values alike).
    prefill_chunk: the most tokens one forward call of the .pte takes (at most max_seq)."""
    import torch

    from vqmobile import checkpoint as ckpt
    from vqmobile.layers import check_activations, set_activations

    from .runtime.build import RUNTIME_LIBS, build_adapter, build_runner, host_target, runtime_lib_dir

    check_activations(activations)  # before any work
    formats, target, out_path = check_export(formats, target, decompose=decompose, max_seq=max_seq, out=out,
                                             overwrite=overwrite, kv_cache=kv_cache, prefill_chunk=prefill_chunk)
    needs_lib = "executorch" in formats and not decompose
    say = progress or (lambda _msg: None)
    warnings_out: list[str] = []
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        src, quantized_here = _resolve_checkpoint(model_spec, tmp, calibration, progress)
        ck = ckpt.load(src)  # the user's checkpoint itself, so that an error names it and not our temporary copy
        if not quantized_here:
            shutil.copytree(src, tmp / CHECKPOINT_DIR)
        model = ck.model
        from .model import unsupported_layers

        fallback = unsupported_layers(model)
        for name, why in fallback.items():
            msg = f"layer {name} is exported with standard ops (dequantized weight): {why}"
            warnings_out.append(msg)
            warnings.warn(msg, VQMobileWarning)
        limit = int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_SEQ))
        seq = min(max_seq or DEFAULT_MAX_SEQ, limit)
        chunk = min(prefill_chunk, seq)
        info: dict[str, Any] = {}
        if "executorch" in formats:
            from .executorch_export import export_pte

            say(f"exporting the ExecuTorch program (max_seq {seq}, up to {chunk} tokens per call, {kv_cache} KV cache"
                f"{', decomposed' if decompose else ''}) ...")
            set_activations(model, activations)
            info["pte"] = export_pte(model, tmp / PTE, seq, chunk=chunk, decompose=decompose,
                                     kv_dtype=getattr(torch, kv_cache))
        if "onnx" in formats:
            from .onnx_export import export_onnx

            say("exporting the ONNX model ...")
            info["onnx"] = export_onnx(model, tmp / ONNX, seq)
        library = None
        if needs_lib:
            say(f"building the kernel library for {target} ...")
            lib = build_adapter(target, progress=say)
            (tmp / LIB_DIR).mkdir()
            shutil.copy2(lib, tmp / LIB_DIR / lib.name)
            library = {"path": f"{LIB_DIR}/{lib.name}", "target": target,
                       "registers": ["vqmobile::vq_linear.out", "vqmobile::int_linear.out",
                                     "vqmobile::dense_linear.out", "vqmobile::e8p_linear.out",
                                     "vqmobile::hadamard.out", "vqmobile::cvq_linear.out"],
                       "links": "libexecutorch.so (executorch 1.5.1)"}
            runner = build_runner(target, progress=say)
            (tmp / BIN_DIR).mkdir()
            shutil.copy2(runner, tmp / BIN_DIR / runner.name)
            if target != host_target():  # the host runner finds the installed wheel's; a device has none
                for name in RUNTIME_LIBS:
                    shutil.copy2(runtime_lib_dir(target) / name, tmp / LIB_DIR / name)
            library["runner"] = f"{BIN_DIR}/{runner.name}"
        ck.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                rel = f.relative_to(tmp).as_posix()
                files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        cm = ck.manifest
        emb = cm.get("embedding")
        emb_bytes = int(emb["bytes"]) if emb else 0
        packed = int(cm["quantized_bytes"]) + emb_bytes + int(cm["float_bytes"])
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": model_spec, "quantized_during_export": quantized_here,
            "target": target, "host_built_on": host_target(), "formats": formats, "decomposed": decompose,
            "max_seq": seq, "prefill_chunk": chunk,
            "activations": {f: ("float" if f == "onnx" else activations) for f in formats},
            "kv_cache": kv_cache,
            "method": cm.get("method"), "quant_config": cm.get("config"),
            "bits_per_weight": cm.get("bits_per_weight"),
            "checkpoint_bytes": {"quantized": int(cm["quantized_bytes"]), "embedding": emb_bytes,
                                 "float": int(cm["float_bytes"]), "total": packed},
            "checkpoint_embedding": emb and {k: emb[k] for k in ("kind", "spec", "tied_head")},
            "architecture": model.config.model_type,
            "model_config": json.loads(model.config.to_json_string()),
            "program": {"inputs": "tokens int64 [1, T], input_pos int64 [1]", "outputs": "logits float32 [1, T, V]",
                        "T": f"1..{chunk}", "kv_cache": "static, in the program's mutable buffers",
                        "prompt": f"at most {chunk} tokens per call, each call at its start position"},
            **info,
            "pte_to_checkpoint_ratio": (info["pte"]["bytes"] / packed) if "pte" in info else None,
            "library": library,
            "standard_op_layers": fallback,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        result.update(manifest)

    atomic.directory(out_path, write)
    result["out"] = str(out_path)
    result["warnings"] = warnings_out
    return result
