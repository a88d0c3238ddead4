"""The parts of a decoder-only LM (embedding, decoder layers, their linears and norms, final norm, head), found by
structure the same way for every supported family (Llama, Qwen 2/2.5/3, Phi-3/4, Gemma 3).

Every supported decoder layer is pre-norm attention and a gated MLP, each optionally followed by a norm of its own
output (Gemma's "sandwich" norms):

    h = h + attn_out_norm(attention(attn_norm(h)))     q/k/v/o projections, optional per-head q/k norms, RoPE,
    h = h + mlp_out_norm(down(act(gate(x)) * up(x)))    x = mlp_norm(h)

The parts are found by what the modules are, never by the architecture's name:
- the layer stack is the ModuleList holding config.num_hidden_layers layers;
- a layer's norms are its children whose only parameter is a weight of the hidden size, in the order the layer
  defines them: two are the norms before attention and before the MLP, four add the norm after each;
- the attention's q/k norms are its children of that kind sized to the head (Qwen 3, Gemma 3), q first;
- the projections by the names every supported family shares (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
  down_proj); Phi-3's fused qkv_proj and gate_up_proj are split into them when the model is loaded
  (split_fused_projections), so every part is an ordinary linear that each quantizer, format and kernel takes as is;
- the MLP's activation is its parameter-free child (the function the config names: SiLU, GELU-tanh, ...);
- head size, attention scaling (Gemma's query_pre_attn_scalar) come from the attention module; sliding windows
  from the config (per layer type where it has layer_types, else for every layer); biases come with the linears;
  an embedding that scales its output (Gemma: sqrt(hidden)) does so itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .layers import QuantLinear


class FusedLinear(nn.Module):
    """A fused projection held as its parts: forward concatenates the parts' outputs along the features, so the
    model's own forward is unchanged while each part is quantized, stored and exported like any other linear."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.children()], dim=-1)


def _split(linear: nn.Linear, parts: dict[str, int]) -> FusedLinear:
    """nn.Linear -> FusedLinear of nn.Linears over consecutive output rows (sizes in `parts`, in order)."""
    if sum(parts.values()) != linear.out_features:
        raise UserError(f"cannot split a fused projection of {linear.out_features} outputs into {parts}")
    out, start = {}, 0
    for name, rows in parts.items():
        lin = nn.Linear(linear.in_features, rows, bias=linear.bias is not None, dtype=linear.weight.dtype,
                        device=linear.weight.device)
        with torch.no_grad():
            lin.weight.copy_(linear.weight[start:start + rows])
            if linear.bias is not None:
                lin.bias.copy_(linear.bias[start:start + rows])
        out[name] = lin
        start += rows
    return FusedLinear(out)


def split_fused_projections(model: nn.Module) -> nn.Module:
    """Phi-3's fused projections become FusedLinears of the separate ones (qkv_proj: q_proj, k_proj, v_proj as the
    model slices them; gate_up_proj: gate_proj, up_proj, the halves it chunks into). Idempotent; returns the model."""
    cfg = model.config
    for layer in decoder_layers(model):
        for mod in layer.modules():
            qkv = getattr(mod, "qkv_proj", None)
            if isinstance(qkv, nn.Linear):
                hd = int(mod.head_dim)
                q, kv = int(cfg.num_attention_heads) * hd, int(cfg.num_key_value_heads) * hd
                mod.qkv_proj = _split(qkv, {"q_proj": q, "k_proj": kv, "v_proj": kv})
            gate_up = getattr(mod, "gate_up_proj", None)
            if isinstance(gate_up, nn.Linear):
                half = gate_up.out_features // 2
                mod.gate_up_proj = _split(gate_up, {"gate_proj": half, "up_proj": half})
    return model


def layers_path(model: nn.Module) -> str:
    """Module path of the decoder-layer stack: the ModuleList of config.num_hidden_layers layers nearest the root."""
    n = int(getattr(model.config, "num_hidden_layers", -1))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name
    raise UserError(f"unsupported model structure: no stack of {n} decoder layers in {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layers_path(model))


@dataclass
class Attention:
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    window: int | None  # a query sees keys less than `window` positions back (HF: kv > q - window); None: all


@dataclass
class Layer:
    attn_norm: nn.Module
    attn: Attention
    attn_out_norm: nn.Module | None
    mlp_norm: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    act: nn.Module
    mlp_out_norm: nn.Module | None
    rope: str | None  # the rotary table this layer uses (a layer type), None where the model has one table


@dataclass
class Decoder:
    embed: nn.Module
    layers: list[Layer]
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module
    layers_path: str


def _norms(module: nn.Module, size: int) -> list[nn.Module]:
    """The children of `module` whose only parameter is a 1-D weight of `size` (norms), in definition order."""
    out = []
    for child in module.children():
        params = dict(child.named_parameters())
        if (set(params) == {"weight"} and params["weight"].dim() == 1 and params["weight"].numel() == size
                and not isinstance(child, (nn.Linear, nn.Embedding))):
            out.append(child)
    return out


def _find(module: nn.Module, name: str, where: str) -> nn.Module:
    hits = [m for path, m in module.named_modules() if path.rpartition(".")[2] == name]
    if len(hits) != 1:
        raise UserError(f"unsupported model structure: {where} has {len(hits)} '{name}' projections, expected 1")
    return hits[0]


def _owner(layer: nn.Module, name: str, where: str) -> nn.Module:
    """The child of `layer` that contains the projection `name` (the attention block, the MLP)."""
    hits = [c for c in layer.children() if any(p.rpartition(".")[2] == name for p, _ in c.named_modules())]
    if len(hits) != 1:
        raise UserError(f"unsupported model structure: no single block of {where} holds '{name}'")
    return hits[0]


def _windows(cfg, n_layers: int) -> list[int | None]:
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [window] * n_layers
    return [window if t == "sliding_attention" else None for t in types[:n_layers]]


def decoder_structure(model: nn.Module) -> Decoder:
    """Every part the static-cache decoder (export/model.py) runs, or a one-line UserError saying what is missing."""
    cfg = model.config
    for knob in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, knob, None) is not None:
            raise UserError(f"unsupported model: {knob} is set; soft-capped logits are not exported")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UserError("unsupported model: bidirectional attention (an encoder) is not a causal decoder")
    hidden = int(cfg.hidden_size)
    path = layers_path(model)
    stack = model.get_submodule(path)
    base = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise UserError("unsupported model structure: no rotary position embedding beside the decoder layers")
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    windows = _windows(cfg, len(stack))
    layers = []
    for i, layer in enumerate(stack):
        where = f"{path}.{i}"
        attn, mlp = _owner(layer, "o_proj", where), _owner(layer, "down_proj", where)
        norms = _norms(layer, hidden)
        if len(norms) == 2:
            attn_norm, mlp_norm = norms
            attn_out_norm = mlp_out_norm = None
        elif len(norms) == 4:
            attn_norm, attn_out_norm, mlp_norm, mlp_out_norm = norms
        else:
            raise UserError(f"unsupported model structure: {where} has {len(norms)} norms (2 or 4 are supported)")
        head_dim = int(attn.head_dim)
        qk_norms = _norms(attn, head_dim)
        if len(qk_norms) not in (0, 2):
            raise UserError(f"unsupported model structure: {where} has {len(qk_norms)} per-head norms")
        acts = [c for c in mlp.children() if not any(True for _ in c.parameters())
                and not isinstance(c, (nn.Linear, QuantLinear, FusedLinear, nn.Dropout))]
        if len(acts) != 1:
            raise UserError(f"unsupported model structure: {where}'s MLP has no single activation module")
        q, k = _find(attn, "q_proj", where), _find(attn, "k_proj", where)
        a = Attention(q=q, k=k, v=_find(attn, "v_proj", where), o=_find(attn, "o_proj", where),
                      q_norm=qk_norms[0] if qk_norms else None, k_norm=qk_norms[1] if qk_norms else None,
                      n_heads=q.out_features // head_dim, n_kv_heads=k.out_features // head_dim, head_dim=head_dim,
                      scaling=float(attn.scaling), window=windows[i])
        layers.append(Layer(attn_norm=attn_norm, attn=a, attn_out_norm=attn_out_norm, mlp_norm=mlp_norm,
                            gate=_find(mlp, "gate_proj", where), up=_find(mlp, "up_proj", where),
                            down=_find(mlp, "down_proj", where), act=acts[0], mlp_out_norm=mlp_out_norm,
                            rope=cfg.layer_types[i] if per_type else None))
    final = _norms(base, hidden)
    if len(final) != 1:
        raise UserError(f"unsupported model structure: {len(final)} final norms beside the decoder layers")
    return Decoder(embed=model.get_input_embeddings(), layers=layers, norm=final[0],
                   head=model.get_output_embeddings(), rotary=rotary, layers_path=path)


def rotary_tables(decoder: Decoder, positions: int) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
    """{rope key: (cos, sin) [positions, rotary dim]} from the model's own rotary module (every RoPE variant and
    its attention scaling as the model computes them). The rotary dim is below the head size for partial RoPE."""
    rot = decoder.rotary
    pos = torch.arange(positions, dtype=torch.int64)[None]
    x = torch.zeros(1, dtype=torch.float32)
    out = {}
    with torch.no_grad():
        for key in dict.fromkeys(layer.rope for layer in decoder.layers):
            cos, sin = rot(x, pos) if key is None else rot(x, pos, key)
            out[key] = (cos[0].float(), sin[0].float())
    return out
