"""Quantized token embeddings, and the lm_head tied to them.

The embedding matrix is the largest tensor of a small LLM (SmolLM2-135M: 49152 x 576, 113 MB in float32, more than
the 30 quantized decoder layers together), and a tied lm_head reads all of it for every generated token. It is stored
as 8-bit integers in groups of 32 with an fp16 absmax scale per group, W = (q - 128) * scale with |q - 128| <= 127:
llama.cpp's Q8_0 grid, so a Q8_0 source (the default SmolLM2 GGUF's token_embd) round-trips exactly, and any other
source loses about 0.4 % of a group's range at most. The stored format is the integer format of formats/intweight.py, so
the int kernels, operators and exporters run the head without anything new.

QuantEmbedding gathers and dequantizes only the rows it looks up (standard ops, so it exports as-is) and applies the
output scale of the embedding it replaces (Gemma multiplies by sqrt(hidden)); a head tied to the embedding becomes a
QuantLinear over the very same IntWeight, stored once. Large vocabularies (Gemma 3: 262,144 x 640, 671 MB in float32)
are quantized and checked a block of rows at a time, so no float temporary of the whole matrix is made beside the
loaded weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats.intweight import IntGrid, IntWeight, n_groups, quantize_to_grid
from .layers import QuantLinear

BITS, GROUP = 8, 32
ROWS = 8192  # rows quantized or dequantized at once: 21 MB of float32 at hidden 640


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [rows, hidden] -> (codes uint8 [rows, hidden], fp16 scales [rows, groups])."""
    v, h = w.shape
    pad = n_groups(h, GROUP) * GROUP - h
    groups = torch.nn.functional.pad(w.float(), (0, pad)).view(v, -1, GROUP)
    scale = (groups.abs().amax(dim=2) / 127).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # |w| / scale <= 127 * (1 + 2^-11) after the fp16 rounding, so codes stay in [1, 255]: the grid is symmetric.
    grid = IntGrid(scale[..., None], torch.full_like(scale[..., None], 128.0), (1 << BITS) - 1)
    q = quantize_to_grid(groups, grid).view(v, -1)[:, :h]
    return q.to(torch.uint8), scale.to(torch.float16)


def quantize_embedding(weight: torch.Tensor) -> IntWeight:
    """[vocab, hidden] float -> 8-bit symmetric groups of 32 with scale max|w| / 127 (rounded to fp16 first, so
    the codes are computed with the scale that is stored). 8-bit codes are one byte each: the codes are their own
    packed rows."""
    v, h = weight.shape
    blocks = [_quantize_rows(weight[s:s + ROWS].detach()) for s in range(0, v, ROWS)]
    return IntWeight(torch.cat([c for c, _ in blocks]), torch.cat([s for _, s in blocks]), None, bits=BITS,
                     group=GROUP, shape=(v, h))


def _dequantize_rows(qw: IntWeight, rows) -> torch.Tensor:
    q = qw.codes[rows].to(torch.float32) - 128.0
    return q * qw.scales[rows].to(torch.float32).repeat_interleave(qw.group, dim=-1)[..., :qw.shape[1]]


def max_abs_error(qweight: IntWeight, weight: torch.Tensor) -> float:
    """max |dequantized - weight| over the whole matrix, a block of rows at a time."""
    v = weight.shape[0]
    return max(float((_dequantize_rows(qweight, slice(s, s + ROWS)) - weight[s:s + ROWS].float()).abs().max())
               for s in range(0, v, ROWS))


def output_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The factor an embedding module multiplies its rows by (Gemma's embed_scale, sqrt(hidden)), None if none."""
    scale = getattr(embedding, "embed_scale", None)
    return None if scale is None else torch.as_tensor(scale, dtype=torch.float32).detach().clone()


class QuantEmbedding(nn.Module):
    """nn.Embedding over an 8-bit IntWeight: forward(ids) dequantizes the looked-up rows only, then applies the
    output scale of the embedding it replaced, if any (the same float32 product as that module's)."""

    def __init__(self, qweight: IntWeight, embed_scale: torch.Tensor | None = None):
        super().__init__()
        if qweight.bits != BITS or not qweight.symmetric:
            raise ValueError("QuantEmbedding takes 8-bit symmetric integer weights")
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("embed_scale", embed_scale, persistent=False)  # derived from the config: not stored

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _dequantize_rows(self.qweight, ids)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def dequantized(self) -> nn.Module:
        """The float module this embedding equals: an nn.Embedding of the dequantized weight (scaled on output)."""
        dense = ScaledEmbedding(self.num_embeddings, self.embedding_dim, self.embed_scale)
        v = self.num_embeddings
        dense.weight.data = torch.cat([_dequantize_rows(self.qweight, slice(s, s + ROWS)) for s in range(0, v, ROWS)])
        return dense

    def extra_repr(self) -> str:
        scaled = "" if self.embed_scale is None else f", output x {float(self.embed_scale):.6g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 groups of {self.qweight.group}{scaled}"


class ScaledEmbedding(nn.Embedding):
    """nn.Embedding whose rows are multiplied by a constant on output (None: plain nn.Embedding)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: torch.Tensor | None):
        super().__init__(num_embeddings, embedding_dim)
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows if self.embed_scale is None else rows * self.embed_scale


def tied_head(model: nn.Module) -> bool:
    """Whether the model's lm_head is the embedding (float: the same parameter; quantized: the same IntWeight)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, QuantEmbedding):
        return isinstance(head, QuantLinear) and head.qweight is emb.qweight
    return head is not None and getattr(head, "weight", None) is emb.weight


def use_quantized_embedding(model: nn.Module, qweight: IntWeight, tie_head: bool) -> None:
    """Install `qweight` as the model's embedding (with the output scale of the one it replaces) and, when
    `tie_head`, as its lm_head too."""
    model.set_input_embeddings(QuantEmbedding(qweight, output_scale(model.get_input_embeddings())))
    if tie_head:
        model.set_output_embeddings(QuantLinear(qweight))


def quantize_embeddings_(model: nn.Module) -> float:
    """Quantize the token embedding of a HF causal LM in place; a tied head follows it, an untied head stays float.
    Returns the largest absolute error of any embedding value (0.0 for a Q8_0 source)."""
    tie = tied_head(model)
    weight = model.get_input_embeddings().weight.detach()
    qweight = quantize_embedding(weight)
    err = max_abs_error(qweight, weight)
    use_quantized_embedding(model, qweight, tie)
    return err
