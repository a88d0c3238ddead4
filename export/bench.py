"""Decode speed: our .pte (vqmobile kernels) versus the same model exported with ExecuTorch's own 4-bit path.

The baseline takes the bundle's checkpoint, turns every quantized linear back into a float nn.Linear holding its
dequantized weight (the same model), quantizes the decoder's linears with torchao
Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32)) (what ExecuTorch's Llama export calls 8da4w, group 32),
and lowers the same static-KV-cache decoder with the XNNPACK partitioners (dynamically quantized + fp32): the KV
cache and attention are identical in both programs. The lm_head follows the checkpoint: when it is quantized (the
int8 embedding it is tied to, the default) the baseline runs it with the same 8da4w g32 path as its other linears
(4 bits against our 8: the comparison favours the baseline); a float head runs in fp32 in both (ours with
vqmobile::dense_linear, so the .pte stores the embedding once, the baseline with XNNPACK).

Both programs run alternately in the same run, greedy decoding the same prompt: in one Python process (engine
'python'), or each repeat in its own process of the C++ benchmark runner (engine 'runner', android_demo/runner), which
leaves Python's per-step overhead out. tokens/s counts decode steps only (one token per call through the KV cache),
median over the repeats.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from vqmobile.errors import UserError
from vqmobile.threads import num_threads

from .bundle import CHECKPOINT_DIR, open_bundle
from .et_runtime import ETDecoder, adapter_threads, greedy, portable_lib, set_adapter_threads
from .runtime.build import build_runner, host_target


def dense_copy(model: nn.Module) -> nn.Module:
    """The model with every QuantLinear replaced by an nn.Linear holding its dequantized weight, and a quantized
    embedding by an nn.Embedding (a head tied to it shares that weight, as in the float model)."""
    from vqmobile.embedding import QuantEmbedding
    from vqmobile.layers import QuantLinear

    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        dense = nn.Embedding(emb.num_embeddings, emb.embedding_dim)
        dense.weight.data = emb.qweight.dequantize()
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


def export_torchao_baseline(checkpoint: str | Path, out: str | Path, max_seq: int, group: int = 32) -> dict:
    """Write the 8da4w (torchao int8 dynamic activations, int4 weights, group `group`) XNNPACK .pte of a vqmobile
    checkpoint (its dequantized weights) or of a float model spec."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner, XnnpackPartitioner)
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from vqmobile.checkpoint import is_checkpoint, load
    from vqmobile.model import load_model
    from vqmobile.layers import QuantLinear

    from .executorch_export import export_program, lower_to_executorch, program_summary
    from .model import StaticLlama

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
    wrapper = StaticLlama(model, max_seq, cache=True, tied_head_op=False)
    ep = export_program(model, max_seq, wrapper=wrapper)
    prog = lower_to_executorch(ep, [XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()])
    Path(out).write_bytes(prog.buffer)
    return {"bytes": len(prog.buffer), **program_summary(prog)}


def export_without_transforms(checkpoint: str | Path, out: str | Path, max_seq: int, activations: str = "float"
                              ) -> dict:
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
    prog = lower_to_executorch(export_program(model, max_seq))
    Path(out).write_bytes(prog.buffer)
    return {"bytes": len(prog.buffer), "layers_without_transforms": stripped, **program_summary(prog)}


ENGINES = ("python", "runner")
BASELINES = {"torchao": "torchao_8da4w_g32", "no-transforms": "vqmobile_no_transforms"}


def bench_decode(bundle: str, *, baseline_pte: str | None = None, prompt: str = "Once upon a time, there was",
                 new_tokens: int = 64, repeats: int = 3, threads: int | None = None, engine: str = "python",
                 baseline: str = "torchao", progress=print) -> dict:
    """Decode tokens/s of the bundle's .pte versus a baseline program: the torchao 8da4w g32 XNNPACK .pte of the same
    model (baseline 'torchao'), or the bundle's own model without the online Hadamard transforms of its incoherent
    layers ('no-transforms': what those transforms cost).

    baseline_pte: where the baseline program is (re)used; exported there first when it does not exist
    (default: beside the bundle). threads: kernel and XNNPACK threads (default: all).
    engine: 'python' drives both programs from the ExecuTorch Python runtime; 'runner' runs each in the C++
    benchmark runner (android_demo/runner, built for the host), one process per repeat, without Python's overhead."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if baseline not in BASELINES:
        raise UserError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)}")
    from vqmobile import kernels

    b = open_bundle(bundle)
    if b.pte is None:
        raise ValueError("the bundle has no ExecuTorch program")
    base_name = BASELINES[baseline]
    suffix = "baseline_8da4w_g32" if baseline == "torchao" else "no_transforms"
    base_path = Path(baseline_pte) if baseline_pte else b.path.parent / f"{b.path.name}.{suffix}.pte"
    base_info = None
    if not base_path.is_file():
        if baseline == "torchao":
            if progress:
                progress(f"exporting the torchao 8da4w g32 XNNPACK baseline to {base_path} ...")
            base_info = export_torchao_baseline(b.path / CHECKPOINT_DIR, base_path, b.max_seq)
        else:
            if progress:
                progress(f"exporting the program without its online transforms to {base_path} ...")
            base_info = export_without_transforms(b.path / CHECKPOINT_DIR, base_path, b.max_seq, b.activations)
    tok = b.tokenizer()
    ids = tok(prompt, return_tensors="pt").input_ids[0]
    budget = min(new_tokens, b.max_seq - ids.numel())
    if engine == "runner":
        runner = build_runner(host_target(), progress=progress)
        programs = {"vqmobile": _runner_decode(runner, b.pte, ids, budget, threads),
                    base_name: _runner_decode(runner, base_path, ids, budget, threads)}
        thread_info: dict = {"runner": threads or "all"}
    else:
        pl = portable_lib()
        if threads:
            kernels.set_num_threads(threads)
            pl._unsafe_reset_threadpool(threads)
        ours = ETDecoder(b.pte, b.host_library())
        if threads:
            set_adapter_threads(threads)
        base = ETDecoder(base_path, None)

        def python_decode(dec):
            def run():
                res = greedy(dec, ids, budget, b.max_seq, None)
                return res["tokens_per_s"], res["new_tokens"]
            return run

        programs = {"vqmobile": python_decode(ours), base_name: python_decode(base)}
        thread_info = {"vqmobile_kernels": adapter_threads(), "xnnpack": pl._threadpool_get_thread_count()}
    runs: dict[str, list[float]] = {name: [] for name in programs}
    tokens = {}
    # ops on torch's OpenMP pool during the loop leave its idle workers spinning on the other cores (a profile of
    # 1-thread decoding showed them), which a 1-thread comparison must not have
    with num_threads(threads) if threads else contextlib.nullcontext():
        for _ in range(repeats):
            for name, run in programs.items():
                tps, tokens[name] = run()
                runs[name].append(tps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    agree = sum(a == c for a, c in zip(tokens["vqmobile"], tokens[base_name]))
    return {
        "bundle": str(b.path), "baseline_pte": str(base_path), "baseline_export": base_info,
        "baseline": baseline, "baseline_name": base_name,
        "pte_bytes": {"vqmobile": b.pte.stat().st_size, base_name: base_path.stat().st_size},
        "bits_per_weight": b.manifest.get("bits_per_weight"), "prompt_tokens": int(ids.numel()),
        "decode_tokens": budget, "repeats": repeats,
        "engine": engine, "threads": thread_info,
        "tokens_per_s": runs, "median_tokens_per_s": med,
        "speedup": med["vqmobile"] / med[base_name],
        "greedy_token_agreement": agree / max(1, budget),
        "machine": _machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _runner_decode(runner: Path, pte: Path, ids, budget: int, threads: int | None):
    """One greedy decode of `pte` in the C++ runner per call: (decode tokens/s, new tokens)."""
    def run():
        with tempfile.TemporaryDirectory(prefix="vqm-runner-") as tmp:
            out = Path(tmp) / "r.json"
            cmd = [str(runner), str(pte), "--tokens", ",".join(str(int(t)) for t in ids), "--new-tokens",
                   str(max(1, budget)), "--repeats", "1", "--json", str(out)]
            if threads:
                cmd += ["--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"the benchmark runner failed on {pte}: {res.stderr.strip().splitlines()[-1:]}")
            r = json.loads(out.read_text())
        return r["decode_tokens_per_s_median"], r["tokens"]
    return run


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
