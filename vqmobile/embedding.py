"""Quantized token embeddings, and the lm_head tied to them.

The embedding matrix is the largest tensor of a small LLM (SmolLM2-135M: 49152 x 576, 113 MB in float32, more than
the 30 quantized decoder layers together), and a tied lm_head reads all of it for every generated token. It is stored
in symmetric integer groups of 32 with an fp16 scale per group, the integer format of formats/intweight.py, so the
int kernels, operators and exporters run the head without anything new:
- 8 bits (default): W = (q - 128) * scale with |q - 128| <= 127 and scale = absmax / 127: llama.cpp's Q8_0 grid, so
  a Q8_0 source (the default SmolLM2 GGUF's token_embd) round-trips exactly, any other source loses about 0.4 % of a
  group's range at most.
- 4 bits (the lighter head: half the bytes the head streams per token): W = (q - 8) * scale, the symmetric grid of
  the integer methods. When the head is tied and calibration inputs are at hand, the codes come from GPTQ against
  the Hessian of the head's inputs (the final normed hidden states), which weighs each column by what the logits
  see; the embedding rows decode from the same codes. Otherwise round to nearest.
- VQ (`vq`, lighter still): GPTVQ's mobile format (2D vectors, 64-entry int8 codebooks per 32 rows x 256 columns,
  3.125 bits per value), quantized by GPTVQ against the same Hessian (the identity for an untied embedding), a block
  of rows at a time (codebooks never span two row blocks, so the blocks join into one weight). The head then runs
  through the VQ kernels of the decoder layers: on SmolLM2 it streams 11.2 MB per token instead of int4's 15.9.

QuantEmbedding gathers and dequantizes only the rows it looks up (standard ops, so it exports as-is) and applies the
output scale of the embedding it replaces (Gemma multiplies by sqrt(hidden)); a head tied to the embedding becomes a
QuantLinear over the very same IntWeight, stored once. Large vocabularies (Gemma 3: 262,144 x 640, 671 MB in float32)
are quantized and checked a block of rows at a time, so no float temporary of the whole matrix is made beside the
loaded weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats.base import QuantizedWeight
from .formats.intweight import IntGrid, IntWeight, n_groups, quantize_to_grid
from .formats.pack import gather_codes
from .formats.vqweight import VQWeight
from .layers import QuantLinear

BITS, GROUP = 8, 32  # the default embedding
KINDS = ("int8", "int4", "vq")  # the quantized embeddings
VQ_PRESET = "mobile"  # GPTVQ's preset for kind "vq"
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


def unsupported(qweight: QuantizedWeight) -> str | None:
    """Why `qweight` cannot be an embedding (None when it can): rows must decode with standard ops."""
    if isinstance(qweight, IntWeight):
        return None if qweight.bits in (4, 8) and qweight.symmetric else "integer embeddings are 4- or 8-bit symmetric"
    if isinstance(qweight, VQWeight):
        plain = qweight.codebook_kind == "int8" and qweight.svd is None and qweight.norm is None
        return None if plain else "VQ embeddings have plain int8 codebooks"
    return f"a {qweight.kind} weight cannot be an embedding"


def _vq_blocks(v: int, rows_per_block: int) -> list[tuple[int, int]]:
    """Row ranges of about ROWS rows; a last range shorter than one codebook block joins the one before, since a
    weight shorter than its block gets a shorter block (GPTVQConfig.layer_geometry) and the parts must match."""
    starts = list(range(0, v, ROWS))
    if len(starts) > 1 and v - starts[-1] < rows_per_block:
        starts.pop()
    return [(s, e) for s, e in zip(starts, starts[1:] + [v])]


def quantize_embedding(weight: torch.Tensor, kind: str = "int8", hessian: torch.Tensor | None = None
                       ) -> QuantizedWeight:
    """[vocab, hidden] float -> one of KINDS. int8: symmetric groups of 32, scale max|w| / 127 (rounded to fp16
    first, so the codes are computed with the scale that is stored), one byte per code. int4: GPTQ against `hessian`
    [hidden, hidden] (the head's inputs) when given, else round to nearest. vq: GPTVQ (VQ_PRESET) against `hessian`,
    or the identity when there is none."""
    from .quantizers.gptq import GPTQConfig
    from .quantizers.gptvq import GPTVQConfig
    from .quantizers.rtn import RTNConfig

    if kind not in KINDS:
        raise ValueError(f"embedding kind must be one of {KINDS}, got {kind!r}")
    v, h = weight.shape
    if kind == "vq":
        cfg = GPTVQConfig.from_target(preset=VQ_PRESET)
        hess = hessian if hessian is not None else torch.eye(h)
        r = cfg.layer_geometry(v, h).rows_per_block
        parts = [cfg.quantize_weight(weight[s:e].detach().float(), hess) for s, e in _vq_blocks(v, r)]
        return parts[0] if len(parts) == 1 else VQWeight.stack_rows(parts)
    bits = int(kind[3:])
    if bits == BITS:
        blocks = [_quantize_rows(weight[s:s + ROWS].detach()) for s in range(0, v, ROWS)]
        return IntWeight(torch.cat([c for c, _ in blocks]), torch.cat([s for _, s in blocks]), None, bits=BITS,
                         group=GROUP, shape=(v, h))
    # GPTQ treats rows independently given the Hessian: blocks of rows keep the float temporaries small.
    cfg = (GPTQConfig if hessian is not None else RTNConfig)(bits=bits, group=GROUP, symmetric=True)
    blocks = [cfg.quantize_weight(weight[s:s + ROWS].detach().float(), hessian) for s in range(0, v, ROWS)]
    return IntWeight(torch.cat([b.codes for b in blocks]), torch.cat([b.scales for b in blocks]), None, bits=bits,
                     group=GROUP, shape=(v, h))


def _dequantize_rows(qw: QuantizedWeight, rows) -> torch.Tensor:
    """The float rows `rows` (indices of any shape, or a slice) in standard ops only, so that it exports as is; equal
    to the same rows of qw.dequantize(), bit for bit."""
    n, h = qw.shape
    if isinstance(qw, IntWeight):
        q = gather_codes(qw.codes[rows], qw.bits, h).to(torch.float32) - float(1 << (qw.bits - 1))
        return q * qw.scales[rows].to(torch.float32).repeat_interleave(qw.group, dim=-1)[..., :h]
    from .ops.vq import vq_rows

    g = qw.geom
    return vq_rows(qw.codebook, qw.codebook_scale, gather_codes(qw.indices[rows], g.bits, g.vectors),
                   torch.arange(n)[rows], h, g.d, g.rows_per_block, g.cols_per_block)


def max_abs_error(qweight: QuantizedWeight, weight: torch.Tensor) -> float:
    """max |dequantized - weight| over the whole matrix, a block of rows at a time."""
    v = weight.shape[0]
    return max(float((_dequantize_rows(qweight, slice(s, s + ROWS)) - weight[s:s + ROWS].float()).abs().max())
               for s in range(0, v, ROWS))


def output_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The factor an embedding module multiplies its rows by (Gemma's embed_scale, sqrt(hidden)), None if none."""
    scale = getattr(embedding, "embed_scale", None)
    return None if scale is None else torch.as_tensor(scale, dtype=torch.float32).detach().clone()


class QuantEmbedding(nn.Module):
    """nn.Embedding over a quantized weight (see `unsupported`): forward(ids) dequantizes the looked-up rows only,
    then applies the output scale of the embedding it replaced, if any (the same float32 product as that module's)."""

    def __init__(self, qweight: QuantizedWeight, embed_scale: torch.Tensor | None = None):
        super().__init__()
        why = unsupported(qweight)
        if why:
            raise ValueError(f"QuantEmbedding cannot hold this weight: {why}")
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
        return f"{self.num_embeddings}, {self.embedding_dim}, {describe(self.qweight)}{scaled}"


def describe(qweight: QuantizedWeight) -> str:
    """A few words naming an embedding's format."""
    if isinstance(qweight, IntWeight):
        return f"int{qweight.bits} groups of {qweight.group}"
    g = qweight.geom
    return f"VQ {g.d}D k={g.k} per {g.rows_per_block} x {g.cols_per_block}"


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


def use_quantized_embedding(model: nn.Module, qweight: QuantizedWeight, tie_head: bool) -> None:
    """Install `qweight` as the model's embedding (with the output scale of the one it replaces) and, when
    `tie_head`, as its lm_head too."""
    model.set_input_embeddings(QuantEmbedding(qweight, output_scale(model.get_input_embeddings())))
    if tie_head:
        model.set_output_embeddings(QuantLinear(qweight))


def quantize_embeddings_(model: nn.Module, kind: str = "int8", head_hessian: torch.Tensor | None = None) -> float:
    """Quantize the token embedding of a HF causal LM in place as one of KINDS; a tied head follows it, an untied
    head stays float. head_hessian: the Hessian of a tied head's inputs, for GPTQ (int4) or GPTVQ (vq) (ignored when
    the head is untied: the embedding alone is looked up, not multiplied). Returns the largest absolute error of any
    embedding value (0.0 for a Q8_0 source at 8 bits)."""
    tie = tied_head(model)
    weight = model.get_input_embeddings().weight.detach()
    qweight = quantize_embedding(weight, kind, head_hessian if tie else None)
    err = max_abs_error(qweight, weight)
    use_quantized_embedding(model, qweight, tie)
    return err
