"""The export-friendly decoder: one model for every supported family (Llama, Qwen 2/2.5/3, Phi-3/4, Gemma 3) over a
(quantized) Hugging Face causal LM, whose parts vqmobile.structure finds.

It reuses the model's own modules and weights (embedding, norms, projections, activation, rotary tables) and re-states
the forward pass with a static KV cache held in buffers, so that torch.export sees one graph with a dynamic sequence
length:

    forward(tokens int64 [1, T], input_pos int64 [1]) -> logits float32 [1, T, vocab]

writes the keys/values of positions input_pos .. input_pos+T-1 into the cache and attends over every cached
position <= the query's position, and, in a sliding-window layer, more recent than the window (prefill: T tokens at
input_pos 0; decode: T = 1). The cache holds float32 or, with ``kv_dtype=torch.float16``, float16 values (half the
bytes a long context reads per generated token; the keys and values are rounded to it as they are written). With
``cache=False`` the module is stateless (``forward(tokens) -> logits``, causal attention over the T tokens; used for
ONNX).

What differs between the families is what the structure has, each handled where it occurs: per-head q/k norms,
biases (they come with the linears), a sliding window per layer (vqmobile::attention's window), one RoPE table per layer type
(Gemma 3's local and global bases) or a partial rotary dimension (Phi-4), an embedding that scales its rows, norms
after attention and MLP, the MLP's activation. Every layer keeps the full max_seq cache, also where it only attends
to a window: one cache layout and one graph for every layer.

Quantized linears (QuantLinear) run through vqmobile.ops.op_forward, i.e. the vqmobile custom operators, or their
standard-op decompositions when traced under ``vqmobile.ops.decomposed()``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vqmobile import ops
from vqmobile.layers import QuantLinear
from vqmobile.structure import Attention, decoder_structure, rotary_tables


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, QuantLinear):
        return ops.op_forward(mod.qweight, x, mod.bias, mod.act_int8)
    return mod(x)


def stacked_linear(mods: list[nn.Module]) -> QuantLinear | None:
    """One QuantLinear computing what the quantized linears `mods` (which read the same input) compute, its output
    their outputs side by side, or None where their formats cannot be joined or no operator runs the result. Fewer,
    larger calls per token: each call quantizes its activations, fills its tables and dispatches once."""
    if len(mods) < 2 or not all(isinstance(m, QuantLinear) for m in mods):
        return None
    if len({m.bias is None for m in mods}) != 1:
        return None
    w = type(mods[0].qweight).stack_rows([m.qweight for m in mods])
    if w is None or ops.op_support(w)[0] is None:
        return None
    return QuantLinear(w, None if mods[0].bias is None else torch.cat([m.bias for m in mods]))


@contextlib.contextmanager
def kv_rounded(hf_model: nn.Module, kv_dtype: torch.dtype) -> Iterator[None]:
    """Within this block the Hugging Face model attends over its keys and values rounded to kv_dtype, as the
    exported program's KV cache of that dtype holds them: the PyTorch reference of that program (vqmobile check).
    Its own attention implementation does the rest."""
    if kv_dtype == torch.float32:
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = hf_model.config
    impl = cfg._attn_implementation
    base = (sys.modules[type(hf_model).__module__].eager_attention_forward if impl == "eager"
            else ALL_ATTENTION_FUNCTIONS[impl])

    def attend(module, query, key, value, *args, **kwargs):
        return base(module, query, key.to(kv_dtype).to(key.dtype), value.to(kv_dtype).to(value.dtype), *args,
                    **kwargs)

    name = f"vqmobile_kv_{str(kv_dtype).removeprefix('torch.')}_{impl}"
    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])  # the mask the wrapped one expects
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = impl


class StaticDecoder(nn.Module):
    def __init__(self, hf_model: nn.Module, max_seq: int, cache: bool = True, tied_head_op: bool = True,
                 kv_dtype: torch.dtype = torch.float32, stack_projections: bool = True, fuse_steps: bool = True):
        super().__init__()
        self.hf_model = hf_model  # registers every weight of the model with this module
        self.parts = decoder_structure(hf_model)
        self.max_seq = int(max_seq)
        self.use_cache = cache
        head, embed = self.parts.head, self.parts.embed
        head_w, embed_w = getattr(head, "weight", None), getattr(embed, "weight", None)
        # A head tied to the embedding runs as vqmobile::dense_linear, which reads the shared [vocab, hidden] matrix
        # in place: the program then stores it once (an XNNPACK linear would keep its own copy).
        self.tied_head = bool(tied_head_op and isinstance(head, nn.Linear) and head_w is not None
                              and head_w is embed_w)
        with torch.no_grad():  # layers without an operator: their dense weight is made now, not while tracing
            for mod in hf_model.modules():
                if isinstance(mod, QuantLinear) and ops.op_support(mod.qweight)[0] is None:
                    ops.dense_weight(mod.qweight)
        # q/k/v and gate/up of a layer run as one call each where stacked_linear can join them (210 calls per
        # SmolLM2 token -> 120). A plain list: the joined weights are traced as constants in place of the parts'.
        self.stacked: list[tuple[QuantLinear | None, QuantLinear | None]] = [
            (stacked_linear([layer.attn.q, layer.attn.k, layer.attn.v]), stacked_linear([layer.gate, layer.up]))
            if stack_projections else (None, None) for layer in self.parts.layers]
        # Norms, RoPE and the gated product as one vqmobile call each (a norm only where rms_norm_form recognizes its
        # arithmetic, the product only after a SiLU and a stacked gate/up), else in the model's own standard ops.
        self.fuse_steps = fuse_steps
        norms = [self.parts.norm, *(m for layer in self.parts.layers
                                    for m in (layer.attn_norm, layer.attn_out_norm, layer.mlp_norm,
                                              layer.mlp_out_norm, layer.attn.q_norm, layer.attn.k_norm))]
        self.norm_forms = ({m: ops.decoder_steps.rms_norm_form(m) for m in norms if m is not None} if fuse_steps
                           else {})
        self.silu_layers = {i for i, layer in enumerate(self.parts.layers)
                            if fuse_steps and ops.decoder_steps.is_silu(layer.act)}
        tables = rotary_tables(self.parts, self.max_seq)
        self.rope_index = {key: j for j, key in enumerate(tables)}
        for j, (cos, sin) in enumerate(tables.values()):
            self.register_buffer(f"rope_cos_{j}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{j}", sin, persistent=False)
        if cache:
            # Keys are cached transposed ([kv heads, head_dim, positions]) so that both attention products read
            # the caches as they are: a transposed operand would be copied by the runtime at every step.
            for i, layer in enumerate(self.parts.layers):
                a = layer.attn
                self.register_buffer(f"k_cache_{i}", torch.zeros(a.n_kv_heads, a.head_dim, self.max_seq,
                                                                 dtype=kv_dtype), persistent=False)
                self.register_buffer(f"v_cache_{i}", torch.zeros(a.n_kv_heads, self.max_seq, a.head_dim,
                                                                 dtype=kv_dtype), persistent=False)

    def reset_cache(self) -> None:
        for name, buf in self.named_buffers():
            if "_cache_" in name:
                buf.zero_()

    @staticmethod
    def _linears(stacked: QuantLinear | None, mods: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of mods on x: one call through their stacked linear, unless their activation settings
        (set after this module was made) differ."""
        if stacked is None or len({m.act_int8 for m in mods}) != 1:
            return [linear(m, x) for m in mods]
        y = ops.op_forward(stacked.qweight, x, stacked.bias, mods[0].act_int8)
        parts = torch.split(y, [m.out_features for m in mods], dim=-1)
        if torch.compiler.is_exporting():  # the program's split makes copies: another copy would be a call more
            return list(parts)
        # contiguous, as the separate outputs were: PyTorch's elementwise kernels (SiLU) round differently on
        # strided views
        return [part.contiguous() for part in parts]

    def _gated(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up(x): one vqmobile::silu_mul over the stacked projection's output where that applies."""
        stacked, mods = self.stacked[i][1], [layer.gate, layer.up]
        if (stacked is None or i not in self.silu_layers or layer.gate.act_int8 != layer.up.act_int8
                or ops.decomposing()):
            g, u = self._linears(stacked, mods, x)
            return layer.act(g) * u
        return torch.ops.vqmobile.silu_mul(ops.op_forward(stacked.qweight, x, stacked.bias, layer.gate.act_int8))

    def _norm(self, mod: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        form = self.norm_forms.get(mod)
        if mod is None or form is None or ops.decomposing():
            return x if mod is None else mod(x)
        return torch.ops.vqmobile.rms_norm(x, *form)

    def _add_norm(self, h: torch.Tensor, a: torch.Tensor, mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + a, mod(h + a)): the residual connection and the norm after it, one call where the norm is fused."""
        form = self.norm_forms.get(mod)
        if form is None or ops.decomposing():
            h = h + a
            return h, mod(h)
        return torch.ops.vqmobile.add_rms_norm(h, a, *form)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D], its heads rotated."""
        if self.fuse_steps and not ops.decomposing():
            return torch.ops.vqmobile.rope(x, cos, sin)
        return ops.decoder_steps.rope_decomposed(x, cos, sin)

    def _attention(self, i: int, a: Attention, x: torch.Tensor, cos, sin, pos) -> torch.Tensor:
        t, hd = x.shape[1], a.head_dim
        q, k, v = self._linears(self.stacked[i][0], [a.q, a.k, a.v], x)
        q = self._norm(a.q_norm, q.reshape(t, a.n_heads, hd))
        k = self._norm(a.k_norm, k.reshape(t, a.n_kv_heads, hd))
        v = v.reshape(t, a.n_kv_heads, hd)
        q = self._rope(q, cos, sin)  # [T, H, D]
        k = self._rope(k, cos, sin)  # [T, Hkv, D]
        window = a.window or 0
        if self.use_cache:
            # vqmobile::attention writes the new keys and values into the cache, then reads it in place, only the
            # positions each query sees (its decomposition: index_copy_, then masked attention over the whole cache).
            kt, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            attend = ops.attention.attention_decomposed if ops.decomposing() else torch.ops.vqmobile.attention
            o = attend(q, k, v, kt, vc, pos[:1], a.scaling, window)
        else:  # stateless (ONNX): the T tokens are the whole cache, from position 0
            o = ops.attention.masked_attention(q, k.permute(1, 2, 0).contiguous(), v.transpose(0, 1).contiguous(),
                                               pos[:1], a.scaling, window)
        return linear(a.o, o.reshape(1, t, a.n_heads * hd))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        steps = torch.arange(t, dtype=torch.int64)
        pos = steps if input_pos is None else input_pos + steps  # [T]
        ropes = {key: (getattr(self, f"rope_cos_{j}")[pos][None], getattr(self, f"rope_sin_{j}")[pos][None])
                 for key, j in self.rope_index.items()}  # [1, T, rotary dim]
        h = self.parts.embed(tokens)
        layers = self.parts.layers
        x = self._norm(layers[0].attn_norm, h)
        for i, layer in enumerate(layers):
            cos, sin = ropes[layer.rope]
            a = self._attention(i, layer.attn, x, cos, sin, pos)
            h, x = self._add_norm(h, self._norm(layer.attn_out_norm, a), layer.mlp_norm)
            m = linear(layer.down, self._gated(i, layer, x))
            after = layers[i + 1].attn_norm if i + 1 < len(layers) else self.parts.norm
            h, x = self._add_norm(h, self._norm(layer.mlp_out_norm, m), after)
        h = x
        head = self.parts.head
        if self.tied_head:
            if ops.decomposing():
                return F.linear(h, head.weight, head.bias)
            return torch.ops.vqmobile.dense_linear(h, head.weight, head.bias)
        return linear(head, h)


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """{module path: reason} for quantized layers that no vqmobile operator covers (exported as dense matmuls)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            op, why = ops.op_support(mod.qweight)
            if op is None:
                out[name] = why
    return out
