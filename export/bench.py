"""The decode race: our bundle's .pte against its peers on the same model, timed the same way in one run.

Contenders:
- vqmobile: the bundle's model.pte (our kernels, through the adapter library);
- torchao 8da4w g32: the bundle's checkpoint with every quantized linear turned back into a float nn.Linear holding
  its dequantized weight (the same model), its decoder linears (and a quantized head) quantized with torchao
  Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32)) (what ExecuTorch's Llama export calls 8da4w, group 32)
  and the same static-KV-cache decoder lowered with the XNNPACK partitioners: KV cache (the bundle's dtype) and
  attention are identical in both programs. It is cached in ~/.cache/vqmobile/baselines/, keyed by the checkpoint's
  and the decoder's sha256;
- llama.cpp Q4_0 and Q4_K_M (export/llamacpp.py): the checkpoint's float source model written as an F32 GGUF and
  quantized by llama.cpp's own quantizer, run through llama-cpp-python's low-level API. Skipped, with the reason,
  when the optional extra `peers` (llama-cpp-python) is not installed.

Protocol: every contender gets the same P prompt token ids (from the bundle's tokenizer). Engine 'runner' (default)
runs each repeat of each .pte in a fresh process of the C++ runner (android_demo/runner); llama.cpp runs in a fresh
Python child. Each process: load, one untimed warm-up (the prompt and one decode step), then prefill (the prompt in
one call) and N-1 greedy decode steps through the KV cache, and its own peak RSS (VmHWM). Contenders alternate within
each repeat; medians over the repeats; for each thread count (1 and 2 by default). Engine 'python' is a quick check:
both .pte files in this process through the ExecuTorch Python runtime (no per-engine peak RSS there).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vqmobile import atomic
from vqmobile.checkpoint import MANIFEST
from vqmobile.errors import UserError
from vqmobile.hashing import sha256_file
from vqmobile.threads import num_threads

from .bundle import CHECKPOINT_DIR, open_bundle
from .et_runtime import ETDecoder, greedy, portable_lib, set_adapter_threads
from .runtime.build import build_runner, cache_root, host_target

ENGINES = ("runner", "python")
OURS, BASELINE = "vqmobile", "torchao 8da4w g32"
BARE = "vqmobile no transforms"  # the bundle's model without its online Hadamard transforms
PEER_PREFIX = "llama.cpp "
GROUP = 32
# the prompt's text, repeated until it gives P tokens
PROMPT_TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
               "had taught him. From the top he could see the fishing boats coming home across the grey water, and "
               "the lights of the village coming on one by one along the harbour wall. ")
# /proc/cpuinfo flags that decide which kernels run (ours, XNNPACK's, ggml's)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni",
             "avx512_bf16", "asimd", "asimddp", "i8mm", "sve", "fphp", "asimdhp", "bf16")


def dense_copy(model: nn.Module) -> nn.Module:
    """The model with every QuantLinear replaced by an nn.Linear holding its dequantized weight, and a quantized
    embedding by the float embedding it equals (a head tied to it shares that weight, as in the float model)."""
    from vqmobile.embedding import QuantEmbedding
    from vqmobile.layers import QuantLinear

    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        dense = emb.dequantized()  # keeps the embedding's output scale (Gemma)
        model.set_input_embeddings(dense)
        head = model.get_output_embeddings()
        if isinstance(head, QuantLinear) and head.qweight is emb.qweight:
            tied = nn.Linear(head.in_features, head.out_features, bias=False)
            tied.weight = dense.weight
            model.set_output_embeddings(tied)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.qweight.dequantize().float()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def export_torchao_baseline(checkpoint: str | Path, out: str | Path, max_seq: int, group: int = GROUP,
                            kv_dtype: torch.dtype = torch.float32, chunk: int | None = None) -> dict:
    """Write the 8da4w (torchao int8 dynamic activations, int4 weights, group `group`) XNNPACK .pte of a vqmobile
    checkpoint (its dequantized weights) or of a float model spec, atomically."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner, XnnpackPartitioner)
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from vqmobile.checkpoint import is_checkpoint, load
    from vqmobile.model import load_model
    from vqmobile.layers import QuantLinear

    from .executorch_export import export_program, lower_to_executorch, program_summary
    from .model import StaticDecoder

    head_quantized = False
    if is_checkpoint(checkpoint):
        ck = load(checkpoint)
        head_quantized = isinstance(ck.model.get_output_embeddings(), QuantLinear)
        model = dense_copy(ck.model)
    else:  # a float model (HF directory, GGUF, 'smollm2'): same architecture and source weights
        model = load_model(str(checkpoint)).model
    # Every linear the checkpoint quantizes (a quantized head included) gets ExecuTorch's 4-bit path.
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m.in_features % group == 0
              and (fqn.startswith("model.layers.") or (head_quantized and fqn == "lm_head")))
    wrapper = StaticDecoder(model, max_seq, cache=True, tied_head_op=False, kv_dtype=kv_dtype, fuse_steps=False)
    ep = export_program(model, max_seq, chunk=chunk, wrapper=wrapper)
    prog = lower_to_executorch(ep, [XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()])
    atomic.write_file(out, lambda tmp: tmp.write_bytes(prog.buffer))
    return {"bytes": len(prog.buffer), **program_summary(prog)}


def export_without_transforms(checkpoint: str | Path, out: str | Path, max_seq: int, activations: str = "float",
                              kv_dtype: torch.dtype = torch.float32, chunk: int | None = None) -> dict:
    """Write the .pte of a checkpoint whose incoherent layers run their inner weight alone: the same program minus
    the online Hadamard transforms (wrong outputs, the same work otherwise), to time what the transforms cost."""
    from vqmobile.checkpoint import load
    from vqmobile.layers import QuantLinear, set_activations

    from .executorch_export import export_program, lower_to_executorch, program_summary

    model = load(checkpoint).model
    stripped = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.qweight.kind == "incoherent":
            mod.qweight = mod.qweight.inner
            stripped += 1
    if not stripped:
        raise UserError(f"{checkpoint} has no incoherent layers: there are no transforms to leave out")
    set_activations(model, activations)
    prog = lower_to_executorch(export_program(model, max_seq, chunk=chunk, kv_dtype=kv_dtype))
    atomic.write_file(out, lambda tmp: tmp.write_bytes(prog.buffer))
    return {"bytes": len(prog.buffer), "layers_without_transforms": stripped, **program_summary(prog)}


@dataclass
class Contender:
    """One row family of the race: `run(threads)` times one fresh prefill + greedy decode and returns
    {prefill_ms, prefill_tokens_per_s, decode_tokens_per_s, tokens, peak_rss_mb, rss_before_load_mb, ...}."""
    name: str
    runtime: str
    file: Path
    bits_per_weight: float | None
    run: Callable[[int], dict]


def _child(cmd: list[str], what: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {last}")
    return res.stdout


def _runner_contender(name: str, runner: Path, pte: Path, ids: list[int], new_tokens: int, bpw) -> Contender:
    def run(threads: int) -> dict:
        with tempfile.TemporaryDirectory(prefix="vqm-race-") as tmp:
            out = Path(tmp) / "r.json"
            _child([str(runner), str(pte), "--tokens", ",".join(map(str, ids)), "--new-tokens", str(new_tokens),
                    "--repeats", "1", "--warmup", "1", "--threads", str(threads), "--json", str(out)],
                   f"the C++ runner on {pte}")
            r = json.loads(out.read_text())
        return {"prefill_ms": r["prefill_ms_median"], "prefill_tokens_per_s": r["prefill_tokens_per_s_median"],
                "decode_tokens_per_s": r["decode_tokens_per_s_median"], "tokens": r["tokens"],
                "peak_rss_mb": r["peak_rss_mb"], "rss_before_load_mb": r["rss_before_load_mb"],
                "kernel_path": r["kernel_path"]}
    return Contender(name, "ExecuTorch C++ runner", pte, bpw, run)


def _python_contender(name: str, dec: ETDecoder, ids: list[int], new_tokens: int, max_seq: int, bpw) -> Contender:
    from vqmobile import kernels

    prompt = torch.tensor(ids)

    def run(threads: int) -> dict:
        kernels.set_num_threads(threads)
        pl = portable_lib()
        if pl._threadpool_get_thread_count() != threads:  # a reset under loaded programs is unsafe: once, first
            pl._unsafe_reset_threadpool(threads)
        set_adapter_threads(threads)
        # torch's OpenMP pool must match too: its idle workers spin on the other cores otherwise
        with num_threads(threads):
            greedy(dec, prompt, 2, max_seq, None)  # warm-up, as the runner's --warmup 1
            res = greedy(dec, prompt, new_tokens, max_seq, None)
        return {"prefill_ms": res["prefill_s"] * 1e3, "prefill_tokens_per_s": len(ids) / res["prefill_s"],
                "decode_tokens_per_s": res["tokens_per_s"], "tokens": res["new_tokens"], "peak_rss_mb": None,
                "rss_before_load_mb": None}
    return Contender(name, "ExecuTorch Python runtime", dec.path, bpw, run)


def _llamacpp_contender(kind: str, gguf: Path, ids: list[int], new_tokens: int, bpw) -> Contender:
    from . import llamacpp

    def run(threads: int) -> dict:
        out = _child(llamacpp.command(gguf, ids, new_tokens, threads), f"llama.cpp on {gguf}")
        return json.loads(out.strip().splitlines()[-1])
    return Contender(PEER_PREFIX + kind, "llama.cpp (llama-cpp-python)", gguf, bpw, run)


def baseline_cache_path(bundle_path: Path, max_seq: int, kind: str = f"8da4w-g{GROUP}") -> Path:
    """Where a program compared with the bundle's lives (kind: the torchao baseline, or the bundle's model without
    its online transforms): keyed by the sha256 of the checkpoint's manifest (which holds the sha256 of its tensor
    files), of the decoder's source (the program it exports) and max_seq."""
    sha = sha256_file(bundle_path / CHECKPOINT_DIR / MANIFEST)[:16]
    decoder = sha256_file(Path(__file__).with_name("model.py"))[:8]
    return cache_root() / "baselines" / f"{sha}-{decoder}-{kind}-seq{max_seq}.pte"


def _decoder_bits(bundle_path: Path) -> float | None:
    """Bits per weight of the checkpoint's quantized decoder linears (model.layers.*, every overhead included)."""
    layers = json.loads((bundle_path / CHECKPOINT_DIR / MANIFEST).read_text())["layers"]
    dec = [v for k, v in layers.items() if k.startswith("model.layers.")]
    bits = sum(8 * v["bytes"] for v in dec)
    weights = sum(8 * v["bytes"] / v["bits_per_weight"] for v in dec)
    return bits / weights if weights else None


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n token ids of PROMPT_TEXT (repeated as needed), as the bundle's tokenizer encodes them."""
    text = PROMPT_TEXT
    while True:
        ids = tokenizer(text).input_ids
        if len(ids) >= n:
            return [int(t) for t in ids[:n]]
        text += PROMPT_TEXT


def vocabulary_check(tokenizer, gguf_tokens: list[str]) -> dict:
    """Does the GGUF's vocabulary spell every id as the bundle's tokenizer does? (Then the same ids are the same
    prompt for llama.cpp.)"""
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    differ = [i for i, (a, b) in enumerate(zip(ours, gguf_tokens)) if a != b]
    same = not differ and len(ours) == len(gguf_tokens)
    return {"same": same, "tokens": len(ours), "gguf_tokens": len(gguf_tokens), "differing_ids": differ[:10],
            "summary": (f"identical: {len(ours)} tokens, every id spelled the same" if same else
                        f"DIFFERENT: {len(ours)} vs {len(gguf_tokens)} tokens, {len(differ)} ids spelled "
                        "differently; llama.cpp's rows then read other prompts")}


def _llamacpp_contenders(source: str | None, kinds, tokenizer, ids, new_tokens, progress) -> tuple[list, dict]:
    """The llama.cpp contenders, or none and the reason; plus what their GGUFs hold."""
    from . import llamacpp

    info: dict = {"kinds": list(kinds)}
    if not kinds:
        info["skipped"] = "no GGUF kinds asked for"
        return [], info
    ok, version = llamacpp.available()
    if not ok:
        info["skipped"] = version
        return [], info
    if source is None:
        info["skipped"] = ("the bundle's checkpoint records no float source model: pass the float model with "
                           "--source")
        return [], info
    from vqmobile.model import resolve

    try:
        resolve(source)
    except UserError as e:
        info["skipped"] = f"the float source model {source!r} is not available here ({e}); pass it with --source"
        return [], info
    info["versions"] = llamacpp.versions()
    info["source"] = source
    out, info["gguf"] = [], {}
    for kind in kinds:
        path = llamacpp.quantized_gguf(source, kind, progress=progress)
        summary = llamacpp.gguf_summary(path)
        tokens = summary.pop("tokens")
        if "vocabulary" not in info:
            info["vocabulary"] = vocabulary_check(tokenizer, tokens)
        info["gguf"][kind] = {"path": str(path), **summary}
        out.append(_llamacpp_contender(kind, path, ids, new_tokens, summary["bits_per_weight"]))
    return out, info


def _machine() -> dict:
    """CPU model name, its kernel-relevant flags, cores and load average."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Hardware") and name is None:  # x86; Android arm64
                name = value.strip()
            elif key in ("flags", "Features") and not flags:  # x86; arm64
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name or platform.processor() or "unknown", "arch": platform.machine(),
            "flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count(), "loadavg": list(os.getloadavg())}


def _versions() -> dict:
    out = {}
    for pkg in ("executorch", "torchao", "torch", "llama-cpp-python"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _adapter_kernel_path(library: Path | None) -> str | None:
    if library is None:
        return None
    fn = ctypes.CDLL(str(library)).vqmobile_et_kernel_path
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _summarize(c: Contender, threads: int, runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    peaks = [r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb") is not None]
    before = [r["rss_before_load_mb"] for r in runs if r.get("rss_before_load_mb") is not None]
    return {
        "name": c.name, "runtime": c.runtime, "threads": threads, "file": str(c.file),
        "file_bytes": c.file.stat().st_size, "bits_per_weight": c.bits_per_weight,
        "prefill_ms": med("prefill_ms"), "prefill_tokens_per_s": med("prefill_tokens_per_s"),
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        # the fastest process: on a machine shared with other tenants, the one least slowed by them
        "best_decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in runs),
        "peak_rss_mb": max(peaks) if peaks else None,
        "rss_before_load_mb": statistics.median(before) if before else None,
        "tokens": runs[-1]["tokens"], "tokens_same_every_run": all(r["tokens"] == runs[0]["tokens"] for r in runs),
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
    }


def bench_decode(bundle: str, *, baseline_pte: str | None = None, prompt_tokens: int = 64, new_tokens: int = 64,
                 repeats: int = 3, threads: tuple[int, ...] | list[int] = (1, 2), engine: str = "runner",
                 gguf_kinds=None, source: str | None = None, without_transforms: bool = False,
                 progress=print) -> dict:
    """Race the bundle's .pte against the torchao 8da4w g32 .pte and llama.cpp GGUFs of the same model.

    baseline_pte: the baseline program to (re)use, exported there first when missing (default: the cache,
    baseline_cache_path). gguf_kinds: llama.cpp quantizations (default Q4_0 and Q4_K_M; empty: none).
    source: the float model the llama.cpp GGUFs are made from (default: the checkpoint's recorded source).
    without_transforms: also time the bundle's model without the online Hadamard transforms of its incoherent layers
    (exported once into the baselines' cache), which says what the transforms cost.
    Returns the record that the CLI prints as a table and may write as JSON."""
    from tqdm import tqdm

    from vqmobile import kernels

    from . import llamacpp

    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    threads = [int(t) for t in threads]
    if not threads or min(threads) < 1:
        raise UserError(f"threads must be positive integers, got {threads}")
    if engine == "python" and len(set(threads)) > 1:
        raise UserError("the python engine times one thread count per run (ExecuTorch's thread pool cannot be "
                        "resized safely while programs are loaded): pass one --threads value, or use --engine runner")
    if repeats < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise UserError("need at least 1 repeat, 1 prompt token and 2 new tokens (a prefill and a decode step)")
    gguf_kinds = list(llamacpp.DEFAULT_KINDS if gguf_kinds is None else gguf_kinds)
    bad = [k for k in gguf_kinds if k not in llamacpp.FTYPES]
    if bad:
        raise UserError(f"unknown GGUF kind {bad[0]!r}: use {', '.join(llamacpp.FTYPES)}")
    b = open_bundle(bundle)
    if b.pte is None:
        raise UserError(f"bundle {b.path} has no ExecuTorch program: export it with --format executorch")
    if prompt_tokens + new_tokens > b.max_seq:
        raise UserError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the bundle's max_seq {b.max_seq}: "
                        "lower --prompt-tokens or --new-tokens")
    say = progress or (lambda msg: None)
    # the baselines are exported like the bundle's program: its cache dtype, its tokens per call
    variant = ("" if b.kv_cache == "float32" else f"-kv{b.kv_cache}") + (
        "" if b.prefill_chunk == b.max_seq else f"-chunk{b.prefill_chunk}")
    kv_dtype = getattr(torch, b.kv_cache)
    base_path = (Path(baseline_pte) if baseline_pte
                 else baseline_cache_path(b.path, b.max_seq, f"8da4w-g{GROUP}{variant}"))
    base_info = None
    if not base_path.is_file():
        say(f"exporting the torchao 8da4w g{GROUP} XNNPACK baseline ({b.kv_cache} KV cache) to {base_path} ...")
        base_info = export_torchao_baseline(b.path / CHECKPOINT_DIR, base_path, b.max_seq, kv_dtype=kv_dtype,
                                            chunk=b.prefill_chunk)
    bare_path = (baseline_cache_path(b.path, b.max_seq, f"no-transforms-{b.activations}{variant}")
                 if without_transforms else None)
    if bare_path is not None and not bare_path.is_file():
        say(f"exporting the program without its online transforms to {bare_path} ...")
        export_without_transforms(b.path / CHECKPOINT_DIR, bare_path, b.max_seq, b.activations, kv_dtype,
                                  b.prefill_chunk)
    tok = b.tokenizer()
    ids = prompt_ids(tok, prompt_tokens)
    manifest = json.loads((b.path / CHECKPOINT_DIR / MANIFEST).read_text())
    if source is None:
        source = (manifest.get("source") or {}).get("model")
    ours_bits, base_bits = _decoder_bits(b.path), 4 + 16 / GROUP  # int4 + one bf16 scale per group (XNNPACK qb4w)

    if engine == "runner":
        runner = build_runner(host_target(), progress=progress)
        contenders = [_runner_contender(OURS, runner, b.pte, ids, new_tokens, ours_bits),
                      _runner_contender(BASELINE, runner, base_path, ids, new_tokens, base_bits)]
        if without_transforms:
            contenders.append(_runner_contender(BARE, runner, bare_path, ids, new_tokens, ours_bits))
        adapter_path = None  # read from the runner's output below
    else:
        contenders = [_python_contender(OURS, ETDecoder(b.pte, b.host_library()), ids, new_tokens, b.max_seq,
                                        ours_bits),
                      _python_contender(BASELINE, ETDecoder(base_path, None), ids, new_tokens, b.max_seq, base_bits)]
        if without_transforms:
            contenders.append(_python_contender(BARE, ETDecoder(bare_path, b.host_library()), ids, new_tokens,
                                                b.max_seq, ours_bits))
        adapter_path = _adapter_kernel_path(b.host_library())
    peers, peer_info = _llamacpp_contenders(source, gguf_kinds, tok, ids, new_tokens, progress)
    if "skipped" in peer_info:
        say(f"llama.cpp rows skipped: {peer_info['skipped']}")
    contenders += peers

    machine_before = _machine()
    runs: dict[tuple[str, int], list[dict]] = {(c.name, t): [] for c in contenders for t in threads}
    started = time.time()
    with tqdm(total=len(runs) * repeats, desc="decode race", disable=progress is None) as bar:
        for t in threads:
            for _ in range(repeats):
                for c in contenders:  # alternate: slow drifts of the machine hit every contender alike
                    runs[(c.name, t)].append(c.run(t))
                    bar.update(1)
    rows = [_summarize(c, t, runs[(c.name, t)]) for t in threads for c in contenders]
    by_key = {(r["name"], r["threads"]): r for r in rows}
    for r in rows:
        for ref, key in ((BASELINE, "vs_torchao"), (PEER_PREFIX + "Q4_0", "vs_llamacpp_q4_0")):
            other = by_key.get((ref, r["threads"]))
            r[key] = r["decode_tokens_per_s"] / other["decode_tokens_per_s"] if other else None
            r[key + "_best"] = r["best_decode_tokens_per_s"] / other["best_decode_tokens_per_s"] if other else None
        base = by_key[(BASELINE, r["threads"])]["tokens"]
        r["greedy_agreement_vs_torchao"] = sum(a == c for a, c in zip(r["tokens"], base)) / len(base)
    if adapter_path is None:
        adapter_path = next(run["kernel_path"] for run in runs[(OURS, threads[0])])
    machine = {**machine_before, "loadavg_after": list(os.getloadavg()),
               "kernel_path": {"vqmobile_cffi": kernels.active_path(), "vqmobile_adapter": adapter_path,
                               "llama_cpp": peer_info.get("versions", {}).get("system_info")}}
    return {
        "bundle": str(b.path), "engine": engine, "threads": threads, "repeats": repeats,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prompt_ids": ids, "kv_cache": b.kv_cache,
        "prefill_chunk": b.prefill_chunk,
        "baseline_pte": str(base_path), "baseline_export": base_info, "llama_cpp": peer_info,
        "rows": rows, "machine": machine, "versions": _versions(), "seconds": time.time() - started,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_table(r: dict) -> str:
    """The race as a text table, one row per (contender, threads), and the lines that say how to read it."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'contender':20s} {'thr':>3s} {'model file':34s} {'bits/w':>6s} {'file MB':>7s} {'prefill t/s':>11s} "
            f"{'decode t/s':>10s} {'peak RSS MB':>11s} {'vs torchao':>10s} {'vs Q4_0':>7s} {'best: vs torchao':>16s} "
            f"{'vs Q4_0':>7s}")
    lines = [head, "-" * len(head)]
    for row in r["rows"]:
        lines.append(f"{row['name']:20s} {row['threads']:3d} {Path(row['file']).name[-34:]:34s} "
                     f"{num(row['bits_per_weight'], '6.3f')} {row['file_bytes'] / 1e6:7.1f} "
                     f"{row['prefill_tokens_per_s']:11.1f} {row['decode_tokens_per_s']:10.2f} "
                     f"{num(row['peak_rss_mb'], '11.1f')} {num(row['vs_torchao'], '9.3f')}x "
                     f"{num(row['vs_llamacpp_q4_0'], '6.3f')}{'x' if row['vs_llamacpp_q4_0'] is not None else ' '} "
                     f"{num(row['vs_torchao_best'], '15.3f')}x "
                     f"{num(row['vs_llamacpp_q4_0_best'], '6.3f')}{'x' if row['vs_llamacpp_q4_0_best'] is not None else ' '}")
    m = r["machine"]
    lines.append(f"{r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, {r.get('kv_cache', 'float32')} "
                 f"KV cache and at most {r.get('prefill_chunk', 'max_seq')} tokens per call in both .pte, median of "
                 f"{r['repeats']} "
                 f"(one fresh process each, alternating), engine {r['engine']}; 'best:' the ratios of each "
                 f"contender's fastest process")
    lines.append(f"CPU {m['cpu']} ({', '.join(m['flags']) or 'no listed flags'}), load average "
                 f"{m['loadavg'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after")
    kp = m["kernel_path"]
    lines.append(f"vqmobile kernel path: {kp['vqmobile_adapter']} in the .pte's adapter library "
                 f"({kp['vqmobile_cffi']} in the Python module)")
    before = {row["runtime"]: row["rss_before_load_mb"] for row in r["rows"] if row["rss_before_load_mb"]}
    if before:
        lines.append("peak RSS is each process's own high-water mark; before loading the model: " + ", ".join(
            f"{k} {v:.1f} MB" for k, v in before.items()))
    peer = r["llama_cpp"]
    if "skipped" in peer:
        lines.append(f"llama.cpp rows skipped: {peer['skipped']}")
    else:
        lines.append(f"llama.cpp: llama-cpp-python {peer['versions']['llama_cpp_python']} (libllama "
                     f"{peer['versions']['libllama']}, ggml {peer['versions']['libggml']}); vocabulary vs the "
                     f"bundle's tokenizer: {peer['vocabulary']['summary']}")
        for kind, g in peer["gguf"].items():
            types = ", ".join(f"{role} {'/'.join(t)}" for role, t in g["tensor_types"].items()
                              if not role.endswith("norm"))
            lines.append(f"  {kind}: {types}")
    lines.append(f"bits/w: the decoder's linear layers, every scale included (torchao: int4 + a bf16 scale per "
                 f"{GROUP}, as XNNPACK stores it); baseline program {r['baseline_pte']}")
    return "\n".join(lines)
