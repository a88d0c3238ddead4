"""The `vqmobile` command line: a thin layer over vqmobile.api. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import atomic
from .quantizers import gptvq, vptq
from .quantizers.base import FINETUNE, QuantConfig
from .errors import UserError


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", help="calibration text file (default: WikiText-2 validation tokens from shared/)")
    g.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows and any method randomness")


def _add_int_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("integer methods (rtn, gptq)")
    g.add_argument("--bits", type=int, default=4, help="bits per weight code: 2..8 (default 4)")
    g.add_argument("--group", type=int, default=128, help="group size along the input: 16..1024, 0 = per-channel (default 128)")
    g.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    g.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in decreasing Hessian-diagonal order")
    g.add_argument("--clip-search", action="store_true",
                   help="shrink each group's range to the clipping that minimizes rounding error (slower)")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (any method)")
    g.add_argument("--finetune", choices=FINETUNE, default="none",
                   help="after quantizing: Adam on the continuous quantization parameters (codebooks, scales) and "
                        "norm weights, indices fixed; layer: each decoder layer towards the float layer's outputs; "
                        "model: the whole model towards the float logits (KL)")
    g.add_argument("--finetune-lr", type=float, default=QuantConfig.finetune_lr,
                   help=f"Adam step size relative to each parameter's RMS (default {QuantConfig.finetune_lr:g})")
    g.add_argument("--finetune-epochs", type=int, default=QuantConfig.finetune_epochs,
                   help=f"passes over the training sequences (default {QuantConfig.finetune_epochs})")
    g.add_argument("--finetune-samples", type=int, default=QuantConfig.finetune_samples,
                   help=f"calibration sequences to train on, 0 = all (default {QuantConfig.finetune_samples})")


def build_config(args: argparse.Namespace):
    from .quantizers.gptq import GPTQConfig
    from .quantizers.rtn import RTNConfig

    if args.method == "rtn":
        config = RTNConfig(bits=args.bits, group=args.group, symmetric=args.symmetric, clip_search=args.clip_search,
                           embedding=args.embedding)
    elif args.method == "gptq":
        config = GPTQConfig(bits=args.bits, group=args.group, symmetric=args.symmetric, act_order=args.act_order,
                            clip_search=args.clip_search, embedding=args.embedding)
    elif args.method == "gptvq":
        config = gptvq.config_from_args(args)
    elif args.method == "vptq":
        config = vptq.config_from_args(args, embedding=args.embedding, seed=args.seed)
    else:
        raise UserError(f"unknown method {args.method}")
    return dataclasses.replace(config, finetune=args.finetune, finetune_lr=args.finetune_lr,
                               finetune_epochs=args.finetune_epochs, finetune_samples=args.finetune_samples)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .model import prepare_default_model

    path = prepare_default_model()
    print(f"default model SmolLM2-135M-Instruct is in {path}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .api import CalibrationSpec, evaluate, quantize
    from .checkpoint import load

    config = build_config(args)
    calib = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
    res = quantize(args.model, config, args.out, calib, overwrite=args.overwrite, progress=not args.quiet)
    m = res.manifest
    emb = m["embedding"]
    emb_text = "" if emb is None else (f" + {emb['bytes'] / 1e6:.2f} MB int8 embedding"
                                       f"{' (also the head)' if emb['tied_head'] else ''}, max |error| "
                                       f"{res.report.embedding_max_abs_error:.3g}")
    print(f"wrote {res.out}: {m['method']} checkpoint, {len(m['layers'])} quantized linears, "
          f"{m['bits_per_weight']:.4f} bits per weight (every overhead included), "
          f"{m['quantized_bytes'] / 1e6:.2f} MB packed{emb_text} + {m['float_bytes'] / 1e6:.2f} MB float; "
          f"quantized in {res.report.seconds:.1f} s, peak RSS {res.report.peak_rss_mb:.0f} MB")
    layers = [r for r in res.report.finetune if r["scope"] != "model"]
    if layers:
        print(f"fine-tuned {len(layers)} decoder layers ({sum(r['kept'] for r in layers)} improved): mean relative "
              f"output error {sum(r['loss_before'] for r in layers) / len(layers):.4g} -> "
              f"{sum(r['loss_after'] for r in layers) / len(layers):.4g} in {sum(r['seconds'] for r in layers):.0f} s")
    for r in res.report.finetune:
        if r["scope"] == "model":
            print(f"fine-tuned the model: KL to the float logits {r['loss_before']:.4g} -> {r['loss_after']:.4g} "
                  f"({r['steps']} steps, {r['seconds']:.0f} s{'' if r['kept'] else ', not kept: no improvement'})")
    if args.eval_windows:
        ck = load(res.out)
        print(evaluate(ck.model, ck.tokenizer, windows=args.eval_windows, progress=not args.quiet))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
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


def cmd_export(args: argparse.Namespace) -> int:
    from .api import CalibrationSpec
    from .export import export_bundle

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    calib = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
    res = export_bundle(args.model, args.out, target=args.target, formats=formats, overwrite=args.overwrite,
                        decompose=args.decompose, calibration=calib, activations=args.activations,
                        progress=None if args.quiet else print)
    for w in res.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    size = sum(f["bytes"] for f in res["files"].values())
    print(f"wrote bundle {res['out']} for {args.target}: {', '.join(sorted(res['files']))} "
          f"({size / 1e6:.1f} MB, {res['bits_per_weight']:.4f} bits per weight in the quantized layers)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .export import check_bundle

    ok, table, _record = check_bundle(args.bundle, windows=args.windows, json_path=args.json,
                                      progress=None if args.quiet else print)
    print(table)
    if args.json:
        print(f"wrote {args.json}")
    print("check passed" if ok else "check FAILED: a runtime disagrees with PyTorch beyond the tolerance")
    return 0 if ok else 1


def cmd_generate(args: argparse.Namespace) -> int:
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

    r = bench_decode(args.bundle, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
                     engine=args.engine, progress=None if args.quiet else print)
    print(f"{'program':24s} {'tokens/s':>9s} {'pte MB':>8s}")
    for name, tps in r["median_tokens_per_s"].items():
        print(f"{name:24s} {tps:9.2f} {r['pte_bytes'][name] / 1e6:8.1f}")
    print(f"speedup vqmobile / torchao 8da4w g32: {r['speedup']:.3f}x (median of {r['repeats']}, "
          f"{r['decode_tokens']} decode tokens, engine {r['engine']}, threads {r['threads']})")
    atomic.write_json(args.json, r)
    print(f"wrote {args.json}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqmobile", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="fetch the default model (SmolLM2-135M-Instruct) into the cache, once")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("quantize", help="quantize a model into a packed checkpoint")
    p.add_argument("model", help="Hugging Face model directory, .gguf file, or 'smollm2'")
    p.add_argument("--method", choices=["rtn", "gptq", "gptvq", "vptq"], required=True)
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    p.add_argument("--eval-windows", type=int, default=0, help="afterwards, WikiText-2 perplexity over this many windows")
    p.add_argument("--embedding", choices=["int8", "float"], default="int8",
                   help="token embedding (and a head tied to it): int8 groups of 32, lossless for a Q8_0 GGUF "
                        "(default), or float as loaded")
    _add_int_args(p)
    gptvq.add_cli_arguments(p)
    vptq.add_cli_arguments(p)
    _add_finetune_args(p)
    _add_calibration_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="WikiText-2 test perplexity of a model or checkpoint")
    p.add_argument("model", help="checkpoint directory, Hugging Face model directory, .gguf file, or 'smollm2'")
    p.add_argument("--ctx", type=int, help="context length (default: min(2048, the model's maximum))")
    p.add_argument("--windows", type=int, help="evaluate only the first N windows (default: all)")
    p.add_argument("--data", help="raw text file to evaluate (default: WikiText-2 test from shared/)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint (or a float model, quantized with the mobile recipe first) "
                                      "to an ExecuTorch + ONNX bundle")
    p.add_argument("model", help="vqmobile checkpoint, Hugging Face model directory, .gguf file, or 'smollm2'")
    p.add_argument("--target", choices=["arm64", "x86_64"], required=True)
    p.add_argument("--format", default="executorch,onnx", help="comma-separated: executorch, onnx (default both)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--decompose", action="store_true",
                   help="export quantized layers as standard ops (portable, slow; no kernel library needed)")
    p.add_argument("--activations", choices=["float", "int8"], default="float",
                   help="activations of the .pte's quantized linears: int8 per block with integer dot products "
                        "(the fast mode) or float (default, exact); the ONNX file always uses float")
    _add_calibration_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="run a bundle in onnxruntime and ExecuTorch and compare with PyTorch")
    p.add_argument("bundle")
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 windows for the perplexity comparison")
    p.add_argument("--json", help="write the comparison as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="greedy decoding through the bundle's ExecuTorch program")
    p.add_argument("bundle")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
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
    bp = bench_sub.add_parser("decode", help="ExecuTorch decode tokens/s of a bundle vs the same model exported with "
                                             "torchao 8da4w g32 + XNNPACK, in one run")
    bp.add_argument("bundle")
    bp.add_argument("--new-tokens", type=int, default=64)
    bp.add_argument("--repeats", type=int, default=3)
    bp.add_argument("--threads", type=int, default=None)
    bp.add_argument("--engine", default="python",  # bench_decode validates it against its ENGINES
                    help="python: the ExecuTorch Python runtime; runner: the C++ benchmark runner (android_demo)")
    bp.add_argument("--json", default="bench_results/decode.json")
    bp.set_defaults(func=cmd_bench_decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        from .kernels import check_env_path

        check_env_path()
        return args.func(args)
    except UserError as e:
        print(f"vqmobile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vqmobile: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
