"""vqmobile.export: deployable graphs of a vqmobile checkpoint (ExecuTorch .pte, ONNX) and their checks.

Functions for the CLI:
    export_bundle(model_spec, out, *, target, formats, overwrite=False, decompose=False, ...) -> dict
    check_bundle(bundle, *, windows, json_path=None) -> (ok, table_text, record)
    generate(bundle, prompt, max_new_tokens=64) -> dict(text, tokens_per_s, ...)
    bench_decode(model_spec, *, ...) -> dict   (ours vs torchao 8da4w g32 XNNPACK decode tokens/s)
    open_bundle(path) -> Bundle                (validates the manifest and every file's sha256)
"""

from __future__ import annotations

__all__ = ["export_bundle", "check_bundle", "generate", "bench_decode", "open_bundle"]


def __getattr__(name):  # lazy: importing vqmobile.export must not pull in executorch/onnx
    if name in ("export_bundle", "open_bundle"):
        from . import bundle

        return getattr(bundle, name)
    if name == "check_bundle":
        from .check import check_bundle

        return check_bundle
    if name == "generate":
        from .generation import generate

        return generate
    if name == "bench_decode":
        from .bench import bench_decode

        return bench_decode
    raise AttributeError(name)
