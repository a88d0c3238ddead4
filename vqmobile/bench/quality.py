"""Quality benchmark: WikiText-2 perplexity, bits per weight, quantize time and peak memory for a list of methods on
one model, all in one run. Each row runs in its own process so its peak RSS is its own.

    python -m vqmobile.bench.quality --model smollm2 --rows fp gptq:bits=4,group=128 --json bench_results/quality.json

A full-test-set table takes hours on a small CPU: the JSON is rewritten after every row, and --resume keeps the rows
it already holds for the same settings (model, context, windows, calibration), so an interrupted run continues.

A row is `fp` or `METHOD:key=value,...` with METHOD in rtn, gptq, gptvq, quip, vptq and keys of that method's config
(gptvq takes GPTVQConfig.from_target's keywords, e.g. gptvq:preset=mobile or gptvq:bpv=2.25,vq_dim=4; vptq takes
VPTQConfig.from_preset's, e.g. vptq:preset=mobile or vptq:v=8,k=256,res_k=256; quip:bits=2). Every method takes
incoherence=hadamard (e.g. gptq:bits=3,group=128,incoherence=hadamard) and the fine-tuning keys, e.g.
gptq:bits=2,group=128,finetune=layer.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from vqmobile import atomic


def _run_child(cmd: list[str]) -> tuple[int, str]:
    """Run a row's process and return (exit status, its stdout). The row ends with this process: a SIGTERM here (a
    killed benchmark) or Ctrl-C terminates it too, instead of leaving an hour of work whose result goes nowhere."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        out, _ = proc.communicate()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    return proc.returncode, out


def _parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return None if v.lower() == "none" else v


def make_config(row: str):
    from ..quantizers.gptq import GPTQConfig
    from ..quantizers.rtn import RTNConfig

    method, _, rest = row.partition(":")
    kwargs = {k: _parse_value(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    if method == "rtn":
        return RTNConfig(**kwargs)
    if method == "gptq":
        return GPTQConfig(**kwargs)
    if method == "gptvq":
        from ..quantizers.gptvq import GPTVQConfig

        return GPTVQConfig.from_target(**kwargs)
    if method == "quip":
        from ..quantizers.quip import QuIPConfig

        return QuIPConfig(**kwargs)
    if method == "vptq":
        from ..quantizers.vptq import VPTQConfig

        return VPTQConfig.from_preset(**kwargs)
    raise SystemExit(f"unknown row {row!r}: use fp or rtn:/gptq:/gptvq:/quip:/vptq: with key=value options")


def run_row(args: argparse.Namespace) -> dict:
    """One row, in this process: load, quantize (unless fp), evaluate."""
    import torch

    from ..data import calibration_data
    from ..evaluate import perplexity
    from ..data import wikitext_test_ids
    from ..model import load_model
    from ..pipeline import peak_rss_mb, quantize_
    from ..checkpoint import quantized_modules
    from ..formats.base import distinct_bytes

    torch.manual_seed(0)
    loaded = load_model(args.model)
    record: dict = {"row": args.row, "model": args.model}
    if args.row != "fp":
        config = make_config(args.row)
        calib = calibration_data(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
        rep = quantize_(loaded.model, config, calib, progress=True)
        mods = quantized_modules(loaded.model).values()
        nbytes = distinct_bytes(m.qweight for m in mods)
        nweights = sum(m.qweight.shape[0] * m.qweight.shape[1] for m in mods)
        record.update(config=config.to_dict(), bpw=8 * nbytes / nweights, quantize_s=rep.seconds,
                      quantize_peak_rss_mb=rep.peak_rss_mb, calibration=f"{args.nsamples}x{args.seqlen}",
                      finetune=rep.finetune)
    else:
        record.update(bpw=32.0, quantize_s=0.0)
    ids = wikitext_test_ids(loaded.tokenizer)
    ppl = perplexity(loaded.model, ids, args.ctx, args.windows, progress=True)
    record.update(ppl=ppl.ppl, ctx=ppl.ctx, windows=ppl.windows, total_windows=ppl.total_windows,
                  eval_s=ppl.seconds, peak_rss_mb=peak_rss_mb())
    return record


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model every row starts from (default smollm2)")
    p.add_argument("--rows", nargs="+", default=["fp", "rtn:bits=4,group=128", "gptq:bits=4,group=128"],
                   help="fp or METHOD:key=value,... (default: fp rtn:bits=4,group=128 gptq:bits=4,group=128)")
    p.add_argument("--ctx", type=int, default=2048, help="evaluation context length (default 2048)")
    p.add_argument("--windows", type=int, default=None, help="first N windows only (default: all)")
    p.add_argument("--calib", default=None, help="calibration text file (default: WikiText-2 validation)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration windows (default 0)")
    p.add_argument("--json", default="bench_results/quality.json",
                   help="results file, rewritten after every row (default bench_results/quality.json)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows --json already holds for the same settings instead of re-running them "
                        "(with every row kept, this only redraws the table and the --plot)")
    p.add_argument("--plot", help="also draw perplexity against stored bits per weight to this image (.png, .svg, "
                                  ".pdf): log scale, one series per method, the fp line")


def _settings(args: argparse.Namespace) -> dict:
    """What a row's numbers depend on besides the row itself."""
    return {"model": args.model, "ctx": args.ctx, "windows": args.windows, "calib": args.calib,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}


def _previous_rows(out: Path, settings: dict) -> dict[str, dict]:
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("settings") != settings:
        return {}
    return {r["row"]: r for r in old.get("rows", [])}


def _print_table(records: list[dict]) -> None:
    fp = next((r["ppl"] for r in records if r["row"] == "fp"), None)
    # "quant MB" is the peak up to the end of quantization, "peak MB" the whole row's, evaluation included.
    print(f"{'row':42s} {'bpw':>7s} {'ppl':>9s} {'vs fp':>7s} {'windows':>9s} {'quant s':>8s} {'quant MB':>8s} "
          f"{'peak MB':>8s}")
    for r in records:
        rel = f"{r['ppl'] / fp:6.3f}x" if fp else "      -"
        qmb = r.get("quantize_peak_rss_mb")
        print(f"{r['row']:42s} {r['bpw']:7.3f} {r['ppl']:9.3f} {rel:>7s} {r['windows']:>4d}/{r['total_windows']:<4d} "
              f"{r['quantize_s']:8.1f} {'-' if qmb is None else f'{qmb:.0f}':>8s} {r['peak_rss_mb']:8.0f}")


def _write(out: Path, settings: dict, records: list[dict]) -> None:
    atomic.write_json(out, {"date": time.strftime("%Y-%m-%d"), "settings": settings, "rows": records})


def _label(record: dict) -> str:
    """A point's short name on the chart: the geometry of a GPTVQ row, bits and group of an integer one."""
    c = record.get("config") or {}
    if "vq_dim" in c:
        return f"{c['vq_dim']}D k={c['k']} {c['rows_per_block']}x{c['cols_per_block']}"
    if "bits" in c:
        return f"{c['bits']}b g{c['group']}" + (" sym" if c.get("symmetric") else "")
    return record["row"].partition(":")[2]


def plot(records: list[dict], settings: dict, path: str | Path) -> None:
    """Perplexity (log scale) against stored bits per weight: one series per method, fp as a horizontal line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    methods: dict[str, list[dict]] = {}
    for r in records:
        if r["row"] != "fp" and r.get("ppl") is not None and r["ppl"] == r["ppl"]:
            methods.setdefault(r["row"].partition(":")[0], []).append(r)
    for marker, (method, rows) in zip("osD^v<>p*h", methods.items()):
        rows = sorted(rows, key=lambda r: r["bpw"])
        ax.plot([r["bpw"] for r in rows], [r["ppl"] for r in rows], marker=marker, linewidth=1, label=method)
        for r in rows:
            ax.annotate(_label(r), (r["bpw"], r["ppl"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    fp = next((r["ppl"] for r in records if r["row"] == "fp"), None)
    if fp is not None:
        ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"fp32 ({fp:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (every byte of the quantized linears)")
    ax.set_ylabel("perplexity (log scale)")
    windows = settings.get("windows") or "all"
    ax.set_title(f"{Path(str(settings['model'])).name}: WikiText-2 test, context {settings['ctx']}, {windows} windows; "
                 f"calibration {settings['nsamples']}x{settings['seqlen']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, dpi=130))


def run(args: argparse.Namespace) -> int:
    records = []
    out = Path(args.json)
    atomic.check_output(out, overwrite=True, folder=False, option="--json")
    if args.plot:  # before hours of rows, not after
        atomic.check_output(args.plot, overwrite=True, folder=False, option="--plot")
        import matplotlib  # noqa: F401  (a missing dependency fails now too)
    settings = _settings(args)
    previous = _previous_rows(out, settings) if args.resume else {}
    for row in args.rows:
        if row in previous:
            records.append(previous[row])
            print(f"{row}: kept from {out} (measured {previous[row].get('date', '?')})", flush=True)
            continue
        cmd = [sys.executable, "-m", "vqmobile.bench.quality", "--one-row", row, "--model", args.model,
               "--ctx", str(args.ctx), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--seed", str(args.seed)]
        if args.windows:
            cmd += ["--windows", str(args.windows)]
        if args.calib:
            cmd += ["--calib", args.calib]
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {row}: quantizing and evaluating (progress below)", flush=True)
        # the row's progress bars and errors go straight to our stderr: a row runs for an hour
        status, stdout = _run_child(cmd)
        if status != 0:
            print(f"row {row} failed (exit status {status}; its error is above)", file=sys.stderr)
            continue
        record = {**json.loads(stdout.strip().splitlines()[-1]), "date": time.strftime("%Y-%m-%d"),
                  "row_wall_s": round(time.time() - t0, 1)}
        records.append(record)
        print(f"[{time.strftime('%H:%M:%S')}] {row}: ppl {record['ppl']:.3f}, bpw {record['bpw']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
        _write(out, settings, records)
    # Once more at the end: rows kept after the last measured one must reach the file too.
    _write(out, settings, records)
    _print_table(records)
    print(f"wrote {out}")
    if args.plot:
        plot(records, settings, args.plot)
        print(f"wrote {args.plot}")
    return 0 if len(records) == len(args.rows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--one-row", dest="row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(args)))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
