"""`vqmobile check BUNDLE`: do the exported graphs compute what the quantized PyTorch model computes?

On the first N windows of the WikiText-2 test stream (context = the bundle's max_seq), each runtime's logits are
compared with those of the PyTorch quantized model (the bundle's checkpoint, loaded with vqmobile.load) run with
the same activation semantics (float for the ONNX file; the bundle's `activations` for the .pte):

- onnxruntime runs model.onnx (stateless, whole window);
- the ExecuTorch runtime runs model.pte (host target) with the adapter library loaded: prefill of the window at
  position 0 through the static KV cache;
- per runtime: max |logit difference|, top-1 (argmax) agreement over all positions, and perplexity.

Tolerances (documented; a runtime outside any of them fails the check and the command exits non-zero):
  max |delta logit| <= MAX_ABS_LOGIT (float32 reorderings between kernels give ~1e-4 on these models),
  top-1 agreement >= MIN_TOP1, |ppl / ppl_pytorch - 1| <= MAX_PPL_REL (0.5 %).
With int8 activations the max |delta logit| is reported but not gated: rounding an activation to int8 is
discontinuous, so a float32 reordering upstream (XNNPACK's norm or attention versus PyTorch's) that lands on a
rounding boundary moves a code by one step, and such steps add up through the layers (about 0.5 on stories260k,
whose int8 and float logits differ by as much). Top-1 agreement and perplexity stay gated.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from vqmobile import atomic

from .bundle import CHECKPOINT_DIR, open_bundle

MAX_ABS_LOGIT = 1e-2
MIN_TOP1 = 0.99
MAX_PPL_REL = 0.005


def _stats(name: str, logits: list[torch.Tensor], ref: list[torch.Tensor], windows: list[torch.Tensor],
           seconds: float) -> dict[str, Any]:
    max_abs, agree, total, nll = 0.0, 0, 0, 0.0
    for lg, rf, w in zip(logits, ref, windows):
        lg, rf = lg.float().reshape(rf.shape), rf.float()
        max_abs = max(max_abs, float((lg - rf).abs().max()))
        agree += int((lg.argmax(-1) == rf.argmax(-1)).sum())
        total += rf.shape[0]
        nll += float(F.cross_entropy(lg[:-1], w[1:], reduction="sum"))
    count = sum(w.numel() - 1 for w in windows)
    return {"runtime": name, "max_abs_logit_diff": max_abs, "top1_agreement": agree / total,
            "ppl": math.exp(nll / count), "seconds": seconds}


def _format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'runtime':<40} {'max|dlogit|':>12} {'top-1 agree':>12} {'perplexity':>11} {'d ppl':>9} {'time s':>8}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        dppl = "" if r.get("ppl_rel_diff") is None else f"{100 * r['ppl_rel_diff']:+.4f}%"
        mad = "" if r["runtime"].startswith("pytorch") else f"{r['max_abs_logit_diff']:.2e}"
        top1 = "" if r["runtime"].startswith("pytorch") else f"{100 * r['top1_agreement']:.2f}%"
        lines.append(f"{r['runtime']:<40} {mad:>12} {top1:>12} {r['ppl']:>11.4f} {dppl:>9} {r['seconds']:>8.1f}  "
                     f"{r.get('status', '')}")
    return "\n".join(lines)


@torch.no_grad()
def check_bundle(bundle: str, *, windows: int, json_path: str | None = None, data: str | None = None,
                 progress=None) -> tuple[bool, str, dict]:
    """Run the bundle's graphs in onnxruntime and ExecuTorch against the PyTorch quantized model.
    Returns (ok, table_text, record); writes the record as JSON to json_path when given."""
    from vqmobile.checkpoint import load
    from vqmobile.data import wikitext_test_ids
    from vqmobile.errors import UserError
    from vqmobile.layers import set_activations

    if windows < 1:
        raise UserError(f"--windows {windows} must be at least 1")
    b = open_bundle(bundle)
    ctx = b.max_seq
    ck = load(b.path / CHECKPOINT_DIR)
    model = ck.model
    ids = wikitext_test_ids(ck.tokenizer, data)
    total = ids.numel() // ctx
    if total < 1:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {ctx}")
    n = min(windows, total)
    wins = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]

    # Each runtime is compared with the PyTorch model run with the same activation semantics: the ONNX functions
    # define float activations, the .pte those it was exported with (bundle manifest).
    refs: dict[str, dict] = {}

    def reference(mode: str) -> dict:
        if mode not in refs:
            set_activations(model, mode)
            t = time.perf_counter()
            logits = [model(input_ids=w[None], use_cache=False).logits[0].float() for w in wins]
            row = _stats(f"pytorch (quantized, {mode} activations)", logits, logits, wins, time.perf_counter() - t)
            row["activations"] = mode
            refs[mode] = {"logits": logits, "row": row}
            row["status"], row["ppl_rel_diff"] = "reference", 0.0
            rows.append(row)
        return refs[mode]

    rows: list[dict[str, Any]] = []
    if b.onnx is not None:
        from .onnx_export import ort_session

        ref = reference("float")
        sess = ort_session(b.onnx)
        t = time.perf_counter()
        out = [torch.from_numpy(sess.run(None, {"input_ids": w[None].numpy()})[0][0]) for w in wins]
        rows.append(_stats("onnxruntime", out, ref["logits"], wins, time.perf_counter() - t)
                    | {"reference": ref, "activations": "float"})
        del sess
    if b.pte is not None:
        from .et_runtime import ETDecoder

        ref = reference(b.activations)
        lib = b.host_library(progress=progress)
        dec = ETDecoder(b.pte, lib)
        t = time.perf_counter()
        out = [dec(w[None], 0)[0] for w in wins]
        name = "executorch" + (" (decomposed)" if b.manifest.get("decomposed") else "")
        rows.append(_stats(name, out, ref["logits"], wins, time.perf_counter() - t)
                    | {"reference": ref, "activations": b.activations})
    ok = True
    for r in rows:
        ref = r.pop("reference", None)
        if ref is None:
            continue
        r["reference"] = ref["row"]["runtime"]
        r["ppl_rel_diff"] = r["ppl"] / ref["row"]["ppl"] - 1.0
        fails = []
        if r["activations"] == "float" and not r["max_abs_logit_diff"] <= MAX_ABS_LOGIT:
            fails.append(f"max|dlogit| > {MAX_ABS_LOGIT:g}")
        if not r["top1_agreement"] >= MIN_TOP1:
            fails.append(f"top-1 < {100 * MIN_TOP1:g}%")
        if not abs(r["ppl_rel_diff"]) <= MAX_PPL_REL:
            fails.append(f"|d ppl| > {100 * MAX_PPL_REL:g}%")
        r["status"] = "ok" if not fails else "FAIL: " + ", ".join(fails)
        ok = ok and not fails
    title = (f"{b.path.name}: {b.manifest.get('method')} {b.manifest.get('bits_per_weight', 0):.4f} bpw, target "
             f"{b.target}; WikiText-2 test, {n} window(s) of {ctx} tokens")
    table = title + "\n" + _format_table(rows)
    record = {
        "bundle": str(b.path), "ok": ok, "windows": n, "ctx": ctx, "target": b.target,
        "bits_per_weight": b.manifest.get("bits_per_weight"), "method": b.manifest.get("method"),
        "tolerances": {"max_abs_logit_diff": MAX_ABS_LOGIT, "min_top1_agreement": MIN_TOP1,
                       "max_ppl_rel_diff": MAX_PPL_REL},
        "rows": rows,
    }
    if json_path:
        atomic.write_json(json_path, record)
    return ok, table, record
