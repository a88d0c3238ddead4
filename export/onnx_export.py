"""ONNX export: the decoder (stateless: ``input_ids int64 [1, T] -> logits float32 [1, T, vocab]``, T dynamic) with
every quantized linear as one node of the custom domain ``vqmobile``:

    vqmobile.VQLinear(x, indices uint8, codebook int8, codebook_scale fp16, bias float) -> y
        attributes n, k, d, rows_per_block, cols_per_block, bits (index bits)
    vqmobile.IntLinear(x, codes uint8, scales fp16, zeros uint8, bias float) -> y
        attributes n, k, bits, group  (symmetric weights get zeros = 2^(bits-1) as a [1, groups] constant)
    vqmobile.E8PLinear2 / 3 / 4(x, codes uint8, scales float, bias float) -> y   attributes n, k (QuIP#)
    vqmobile.Hadamard / HadamardT(x, signs uint8, had int8) -> y   attributes m, p (incoherent weights)
    vqmobile.CVQLinear(x, indices uint8, codebook int8, codebook_scale fp16, col_scale fp16, perm int16,
                       res_indices uint8, res_codebook int8, res_scale fp16, bias float) -> y
        attributes n, k, v, outlier_cols, cols_per_group, bits, res_bits  (the column-vector VQ of VPTQ; without a
        residual stage: a zero [G, 1, v] codebook, zero scales and all-zero 1-bit indices made by ConstantOfShape, so
        the file stores nothing for it)

The packed tensors are the node's initializers, so the file keeps the weights compressed. The semantics of both ops
are given by ONNX model-local functions (BitShift / Gather / Reshape / MatMul ...), so stock onnxruntime runs the
file unmodified and a runtime with a native kernel can take the node instead. Layers without a bias get a zero bias.

Notes: the torch exporter (TorchScript-based, ``dynamo=False``, no onnxscript needed) emits the custom nodes through
registered symbolics; the functions are attached after export (the exporter would inline them). The file uses IR
version 13 (onnxruntime 1.31 reads <= 13) and passes ``onnx.checker.check_model(full_check=True)``. onnxruntime may
constant-fold the function bodies into dense float weights at session creation: the file stays compressed, the
session's memory does not (fine for accuracy checks; use a native kernel for deployment).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vqmobile import ops  # noqa: F401  (registers the operators)

from .model import StaticDecoder

DOMAIN = "vqmobile"
DOMAIN_VERSION = 1
OPSET = 18
IR_VERSION = 13

_registered = False


def _register_symbolics() -> None:
    global _registered
    if _registered:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx import symbolic_helper as sh

    def _typed(y, x, n: int):
        # The exporter cannot infer a custom node's output: without a type it warns once per node.
        sizes = sh._get_tensor_sizes(x)
        if sizes is not None:
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [n]))
        return y

    def _bias(g, bias, n):
        if sh._is_none(bias):
            return g.op("Constant", value_t=torch.zeros(n, dtype=torch.float32))
        return bias

    @sh.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "b")
    def vq_linear(g, x, indices, codebook, scale, bias, n, k, d, rpb, cpb, act_int8):
        _float_activations(act_int8)
        ncent = sh._get_tensor_sizes(codebook)[2]
        bits = max(1, (int(ncent) - 1).bit_length())
        return _typed(g.op(f"{DOMAIN}::VQLinear", x, indices, codebook, scale, _bias(g, bias, n), n_i=n, k_i=k,
                           d_i=d, rows_per_block_i=rpb, cols_per_block_i=cpb, bits_i=bits), x, n)

    @sh.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "b")
    def int_linear(g, x, codes, scales, zeros, bias, n, k, bits, group, act_int8):
        _float_activations(act_int8)
        if sh._is_none(zeros):
            ng = -(-k // group)
            zeros = g.op("Constant", value_t=torch.full((1, ng), 1 << (bits - 1), dtype=torch.uint8))
        return _typed(g.op(f"{DOMAIN}::IntLinear", x, codes, scales, zeros, _bias(g, bias, n), n_i=n, k_i=k,
                           bits_i=bits, group_i=group), x, n)

    @sh.parse_args("v", "v", "v")
    def dense_linear(g, x, weight, bias):  # standard ops: the initializer stays shared with the embedding
        y = g.op("MatMul", x, g.op("Transpose", weight, perm_i=[1, 0]))
        return y if sh._is_none(bias) else g.op("Add", y, bias)

    @sh.parse_args("v", "v", "v", "v", "i", "i", "b")
    def e8p_linear(g, x, codes, scales, bias, n, k, act_int8):
        _float_activations(act_int8)
        bits = int(sh._get_tensor_sizes(codes)[1])
        return _typed(g.op(f"{DOMAIN}::E8PLinear{bits}", x, codes, scales, _bias(g, bias, n), n_i=n, k_i=k), x, n)

    @sh.parse_args("v", "v", "v", "i", "i", "b")
    def hadamard(g, x, signs, had, m, p, transpose):
        y = g.op(f"{DOMAIN}::{'HadamardT' if transpose else 'Hadamard'}", x, signs, had, m_i=m, p_i=p)
        y.setType(x.type())
        return y

    @sh.parse_args("v", "v", "v", "v", "v", "v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "b")
    def cvq_linear(g, x, indices, codebook, scale, col_scale, perm, res_indices, res_codebook, res_scale, bias, n, k,
                   v, outlier_cols, cols_per_group, act_int8):
        _float_activations(act_int8)
        groups, ncent = (int(s) for s in sh._get_tensor_sizes(codebook)[:2])
        nv = -(-n // v)
        if sh._is_none(res_codebook):
            res_codebook = g.op("Constant", value_t=torch.zeros(groups, 1, v, dtype=torch.int8))
            res_scale = g.op("Constant", value_t=torch.zeros(groups, dtype=torch.float16))
            res_indices = g.op("ConstantOfShape", g.op("Constant", value_t=torch.tensor([nv, -(-k // 8)])),
                               value_t=torch.zeros(1, dtype=torch.uint8))
            res_bits = 1
        else:
            res_bits = max(1, (int(sh._get_tensor_sizes(res_codebook)[1]) - 1).bit_length())
        return _typed(g.op(f"{DOMAIN}::CVQLinear", x, indices, codebook, scale, col_scale, perm, res_indices,
                           res_codebook, res_scale, _bias(g, bias, n), n_i=n, k_i=k, v_i=v,
                           outlier_cols_i=outlier_cols, cols_per_group_i=cols_per_group,
                           bits_i=max(1, (ncent - 1).bit_length()), res_bits_i=res_bits), x, n)

    register_custom_op_symbolic(f"{DOMAIN}::cvq_linear", cvq_linear, OPSET)
    register_custom_op_symbolic(f"{DOMAIN}::dense_linear", dense_linear, OPSET)
    register_custom_op_symbolic(f"{DOMAIN}::vq_linear", vq_linear, OPSET)
    register_custom_op_symbolic(f"{DOMAIN}::int_linear", int_linear, OPSET)
    register_custom_op_symbolic(f"{DOMAIN}::e8p_linear", e8p_linear, OPSET)
    register_custom_op_symbolic(f"{DOMAIN}::hadamard", hadamard, OPSET)
    _registered = True


def _float_activations(act_int8) -> None:
    if act_int8:  # export_onnx traces with float activations; anything else is a bug, not a user error
        raise RuntimeError("the ONNX VQLinear/IntLinear functions define float activations; trace with act_int8 off")


# --------------------------------------------------------------------------------------------- function bodies
class _Body:
    """Small builder for a FunctionProto body."""

    def __init__(self, prefix: str):
        self.nodes = []
        self.prefix = prefix
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def attr_int(self, attr: str) -> str:
        """A 0-D int64 tensor holding the function attribute `attr`."""
        from onnx import AttributeProto, helper

        out = self.name(attr)
        node = helper.make_node("Constant", [], [out])
        a = AttributeProto(name="value_int", type=AttributeProto.INT, ref_attr_name=attr)
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def const(self, value, dtype=None, hint: str = "c") -> str:
        import numpy as np
        from onnx import numpy_helper

        arr = np.array(value, dtype=dtype)
        return self.op("Constant", hint=hint, value=numpy_helper.from_array(arr))

    def unsqueeze0(self, x: str) -> str:
        return self.op("Unsqueeze", x, self.const([0], "int64"))

    def unpack(self, packed: str, count: str, bits: str) -> str:
        """uint8 [N, B] little-endian per-row bitstream -> uint32 [N, count] codes (bits <= 16).

        A code spans at most three adjacent bytes, so each is read from a 24-bit window gathered per code: the widest
        intermediate is [N, count] 32-bit, where expanding every bit (then a float per bit) needed 8x as many floats,
        more memory than a 262k-token head allows."""
        i64 = lambda v: self.const(v, "int64")  # noqa: E731
        off = self.op("Mul", self.op("Range", i64(0), count, i64(1)), bits)  # bit offset of each code [count]
        byte = self.op("Div", off, i64(8))
        last = self.op("Sub", self.op("Gather", self.op("Shape", packed), i64(1)), i64(1))
        word = None
        for j in range(3):  # bytes past the row's end are never part of a code: clamp their index
            at = self.op("Min", self.op("Add", byte, i64(j)), last) if j else byte
            part = self.op("Cast", self.op("Gather", packed, at, axis=1), to=12)  # uint32
            part = self.op("BitShift", part, self.const(8 * j, "uint32"), direction="LEFT") if j else part
            word = part if word is None else self.op("BitwiseOr", word, part)
        # keep bits [shift, shift + bits) of the word: shift them to the top of 32, then down to the bottom
        up = self.op("Sub", self.op("Sub", i64(32), bits), self.op("Sub", off, self.op("Mul", byte, i64(8))))
        top = self.op("BitShift", word, self.op("Cast", up, to=12), direction="LEFT")
        return self.op("BitShift", top, self.op("Cast", self.op("Sub", i64(32), bits), to=12), direction="RIGHT")


def _linear_tail(b: _Body, x: str, w: str, bias: str) -> None:
    wt = b.op("Transpose", w, perm=[1, 0])
    y = b.op("MatMul", x, wt)
    b.nodes.append(__import__("onnx").helper.make_node("Add", [y, bias], ["y"]))


def vq_function():
    from onnx import helper

    b = _Body("vq")
    n, k, d = b.attr_int("n"), b.attr_int("k"), b.attr_int("d")
    rpb, cpb, bits = b.attr_int("rows_per_block"), b.attr_int("cols_per_block"), b.attr_int("bits")
    one, zero = b.const(1, "int64"), b.const(0, "int64")
    nvec = b.op("Div", b.op("Sub", b.op("Add", k, d), one), d)  # ceil(k / d)
    idx = b.op("Cast", b.unpack("indices", nvec, bits), to=7)  # int64 [N, V]
    cb_shape = b.op("Shape", "codebook")
    ncb = b.op("Gather", cb_shape, b.const(1, "int64"))
    ncent = b.op("Gather", cb_shape, b.const(2, "int64"))
    rb = b.op("Div", b.op("Range", zero, n, one), rpb)  # [N]
    cb = b.op("Div", b.op("Mul", b.op("Range", zero, nvec, one), d), cpb)  # [V]
    base = b.op("Add", b.op("Mul", b.op("Unsqueeze", rb, b.const([1], "int64")), ncb),
                b.op("Unsqueeze", cb, b.const([0], "int64")))
    flat = b.op("Add", b.op("Mul", base, ncent), idx)  # [N, V]
    table = b.op("Reshape", b.op("Cast", "codebook", to=1),
                 b.op("Concat", b.const([-1], "int64"), b.unsqueeze0(d), axis=0))  # [G*ncent, d]
    vals = b.op("Reshape", b.op("Gather", table, flat, axis=0), b.const([0, -1], "int64"))  # [N, V*d]
    vals = b.op("Slice", vals, b.const([0], "int64"), b.unsqueeze0(k), b.const([1], "int64"))  # [N, K]
    colb = b.op("Div", b.op("Range", zero, k, one), cpb)
    scale = b.op("Gather", b.op("Gather", b.op("Cast", "codebook_scale", to=1), rb, axis=0), colb, axis=1)
    w = b.op("Mul", vals, scale)
    _linear_tail(b, "x", w, "bias")
    return helper.make_function(
        DOMAIN, "VQLinear", ["x", "indices", "codebook", "codebook_scale", "bias"], ["y"], b.nodes,
        [helper.make_opsetid("", OPSET)], attributes=["n", "k", "d", "rows_per_block", "cols_per_block", "bits"])


def int_function():
    from onnx import helper

    b = _Body("int")
    k, bits, group = b.attr_int("k"), b.attr_int("bits"), b.attr_int("group")
    one, zero = b.const(1, "int64"), b.const(0, "int64")
    q = b.op("Cast", b.unpack("codes", k, bits), to=1)  # float [N, K]
    g = b.op("Div", b.op("Range", zero, k, one), group)
    s = b.op("Gather", b.op("Cast", "scales", to=1), g, axis=1)
    z = b.op("Gather", b.op("Cast", "zeros", to=1), g, axis=1)
    w = b.op("Mul", b.op("Sub", q, z), s)
    _linear_tail(b, "x", w, "bias")
    return helper.make_function(
        DOMAIN, "IntLinear", ["x", "codes", "scales", "zeros", "bias"], ["y"], b.nodes,
        [helper.make_opsetid("", OPSET)], attributes=["n", "k", "bits", "group"])


def e8p_function(bits: int):
    """vqmobile.E8PLinear{bits}(x, codes uint8 [n, bits, V], scales float [stages], bias) -> y, attributes n, k: the
    stage integers decoded by Gather from the E8P / E81B tables (constants of the body, vqmobile/formats/e8p.py)."""
    from onnx import helper

    from vqmobile.formats import e8p

    b = _Body("e8p")
    k = b.attr_int("k")
    signs, sigma = e8p.sign_tables()
    a4 = b.const(e8p.abs4_table().numpy(), "float32", "a4")
    sgn = b.const(signs.numpy(), "float32", "sgn")
    sig = b.const(sigma.numpy(), "float32", "sigma")
    e81 = b.const(e8p.e81_table().numpy(), "float32", "e81")
    flat = b.const([0, -1], "int64")
    w, plane = None, 0
    for s, kind in enumerate(e8p.stage_kinds(bits)):
        def idx(i):
            return b.op("Cast", b.op("Gather", "codes", b.const(i, "int64"), axis=1), to=7)  # int64 [n, V]
        if kind == "e8p":
            a, sb = idx(plane), idx(plane + 1)
            plane += 2
            vals = b.op("Add", b.op("Mul", b.op("Gather", a4, a, axis=0), b.op("Gather", sgn, sb, axis=0)),
                        b.op("Unsqueeze", b.op("Gather", sig, sb, axis=0), b.const([-1], "int64")))
        else:
            vals = b.op("Gather", e81, idx(plane), axis=0)
            plane += 1
        vals = b.op("Slice", b.op("Reshape", vals, flat), b.const([0], "int64"), b.unsqueeze0(k),
                    b.const([1], "int64"))  # [n, k]
        part = b.op("Mul", vals, b.op("Gather", "scales", b.const(s, "int64"), axis=0))
        w = part if w is None else b.op("Add", w, part)
    _linear_tail(b, "x", w, "bias")
    return helper.make_function(DOMAIN, f"E8PLinear{bits}", ["x", "codes", "scales", "bias"], ["y"], b.nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["n", "k"])


def hadamard_function(transpose: bool):
    """vqmobile.Hadamard / HadamardT(x, signs uint8, had int8 [m, m]) -> y, attributes m, p: one block of the random
    Hadamard transform (vqmobile/ops/hadamard.py); H_p is built in the body as (-1)^popcount(i & j)."""
    from onnx import helper

    b = _Body("had")
    m, p = b.attr_int("m"), b.attr_int("p")
    one, zero = b.const(1, "int64"), b.const(0, "int64")
    n = b.op("Mul", m, p)
    s = b.op("Sub", b.const(1.0, "float32"),
             b.op("Mul", b.const(2.0, "float32"),
                  b.op("Reshape", b.op("Cast", b.unpack(b.unsqueeze0("signs"), n, one), to=1),
                        b.const([-1], "int64"))))  # +-1 [n]
    x = "x" if transpose else b.op("Mul", "x", s)
    r = b.op("Cast", b.op("Range", zero, p, one), to=13)  # uint64
    v = b.op("BitwiseAnd", b.op("Unsqueeze", r, b.const([1], "int64")), b.op("Unsqueeze", r, b.const([0], "int64")))
    for sh in (8, 4, 2, 1):  # p <= 65536: 16 bits fold to their parity
        v = b.op("BitwiseXor", v, b.op("BitShift", v, b.const(sh, "uint64"), direction="RIGHT"))
    v = b.op("BitwiseXor", v, b.op("BitShift", v, b.const(16, "uint64"), direction="RIGHT"))
    hp = b.op("Sub", b.const(1.0, "float32"),
              b.op("Mul", b.const(2.0, "float32"), b.op("Cast", b.op("BitwiseAnd", v, b.const(1, "uint64")), to=1)))
    xr = b.op("Reshape", x, b.op("Concat", b.const([-1], "int64"), b.unsqueeze0(m), b.unsqueeze0(p), axis=0))
    hm = b.op("Cast", "had", to=1)
    y = b.op("MatMul", hm if not transpose else b.op("Transpose", hm, perm=[1, 0]), b.op("MatMul", xr, hp))
    y = b.op("Div", b.op("Reshape", y, b.op("Shape", "x")), b.op("Sqrt", b.op("Cast", n, to=1)))
    b.nodes.append(helper.make_node("Mul" if transpose else "Identity", [y, s] if transpose else [y], ["y"]))
    return helper.make_function(DOMAIN, "HadamardT" if transpose else "Hadamard", ["x", "signs", "had"], ["y"],
                                b.nodes, [helper.make_opsetid("", OPSET)], attributes=["m", "p"])


def cvq_function():
    from onnx import helper

    b = _Body("cvq")
    n, k, v = b.attr_int("n"), b.attr_int("k"), b.attr_int("v")
    outl, cpg = b.attr_int("outlier_cols"), b.attr_int("cols_per_group")
    bits, res_bits = b.attr_int("bits"), b.attr_int("res_bits")
    one, zero = b.const(1, "int64"), b.const(0, "int64")
    # x' = x[..., perm] * col_scale
    xp = b.op("Mul", b.op("Gather", "x", b.op("Cast", "perm", to=7), axis=-1), b.op("Cast", "col_scale", to=1))
    # codebook group of every stored column: 0 for the outliers, then (outliers > 0) + (c - outliers) / cpg
    col = b.op("Range", zero, k, one)
    after = b.op("Add", b.op("Cast", b.op("Greater", outl, zero), to=7), b.op("Div", b.op("Sub", col, outl), cpg))
    grp = b.op("Unsqueeze", b.op("Where", b.op("Less", col, outl), b.op("Mul", col, zero), after),
               b.const([0], "int64"))  # [1, K]

    def stage(indices: str, codebook: str, scale: str, nbits: str) -> str:
        idx = b.op("Cast", b.unpack(indices, k, nbits), to=7)  # int64 [NV, K]
        ncent = b.op("Gather", b.op("Shape", codebook), b.const(1, "int64"))
        table = b.op("Reshape", b.op("Mul", b.op("Cast", codebook, to=1),
                                     b.op("Unsqueeze", b.op("Cast", scale, to=1), b.const([1, 2], "int64"))),
                     b.op("Concat", b.const([-1], "int64"), b.unsqueeze0(v), axis=0))  # [G*ncent, v]
        vals = b.op("Gather", table, b.op("Add", b.op("Mul", grp, ncent), idx), axis=0)  # [NV, K, v]
        return b.op("Transpose", vals, perm=[0, 2, 1])  # [NV, v, K]

    w = b.op("Add", stage("indices", "codebook", "codebook_scale", bits),
             stage("res_indices", "res_codebook", "res_scale", res_bits))
    w = b.op("Reshape", w, b.op("Concat", b.const([-1], "int64"), b.unsqueeze0(k), axis=0))  # [NV*v, K]
    w = b.op("Slice", w, b.const([0], "int64"), b.unsqueeze0(n), b.const([0], "int64"))  # [N, K]
    _linear_tail(b, xp, w, "bias")
    return helper.make_function(
        DOMAIN, "CVQLinear", ["x", "indices", "codebook", "codebook_scale", "col_scale", "perm", "res_indices",
                              "res_codebook", "res_scale", "bias"], ["y"], b.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["n", "k", "v", "outlier_cols", "cols_per_group", "bits", "res_bits"])


def attach_functions(model) -> None:
    """Add the model-local functions for the vqmobile nodes the graph uses, the domain import and IR version."""
    from onnx import helper

    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    extra = [cvq_function()] if "CVQLinear" in used else []
    extra += [e8p_function(bits) for bits in (2, 3, 4) if f"E8PLinear{bits}" in used]
    extra += [hadamard_function(t) for t in (False, True) if ("HadamardT" if t else "Hadamard") in used]
    for fn in (vq_function(), int_function(), *extra):
        if fn.name in used and (fn.domain, fn.name) not in have:
            model.functions.append(fn)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = min(model.ir_version, IR_VERSION)


def export_onnx(hf_model: torch.nn.Module, path: str | Path, max_seq: int) -> dict:
    """Export, attach the functions, check (full), save. Returns facts about the file.

    The file always defines float activations (its functions multiply the float input), whatever activation mode
    `hf_model` is set to: the model is traced in float mode and left as it was."""
    from vqmobile.layers import activations_set

    _register_symbolics()
    with activations_set(hf_model, "float"):
        return _export_onnx(hf_model, path, max_seq)


def _export_onnx(hf_model: torch.nn.Module, path: str | Path, max_seq: int) -> dict:
    import onnx

    module = StaticDecoder(hf_model, max_seq, cache=False, fuse_steps=False).eval()  # ORT fuses its own
    example = torch.zeros(1, 8, dtype=torch.int64)
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {1: "seq"}, "logits": {1: "seq"}},
                          custom_opsets={DOMAIN: DOMAIN_VERSION}, do_constant_folding=False)
    model = onnx.load(str(path))
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"bytes": path.stat().st_size, "custom_nodes": counts, "ir_version": model.ir_version, "opset": OPSET}


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime session that keeps the weights packed: the function bodies dequantize them at every run.

    With onnxruntime's constant folding the session would hold every weight as dense floats: `vqmobile check` on
    Gemma 3 270M peaked at 17.0 GB folded and 7.0 GB unfolded (its onnxruntime row 4.3 s folded, 6.8 s unfolded).
    Without the memory arena, each run's intermediates go back to the system."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["ConstantFolding"])
