"""An export-friendly Llama decoder over a (quantized) Hugging Face LlamaForCausalLM.

It reuses the model's own modules and weights (embeddings, norms, projections) and re-states the forward pass with
a static KV cache held in buffers, so that torch.export sees one graph with a dynamic sequence length:

    forward(tokens int64 [1, T], input_pos int64 [1]) -> logits float32 [1, T, vocab]

writes the keys/values of positions input_pos .. input_pos+T-1 into the cache and attends over every cached
position <= the query's position (prefill: T tokens at input_pos 0; decode: T = 1). With ``cache=False`` the module
is stateless (``forward(tokens) -> logits``, causal attention over the T tokens; used for ONNX).

Quantized linears (QuantLinear) run through vqmobile.ops.op_forward, i.e. the vqmobile custom operators, or their
standard-op decompositions when traced under ``vqmobile.ops.decomposed()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqmobile import ops
from vqmobile.layers import QuantLinear


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, QuantLinear):
        return ops.op_forward(mod.qweight, x, mod.bias, mod.act_int8)
    return mod(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticLlama(nn.Module):
    def __init__(self, hf_model: nn.Module, max_seq: int, cache: bool = True, tied_head_op: bool = True):
        super().__init__()
        cfg = hf_model.config
        self.cfg = cfg
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        self.max_seq = int(max_seq)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.use_cache = cache
        head_w = getattr(self.lm_head, "weight", None)
        # A head tied to the embedding runs as vqmobile::dense_linear, which reads the shared [vocab, hidden] matrix
        # in place: the program then stores it once (an XNNPACK linear would keep its own copy).
        self.tied_head = bool(tied_head_op and isinstance(self.lm_head, nn.Linear) and head_w is not None
                              and head_w is self.model.embed_tokens.weight)
        with torch.no_grad():  # layers without an operator: their dense weight is made now, not while tracing
            for mod in hf_model.modules():
                if isinstance(mod, QuantLinear) and ops.op_support(mod.qweight)[0] is None:
                    ops.dense_weight(mod.qweight)
        rot = self.model.rotary_emb
        pos = torch.arange(self.max_seq, dtype=torch.float32)
        freqs = pos[:, None] * rot.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.register_buffer("rope_cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("rope_sin", emb.sin() * scaling, persistent=False)
        if cache:
            # Keys are cached transposed ([kv heads, head_dim, positions]) so that both attention products read
            # the caches as they are: a transposed operand would be copied by the runtime at every step.
            for i in range(len(self.model.layers)):
                self.register_buffer(f"k_cache_{i}", torch.zeros(self.n_kv, self.head_dim, self.max_seq),
                                     persistent=False)
                self.register_buffer(f"v_cache_{i}", torch.zeros(self.n_kv, self.max_seq, self.head_dim),
                                     persistent=False)

    def reset_cache(self) -> None:
        for name, buf in self.named_buffers():
            if "_cache_" in name:
                buf.zero_()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        steps = torch.arange(t, dtype=torch.int64)
        pos = steps if input_pos is None else input_pos + steps  # [T]
        cos = self.rope_cos[pos][None]  # [1, T, D]
        sin = self.rope_sin[pos][None]
        if self.use_cache:
            key_pos = torch.arange(self.max_seq, dtype=torch.int64)
        else:
            key_pos = steps
        mask = torch.where(key_pos[None, :] <= pos[:, None], 0.0, float("-inf"))  # [T, S]
        groups = self.n_heads // self.n_kv
        scale = self.head_dim ** -0.5
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = linear(attn.q_proj, x).view(t, self.n_heads, self.head_dim).transpose(0, 1)  # [H, T, D]
            k = linear(attn.k_proj, x).view(t, self.n_kv, self.head_dim).transpose(0, 1)
            v = linear(attn.v_proj, x).view(t, self.n_kv, self.head_dim).transpose(0, 1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if self.use_cache:
                kt, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
                kt.index_copy_(2, pos, k.transpose(1, 2))
                vc.index_copy_(1, pos, v)
                v = vc
            else:
                kt, v = k.transpose(1, 2).contiguous(), v.contiguous()
            # Grouped-query attention without copying the cache for each query head: the query heads that share
            # a key/value head (HF's repeat_kv order, head = kv * groups + g) attend to it one group at a time.
            qg = q.reshape(self.n_kv, groups, t, self.head_dim)
            outs = []
            for g in range(groups):
                scores = torch.bmm(qg[:, g].contiguous(), kt) * scale + mask
                outs.append(torch.bmm(torch.softmax(scores, dim=-1), v))
            o = torch.stack(outs, dim=1).view(self.n_heads, t, self.head_dim)
            o = o.transpose(0, 1).reshape(1, t, self.n_heads * self.head_dim)
            h = h + linear(attn.o_proj, o)
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            h = h + linear(mlp.down_proj, F.silu(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x))
        h = self.model.norm(h)
        if self.tied_head:
            if ops.decomposing():
                return F.linear(h, self.lm_head.weight, self.lm_head.bias)
            return torch.ops.vqmobile.dense_linear(h, self.lm_head.weight, self.lm_head.bias)
        return linear(self.lm_head, h)


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """{module path: reason} for quantized layers that no vqmobile operator covers (exported as dense matmuls)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            op, why = ops.op_support(mod.qweight)
            if op is None:
                out[name] = why
    return out
