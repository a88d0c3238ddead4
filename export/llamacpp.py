"""The llama.cpp peer of the decode race, through llama-cpp-python (the optional extra `peers`).

    available() -> (True, version) or (False, why)           llama_cpp importable here?
    quantized_gguf(spec, kind, progress) -> Path               llama.cpp's own quantizer on an F32 GGUF of the
                                                               float model (export/gguf_float.py), cached
    gguf_summary(path) -> dict                                 tensor types, bits per weight, bytes, vocabulary
    command(gguf, tokens, new_tokens, threads) -> argv         the timed child below

Run as a script (`python -P llamacpp.py GGUF ...`), this file is the timed child: it imports only the standard library
and llama_cpp (so its peak RSS is llama.cpp's plus a bare interpreter's, which it reports separately), drives
llama.cpp's low-level API (llama_decode with a batch, as the C++ runner calls forward): one untimed warm-up (the
prompt and one decode step), then the prompt in one batch (prefill) and greedy decoding one token per call through
the KV cache, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

# llama_ftype values of llama.h for the kinds the race runs
FTYPES = {"Q4_0": 2, "Q4_K_M": 15}
DEFAULT_KINDS = ("Q4_0", "Q4_K_M")
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def available() -> tuple[bool, str]:
    try:
        import llama_cpp
    except ImportError as e:
        return False, (f"llama_cpp is not importable ({e}): install the optional extra with "
                       "`pip install -e .[peers]` (it compiles llama.cpp)")
    return True, llama_cpp.__version__


def versions() -> dict:
    """llama-cpp-python's version, the ggml/llama library versions it built, and llama.cpp's own CPU feature view."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    sonames = {p.name.split(".so.")[0]: p.name.split(".so.")[1] for p in lib.glob("lib*.so.*.*.*")}
    return {"llama_cpp_python": llama_cpp.__version__, "libllama": sonames.get("libllama"),
            "libggml": sonames.get("libggml"), "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def _quiet():
    """Route llama.cpp's log lines nowhere (the callback object must outlive every call)."""
    import llama_cpp

    cb = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(cb, None)
    return cb


def _source(spec: str):
    """(LoadedModel, source GGUF or None, HF directory or None) of a float model spec."""
    from vqmobile.model import load_model, registry_gguf_path, resolve
    from vqmobile.registry import REGISTRY_MODELS

    path = resolve(spec)
    loaded = load_model(spec)
    if spec in REGISTRY_MODELS:  # its Hugging Face directory, made from the GGUF kept beside it
        return loaded, registry_gguf_path(spec), path
    if path.is_file():
        return loaded, path, None
    return loaded, None, path


def quantized_gguf(spec: str, kind: str, *, progress=None) -> Path:
    """The float model `spec` quantized to `kind` (Q4_0, Q4_K_M) by llama.cpp's quantizer, from an F32 GGUF of the
    same weights (a registry model other than Llama: from its own GGUF, which llama.cpp dequantizes to the same floats).
    Cached as ~/.cache/vqmobile/gguf/<name>-<sha of the source>-<kind>-llama_cpp<version>.gguf."""
    import ctypes

    import llama_cpp

    from vqmobile.hashing import sha256_files
    from vqmobile.model import cache_dir, resolve

    from .gguf_float import write_f32_gguf

    if kind not in FTYPES:
        raise ValueError(f"unknown GGUF kind {kind!r}: use one of {', '.join(FTYPES)}")
    src = resolve(spec)
    name = (src.stem if src.is_file() else src.name).split(".")[0]
    weights = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    sha = sha256_files(weights)[:16]
    out = cache_dir() / "gguf" / f"{name}-{sha}-{kind}-llama_cpp{llama_cpp.__version__}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    f32 = out.with_name(f".{name}-{sha}-F32-{os.getpid()}.gguf")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if progress:
            progress(f"quantizing {spec} to {kind} with llama.cpp ...")
        loaded, source_gguf, hf_dir = _source(spec)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[kind]
        if source_gguf is not None and loaded.model.config.model_type != "llama":
            # our F32 writer knows Llama only; llama.cpp reads its own file and dequantizes it to the same floats
            # we evaluate (the GGUF is the float reference), then quantizes those
            src_file, params.allow_requantize = source_gguf, True
        else:
            src_file = f32
            write_f32_gguf(loaded.model, f32, source_gguf=source_gguf, vocab_dir=hf_dir)
        del loaded
        cb = _quiet()
        rc = llama_cpp.llama_model_quantize(str(src_file).encode(), str(tmp).encode(), ctypes.byref(params))
        del cb
        if rc != 0 or not tmp.is_file():
            raise RuntimeError(f"llama.cpp's quantizer failed ({rc}) on {src_file} -> {kind}")
        os.replace(tmp, out)
    finally:
        f32.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


def gguf_summary(path: Path) -> dict:
    """What a GGUF holds: per tensor role the types llama.cpp gave it, bits per weight of the decoder's linear
    layers (blk.*, every block scale included) and of the whole file's tensors, and the vocabulary."""
    import gguf

    r = gguf.GGUFReader(str(path))
    types: dict[str, set] = {}
    lin_bits = lin_n = all_bits = all_n = 0
    for t in r.tensors:
        role = t.name.split(".")[2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        types.setdefault(role, set()).add(t.tensor_type.name)
        all_bits += 8 * int(t.n_bytes)
        all_n += int(t.n_elements)
        if role in LINEAR_ROLES:
            lin_bits += 8 * int(t.n_bytes)
            lin_n += int(t.n_elements)
    return {"file_bytes": path.stat().st_size, "tensor_types": {k: sorted(v) for k, v in sorted(types.items())},
            "bits_per_weight": lin_bits / lin_n if lin_n else None, "bits_per_weight_all_tensors": all_bits / all_n,
            "tokens": list(r.fields["tokenizer.ggml.tokens"].contents())}


def command(gguf_path: Path, tokens: list[int], new_tokens: int, threads: int) -> list[str]:
    """argv of the timed child for one run (a fresh interpreter; -P keeps export/ off its path)."""
    return [sys.executable, "-P", str(Path(__file__).resolve()), str(gguf_path), "--tokens",
            ",".join(map(str, tokens)), "--new-tokens", str(new_tokens), "--threads", str(threads)]


# ------------------------------------------------------------------------------------------------ the timed child
def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _rss_peak_mb() -> float:
    """This process's own high-water mark (VmHWM), as the C++ runner reports it: ru_maxrss would include the
    launching process's, which Linux carries across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _child(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="llamacpp.py")
    p.add_argument("gguf")
    p.add_argument("--tokens", required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    a = p.parse_args(argv)
    import ctypes

    import llama_cpp as L
    import numpy as np

    prompt = [int(t) for t in a.tokens.split(",")]
    cb = _quiet()
    L.llama_backend_init()
    rss0 = _rss_now_mb()
    model = L.llama_model_load_from_file(a.gguf.encode(), L.llama_model_default_params())
    if not model:
        print(f"llama.cpp could not load {a.gguf}", file=sys.stderr)
        return 2
    cp = L.llama_context_default_params()
    cp.n_ctx = len(prompt) + a.new_tokens + 1
    cp.n_batch = cp.n_ubatch = len(prompt)
    cp.n_threads = cp.n_threads_batch = a.threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(len(prompt), 0, 1)

    def step(toks: list[int], pos: int) -> int:
        """One llama_decode of `toks` at positions pos.. (logits of the last only); returns their argmax."""
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(toks) - 1
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        row = np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(ctx, -1), ctypes.POINTER(ctypes.c_float)),
                                    shape=(n_vocab,))
        return int(row.argmax())

    first = step(prompt, 0)  # warm-up, as the runner's --warmup 1
    if a.new_tokens > 1:
        step([first], len(prompt))
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    out = [step(prompt, 0)]
    t1 = time.perf_counter()
    for i in range(1, a.new_tokens):
        out.append(step([out[-1]], len(prompt) + i - 1))
    t2 = time.perf_counter()
    record = {
        "prompt_tokens": len(prompt), "new_tokens": a.new_tokens, "threads": a.threads,
        "prefill_ms": (t1 - t0) * 1e3, "prefill_tokens_per_s": len(prompt) / (t1 - t0),
        "decode_tokens_per_s": (a.new_tokens - 1) / (t2 - t1) if a.new_tokens > 1 else 0.0, "tokens": out,
        "rss_before_load_mb": rss0, "peak_rss_mb": _rss_peak_mb(),
        "n_ctx": L.llama_n_ctx(ctx), "flash_attn_type": cp.flash_attn_type, "type_k": cp.type_k,
        "type_v": cp.type_v,
    }
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    del cb
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
