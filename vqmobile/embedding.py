"""Quantized token embeddings, and the lm_head tied to them.

The embedding matrix is the largest tensor of a small LLM (SmolLM2-135M: 49152 x 576, 113 MB in float32, more than
the 30 quantized decoder layers together), and a tied lm_head reads all of it for every generated token. It is stored
as 8-bit integers in groups of 32 with an fp16 absmax scale per group, W = (q - 128) * scale with |q - 128| <= 127:
llama.cpp's Q8_0 grid, so a Q8_0 source (the default SmolLM2 GGUF's token_embd) round-trips exactly, and any other
source loses about 0.4 % of a group's range at most. The stored format is the integer format of formats/intweight.py, so
the int kernels, operators and exporters run the head without anything new.

QuantEmbedding gathers and dequantizes only the rows it looks up (standard ops, so it exports as-is); a head tied to
the embedding becomes a QuantLinear over the very same IntWeight, stored once.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats.intweight import IntGrid, IntWeight, n_groups, quantize_to_grid
from .layers import QuantLinear

BITS, GROUP = 8, 32


def quantize_embedding(weight: torch.Tensor) -> IntWeight:
    """[vocab, hidden] float -> 8-bit symmetric groups of 32 with scale max|w| / 127 (rounded to fp16 first, so
    the codes are computed with the scale that is stored)."""
    v, h = weight.shape
    w = weight.detach().float()
    pad = n_groups(h, GROUP) * GROUP - h
    groups = torch.nn.functional.pad(w, (0, pad)).view(v, -1, GROUP)
    scale = (groups.abs().amax(dim=2) / 127).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # |w| / scale <= 127 * (1 + 2^-11) after the fp16 rounding, so codes stay in [1, 255]: the grid is symmetric.
    grid = IntGrid(scale[..., None], torch.full_like(scale[..., None], 128.0), (1 << BITS) - 1)
    q = quantize_to_grid(groups, grid)
    return IntWeight.from_codes(q.view(v, -1)[:, :h], scale, torch.zeros_like(scale), bits=BITS, group=GROUP,
                                symmetric=True)


class QuantEmbedding(nn.Module):
    """nn.Embedding over an 8-bit IntWeight: forward(ids) dequantizes the looked-up rows only."""

    def __init__(self, qweight: IntWeight):
        super().__init__()
        if qweight.bits != BITS or not qweight.symmetric:
            raise ValueError("QuantEmbedding takes 8-bit symmetric integer weights")
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        qw = self.qweight
        q = qw.codes[ids].to(torch.float32) - 128.0  # 8-bit codes are one byte each: the packed row is the row
        scale = qw.scales[ids].to(torch.float32).repeat_interleave(qw.group, dim=-1)[..., :self.embedding_dim]
        return q * scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 groups of {self.qweight.group}"


def tied_head(model: nn.Module) -> bool:
    """Whether the model's lm_head is the embedding (float: the same parameter; quantized: the same IntWeight)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, QuantEmbedding):
        return isinstance(head, QuantLinear) and head.qweight is emb.qweight
    return head is not None and getattr(head, "weight", None) is emb.weight


def use_quantized_embedding(model: nn.Module, qweight: IntWeight, tie_head: bool) -> None:
    """Install `qweight` as the model's embedding and, when `tie_head`, as its lm_head too."""
    model.set_input_embeddings(QuantEmbedding(qweight))
    if tie_head:
        model.set_output_embeddings(QuantLinear(qweight))


def quantize_embeddings_(model: nn.Module) -> float:
    """Quantize the token embedding of a HF causal LM in place; a tied head follows it, an untied head stays float.
    Returns the largest absolute error of any embedding value (0.0 for a Q8_0 source)."""
    tie = tied_head(model)
    weight = model.get_input_embeddings().weight.detach().float()
    qweight = quantize_embedding(weight)
    err = float((qweight.dequantize() - weight).abs().max())
    use_quantized_embedding(model, qweight, tie)
    return err
