"""ExecuTorch export: torch.export of the static-KV-cache decoder, lowering with the XNNPACK partitioner, .pte.

The program has one method, ``forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, T, vocab]`` with
T dynamic in [1, chunk] (prefill: the prompt at input_pos 0, in calls of at most `chunk` tokens; decode: one token at
its position); the KV cache is a set of mutable buffers inside the program. The runtime plans memory for the largest
T, and the logits dominate it (a 49152-word vocabulary at T = 512 is 100 MB, touched when the program loads), so a
chunk well below max_seq is what keeps a decoding program small. Every op that is not ours goes to XNNPACK where it
can; the ``vqmobile::vq_linear`` / ``vqmobile::int_linear`` nodes stay custom ops (their ``.out`` variants) whose packed
weights are constants of the program, run by the adapter library in export/runtime/ (load it before the program).

``decompose=True`` traces the standard-op decompositions instead: a .pte any ExecuTorch runtime can run, slow and
with the weights still packed in the file but dequantized at every call.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch

from vqmobile import ops
from vqmobile.ops.hadamard import share_transforms

from .model import StaticDecoder


def _quiet():
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from executorch.exir._warnings import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)
    except Exception:  # pragma: no cover
        pass


def export_program(hf_model: torch.nn.Module, max_seq: int, *, chunk: int | None = None, decompose: bool = False,
                   wrapper: torch.nn.Module | None = None,
                   kv_dtype: torch.dtype = torch.float32) -> torch.export.ExportedProgram:
    """torch.export of the static-cache decoder (KV cache in kv_dtype) with a dynamic sequence length in
    [1, min(chunk, max_seq)] (chunk None: max_seq)."""
    module = wrapper if wrapper is not None else StaticDecoder(hf_model, max_seq, cache=True, kv_dtype=kv_dtype)
    module.eval()
    seq = torch.export.Dim("seq", min=1, max=min(chunk or max_seq, max_seq))
    example = (torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    ctx = ops.decomposed() if decompose else contextlib.nullcontext()
    with ctx, torch.no_grad():
        ep = torch.export.export(module, example, dynamic_shapes=({1: seq}, None), strict=False)
    share_transforms(ep.graph_module)  # incoherent linears reading one input share its Hadamard transform
    return ep


def _gelu_tanh_written_out(x: torch.Tensor, approximate: str = "none"):
    if approximate != "tanh":
        return NotImplemented  # the exact GELU stays one op (XNNPACK's is the exact one)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def lower_to_executorch(ep: torch.export.ExportedProgram, partitioners: list | None = None):
    """to_edge_transform_and_lower with XNNPACK (or the given partitioners), then to_executorch with bounded
    dynamic-shape memory planning.

    GELU's tanh approximation (Gemma) is written out in standard ops first: executorch 1.5.1's XNNPACK partitioner
    takes aten.gelu whatever its `approximate` and runs the exact (erf) GELU, which moved Gemma 3 270M's logits by
    0.1 against PyTorch (`vqmobile check`, float activations)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    _quiet()
    ep = ep.run_decompositions({torch.ops.aten.gelu.default: _gelu_tanh_written_out})
    edge = to_edge_transform_and_lower(
        ep, partitioner=partitioners or [XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
    )
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        run_reinplace_pass=True,  # the KV-cache index_put writes in place instead of copying the cache
    ))


def export_pte(hf_model: torch.nn.Module, path: str | Path, max_seq: int, *, chunk: int | None = None,
               decompose: bool = False, kv_dtype: torch.dtype = torch.float32) -> dict:
    """Write the .pte; returns facts about it (size, custom-op count, delegated partitions)."""
    ep = export_program(hf_model, max_seq, chunk=chunk, decompose=decompose, kv_dtype=kv_dtype)
    prog = lower_to_executorch(ep)
    data = prog.buffer
    Path(path).write_bytes(data)
    return {"bytes": len(data), **program_summary(prog)}


def program_summary(prog) -> dict:
    """Which operators the lowered program runs outside delegates, and how many XNNPACK partitions it has."""
    counts: dict[str, int] = {}
    delegates = 0
    for node in prog.exported_program().graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "executorch_call_delegate" in name:
            delegates += 1
        elif "vqmobile" in name:
            counts[name] = counts.get(name, 0) + 1
    return {"custom_ops": counts, "xnnpack_partitions": delegates}
