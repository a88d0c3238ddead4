"""Running a .pte in the ExecuTorch runtime from Python (the executorch wheel's pybindings), with our kernels.

The adapter library registers the vqmobile kernels with the runtime's operator registry when it is loaded, so it
must be loaded (once; loading it again is harmless) before a program that uses them is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from vqmobile.errors import VQMobileWarning

_LOADED: dict[str, ctypes.CDLL] = {}
# ExecuTorch's threadpool logs its CPU probing straight to file descriptor 2 the first time a program runs
# ("[cpuinfo_utils.cpp:87] Failed to open midr file ...": ARM register files, absent and irrelevant on x86).
_NATIVE_NOISE = re.compile(rb"^\[cpuinfo_utils\.cpp:\d+\] ")
_ran_once = False


@contextlib.contextmanager
def _without_native_noise():
    """Hold back the runtime's _NATIVE_NOISE lines written to fd 2 inside the block; pass every other line on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True) if not _NATIVE_NOISE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def portable_lib():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.extension.pybindings import portable_lib as pl
    return pl


def load_adapter(path: str | Path) -> None:
    """dlopen the adapter library (RTLD_GLOBAL) after the runtime itself; idempotent per file."""
    key = os.path.realpath(path)
    if key in _LOADED:
        return
    other = next((k for k in _LOADED if Path(k).read_bytes() != Path(key).read_bytes()), None)
    if other is not None:
        # the runtime keeps the first registration of an op, so this library's kernels would silently go unused
        warnings.warn(f"{key} differs from the adapter library already loaded ({other}); programs in this process "
                      "run the first one's kernels: use one process per bundle", VQMobileWarning)
    portable_lib()  # the runtime (libexecutorch.so) first, so the adapter registers into its registry
    lib = ctypes.CDLL(key, mode=ctypes.RTLD_GLOBAL)
    lib.vqmobile_et_register()
    _LOADED[key] = lib


def set_adapter_threads(n: int | None) -> None:
    """Threads of the native kernels inside every loaded adapter library (its own copy of them; the Python-side
    vqmobile.kernels.set_num_threads does not reach it). None or <= 0: all online CPUs."""
    for lib in _LOADED.values():
        if hasattr(lib, "vqmobile_et_set_num_threads"):
            lib.vqmobile_et_set_num_threads(0 if n is None else int(n))


def adapter_threads() -> int | None:
    for lib in _LOADED.values():
        if hasattr(lib, "vqmobile_et_get_num_threads"):
            return int(lib.vqmobile_et_get_num_threads())
    return None


class ETDecoder:
    """The exported decoder: __call__(tokens [1, T] int64, start_pos int) -> logits float32 [1, T, vocab], in as
    many forward calls as the program's largest T (its prefill chunk) needs."""

    def __init__(self, pte: str | Path, library: str | Path | None):
        if library is not None:
            load_adapter(library)
        self.module = portable_lib()._load_for_executorch(str(pte))
        self.path = Path(pte)
        self.chunk = int(self.module.method_meta("forward").input_tensor_meta(0).sizes()[1])

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        tokens = tokens.to(torch.int64).contiguous()
        if tokens.dim() == 1:
            tokens = tokens[None]
        parts = [self._forward(tokens[:, i:i + self.chunk].contiguous(), int(start_pos) + i)
                 for i in range(0, tokens.shape[1], self.chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        inputs = (tokens, torch.tensor([start_pos], dtype=torch.int64))
        global _ran_once
        if _ran_once:
            out = self.module.forward(inputs)
        else:
            with _without_native_noise():
                out = self.module.forward(inputs)
            _ran_once = True
        return out[0].clone()


def greedy(step, prompt_ids: torch.Tensor, max_new_tokens: int, max_seq: int, eos: int | None = None) -> dict:
    """Greedy decoding with a KV-cache step function step(tokens [1, T], start_pos) -> logits [1, T, V]:
    prefill the prompt, then one token per call. Returns tokens and timings (decode tokens/s excludes prefill)."""
    ids = prompt_ids.reshape(1, -1).to(torch.int64)
    n_prompt = ids.shape[1]
    budget = max(0, min(max_new_tokens, max_seq - n_prompt))
    t0 = time.perf_counter()
    logits = step(ids, 0)
    t1 = time.perf_counter()
    new: list[int] = []
    pos = n_prompt
    nxt = int(logits[0, -1].argmax())
    decode_time = 0.0
    while len(new) < budget:
        new.append(nxt)
        if eos is not None and nxt == eos:
            break
        if len(new) == budget:
            break
        ts = time.perf_counter()
        logits = step(torch.tensor([[nxt]], dtype=torch.int64), pos)
        decode_time += time.perf_counter() - ts
        pos += 1
        nxt = int(logits[0, -1].argmax())
    steps = max(0, len(new) - 1)
    return {
        "prompt_tokens": n_prompt, "new_tokens": new, "prefill_s": t1 - t0, "decode_s": decode_time,
        "decode_steps": steps, "tokens_per_s": steps / decode_time if decode_time > 0 else float("nan"),
    }


@torch.no_grad()
def greedy_torch(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, max_seq: int,
                 eos: int | None = None) -> list[int]:
    """Reference greedy decoding with the PyTorch model (full recomputation, no cache)."""
    ids = prompt_ids.reshape(1, -1).to(torch.int64)
    budget = max(0, min(max_new_tokens, max_seq - ids.shape[1]))
    new: list[int] = []
    while len(new) < budget:
        nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        new.append(nxt)
        if eos is not None and nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new
