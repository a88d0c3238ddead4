"""Vector-quantized weights (GPTVQ): the stored format, kind "vq".

Layout (read directly by the native kernels, do not change it without them). W has N rows and K columns; d
consecutive weights of a row along K form one vector; a row has V = ceil(K/d) vectors, the last one partial when
K % d != 0 (its missing components do not exist). Each vector is stored as the index of a centroid in a codebook of
k <= 2^b entries; one codebook serves a block of R rows x C columns (C a multiple of d):

    indices         uint8 [N, ceil(V*b/8)]       per-row little-endian bitstream of b-bit indices (pack.py)
    codebook        int8  [ceil(N/R), ceil(K/C), k, d]
    codebook_scale  fp16  [ceil(N/R), ceil(K/C)]   symmetric per-codebook scale, max|c|/127

    W[n, j*d + t] = codebook[n // R, (j*d) // C, idx[n, j], t] * codebook_scale[n // R, (j*d) // C]

fp16 codebooks store `codebook` as float16 of the same shape and no scale. Options that replace or extend this:

- int4 codebooks: `codebook_int4` uint8 [ceil(N/R), ceil(K/C), ceil(k*d/2)]: the codebook's k*d values (centroid-major,
  then component) as two's-complement nibbles, low nibble first, in [-7, 7]; `codebook_scale` is max|c|/7.
- SVD-compressed codebooks (d = 1 only): no `codebook`; the G = ceil(N/R)*ceil(K/C) codebooks (row-major over the
  block grid) form a G x k matrix stored as the rank-r product
      codebook[g, a, 0] = sum_j (svd_u[g, j] * svd_u_scale[j]) * (svd_v[j, a] * svd_v_scale[j])
  with svd_u int8 [G, r], svd_v int8 [r, k], svd_u_scale/svd_v_scale fp16 [r].
- blockwise normalization: every run of S columns of a row (a "sub-row") has a scale 2^(lo + code*step) with a
  nb-bit code: `norm_codes` uint8 [N, ceil(ceil(K/S)*nb/8)] (per-row bitstream) and `norm_range` fp32 [2] = (lo,
  step); the decoded value above is multiplied by the scale of its sub-row.

`dequantize` (the reference decode) reconstructs all of these; the native kernel covers the plain int8 layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FormatError
from .base import QuantizedWeight, Trainable, expect_tensor, register_format
from .pack import pack_rows, row_bytes, unpack_rows

CODEBOOK_KINDS = ("int8", "int4", "fp16")
MAX_INDEX_BITS = 8
INT_MAX = {"int8": 127, "int4": 7}


@dataclass(frozen=True)
class VQGeometry:
    """Shape bookkeeping shared by the format, the column pass and the codebook update."""

    n: int  # rows N
    cols: int  # columns K
    d: int  # vector dimension
    k: int  # centroids per codebook
    rows_per_block: int  # R
    cols_per_block: int  # C (multiple of d)

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.k)))

    @property
    def vectors(self) -> int:  # V
        return -(-self.cols // self.d)

    @property
    def row_blocks(self) -> int:
        return -(-self.n // self.rows_per_block)

    @property
    def col_blocks(self) -> int:
        return -(-self.cols // self.cols_per_block)

    @property
    def groups(self) -> int:
        return self.row_blocks * self.col_blocks

    def code_offsets(self) -> torch.Tensor:
        """int64 [N, V]: flat index of the first centroid of the codebook each vector uses (in [G*k])."""
        rb = torch.arange(self.n).div(self.rows_per_block, rounding_mode="floor")
        cb = (torch.arange(self.vectors) * self.d).div(self.cols_per_block, rounding_mode="floor")
        return (rb[:, None] * self.col_blocks + cb[None, :]) * self.k


def expand(codebooks: torch.Tensor, idx: torch.Tensor, geom: VQGeometry, offsets: torch.Tensor | None = None
           ) -> torch.Tensor:
    """codebooks float [ceil(N/R), ceil(K/C), k, d], idx int64 [N, V] -> W float [N, K]."""
    flat = (geom.code_offsets() if offsets is None else offsets) + idx
    vals = codebooks.reshape(-1, geom.d)[flat]  # [N, V, d]
    return vals.reshape(geom.n, geom.vectors * geom.d)[:, : geom.cols]


def expand_adjoint(grad: torch.Tensor, idx: torch.Tensor, geom: VQGeometry, offsets: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Adjoint of expand: scatter-add grad [N, K] onto the codebook entries -> [ceil(N/R), ceil(K/C), k, d]."""
    flat = (geom.code_offsets() if offsets is None else offsets) + idx
    pad = geom.vectors * geom.d - geom.cols
    g = torch.nn.functional.pad(grad, (0, pad)) if pad else grad
    out = torch.zeros(geom.groups * geom.k, geom.d, dtype=grad.dtype)
    out.index_add_(0, flat.reshape(-1), g.reshape(-1, geom.d))
    return out.reshape(geom.row_blocks, geom.col_blocks, geom.k, geom.d)


def quantize_codebooks(c: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Round codebooks [..., k, d] to their stored precision.

    int8/int4: symmetric per codebook, scale = max|c|/127 (or /7), rounded to fp16 first so the stored scale and the
    one used here agree. Returns (values float32 exactly as decoded, integer values or None, scale [...] or None)."""
    if kind == "fp16":
        return c.to(torch.float16).float(), None, None
    qmax = INT_MAX[kind]
    amax = c.abs().amax(dim=(-2, -1))
    scale = (amax / qmax).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -24))
    ints = torch.clamp(torch.round(c / scale[..., None, None]), -qmax, qmax)
    return ints * scale[..., None, None], ints, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [..., m] in [-8, 7] -> uint8 [..., ceil(m/2)], two's-complement nibbles, low nibble first."""
    lead = q.shape[:-1]
    flat = (q.reshape(-1, q.shape[-1]).to(torch.int64) & 0xF)
    packed = pack_rows(flat, 4)
    return packed.reshape(*lead, packed.shape[-1])


def unpack_int4(p: torch.Tensor, m: int) -> torch.Tensor:
    lead = p.shape[:-1]
    u = unpack_rows(p.reshape(-1, p.shape[-1]), 4, m)
    return torch.where(u >= 8, u - 16, u).reshape(*lead, m)


def norm_scale_values(codes: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    """Blockwise-normalization scales 2^(lo + code*step) (float32; rng = float32 [lo, step])."""
    r = rng.float()
    return torch.exp2(r[0] + codes.float() * r[1])


def _finite_positive(t: torch.Tensor, name: str) -> None:
    f = t.float()
    if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
        raise FormatError(f"tensor '{name}' has non-finite or non-positive scales")


@register_format
class VQWeight(QuantizedWeight):
    kind = "vq"

    def __init__(self, geom: VQGeometry, indices: torch.Tensor, *, codebook_kind: str,
                 codebook: torch.Tensor | None = None, codebook_scale: torch.Tensor | None = None,
                 svd: dict[str, torch.Tensor] | None = None, norm: dict[str, Any] | None = None):
        """Build from already-stored tensors; use from_parts() to build from float codebooks and indices."""
        self.geom = geom
        self.indices = indices
        self.codebook_kind = codebook_kind
        self.codebook = codebook
        self.codebook_scale = codebook_scale
        self.svd = svd  # {"svd_u", "svd_u_scale", "svd_v", "svd_v_scale"} or None
        self.norm = norm  # {"block": S, "bits": nb, "codes": uint8, "range": fp32 [2]} or None

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_parts(cls, geom: VQGeometry, idx: torch.Tensor, *, codebook_kind: str,
                   codebook_ints: torch.Tensor | None = None, codebook_scale: torch.Tensor | None = None,
                   codebook_float: torch.Tensor | None = None, svd: dict[str, torch.Tensor] | None = None,
                   norm: dict[str, Any] | None = None) -> "VQWeight":
        """idx int [N, V]; int8/int4: integer codebook values + fp16-exact scales; fp16: float codebook; or svd."""
        indices = pack_rows(idx.to(torch.int64), geom.bits)
        codebook = None
        if svd is None:
            if codebook_kind == "fp16":
                codebook = codebook_float.to(torch.float16).contiguous()
                codebook_scale = None
            elif codebook_kind == "int8":
                codebook = codebook_ints.to(torch.int8).contiguous()
            else:
                codebook = pack_int4(codebook_ints.reshape(geom.row_blocks, geom.col_blocks, -1)).contiguous()
            if codebook_scale is not None:
                codebook_scale = codebook_scale.to(torch.float16).contiguous()
        else:
            codebook_scale = None
        return cls(geom, indices, codebook_kind=codebook_kind, codebook=codebook, codebook_scale=codebook_scale,
                   svd=svd, norm=norm)

    # ------------------------------------------------------------------------------------------------- interface
    @property
    def shape(self) -> tuple[int, int]:
        return self.geom.n, self.geom.cols

    def index_codes(self) -> torch.Tensor:
        """int64 [N, V]."""
        return unpack_rows(self.indices, self.geom.bits, self.geom.vectors)

    def codebooks(self) -> torch.Tensor:
        """The float32 codebooks [ceil(N/R), ceil(K/C), k, d] this weight decodes with."""
        g = self.geom
        if self.svd is not None:
            u = self.svd["svd_u"].float() * self.svd["svd_u_scale"].float()[None, :]
            v = self.svd["svd_v"].float() * self.svd["svd_v_scale"].float()[:, None]
            return (u @ v).reshape(g.row_blocks, g.col_blocks, g.k, 1)
        if self.codebook_kind == "fp16":
            return self.codebook.float()
        if self.codebook_kind == "int8":
            ints = self.codebook.float()
        else:
            ints = unpack_int4(self.codebook, g.k * g.d).float().reshape(g.row_blocks, g.col_blocks, g.k, g.d)
        return ints * self.codebook_scale.float()[:, :, None, None]

    def norm_scales(self) -> torch.Tensor | None:
        """float32 [N, ceil(K/S)] sub-row scales, or None without blockwise normalization."""
        if self.norm is None:
            return None
        nsub = -(-self.geom.cols // self.norm["block"])
        return norm_scale_values(unpack_rows(self.norm["codes"], self.norm["bits"], nsub), self.norm["range"])

    def dequantize(self) -> torch.Tensor:
        w = expand(self.codebooks(), self.index_codes(), self.geom)
        s = self.norm_scales()
        if s is not None:
            w = w * s.repeat_interleave(self.norm["block"], dim=1)[:, : self.geom.cols]
        return w

    def trainable(self) -> Trainable | None:
        """The codebook entries (float32, as decoded); SVD-compressed codebooks are not tuned."""
        if self.svd is not None:
            return None
        g = self.geom
        idx, offsets = self.index_codes(), g.code_offsets()
        s = self.norm_scales()
        s = None if s is None else s.repeat_interleave(self.norm["block"], dim=1)[:, : g.cols]

        def decode(p: dict[str, torch.Tensor]) -> torch.Tensor:
            w = expand(p["codebook"], idx, g, offsets)
            return w if s is None else w * s

        return Trainable({"codebook": self.codebooks()}, decode)

    def _store_trainable(self, params: dict[str, torch.Tensor]) -> None:
        vals, ints, scale = quantize_codebooks(params["codebook"], self.codebook_kind)
        g = self.geom
        if self.codebook_kind == "fp16":
            self.codebook = vals.to(torch.float16).contiguous()
        elif self.codebook_kind == "int8":
            self.codebook = ints.to(torch.int8).contiguous()
        else:
            self.codebook = pack_int4(ints.reshape(g.row_blocks, g.col_blocks, -1)).contiguous()
        if scale is not None:
            self.codebook_scale = scale.to(torch.float16).contiguous()

    @classmethod
    def stack_rows(cls, parts: list[QuantizedWeight]) -> "VQWeight | None":
        """Plain int8 codebooks of one geometry but the row count, every part but the last a whole number of row
        blocks (so no codebook serves rows of two parts)."""
        g0 = parts[0].geom
        same = all(type(p) is cls and p.codebook_kind == "int8" and p.svd is None and p.norm is None
                   and (p.geom.cols, p.geom.d, p.geom.k, p.geom.rows_per_block, p.geom.cols_per_block)
                   == (g0.cols, g0.d, g0.k, g0.rows_per_block, g0.cols_per_block) for p in parts)
        if not same or any(p.geom.n % g0.rows_per_block for p in parts[:-1]):
            return None
        geom = VQGeometry(sum(p.geom.n for p in parts), g0.cols, g0.d, g0.k, g0.rows_per_block, g0.cols_per_block)
        return cls(geom, torch.cat([p.indices for p in parts]), codebook_kind="int8",
                   codebook=torch.cat([p.codebook for p in parts]),
                   codebook_scale=torch.cat([p.codebook_scale for p in parts]))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"indices": self.indices}
        if self.svd is not None:
            out.update(self.svd)
        elif self.codebook_kind == "int4":
            out["codebook_int4"] = self.codebook
        else:
            out["codebook"] = self.codebook
        if self.codebook_scale is not None:
            out["codebook_scale"] = self.codebook_scale
        if self.norm is not None:
            out["norm_codes"] = self.norm["codes"]
            out["norm_range"] = self.norm["range"]
        return out

    def spec(self) -> dict[str, Any]:
        g = self.geom
        return {
            "shape": [g.n, g.cols], "dim": g.d, "k": g.k, "bits": g.bits,
            "rows_per_block": g.rows_per_block, "cols_per_block": g.cols_per_block,
            "codebook": self.codebook_kind,
            "svd_rank": None if self.svd is None else int(self.svd["svd_v"].shape[0]),
            "norm_block": None if self.norm is None else self.norm["block"],
            "norm_bits": None if self.norm is None else self.norm["bits"],
        }

    # ---------------------------------------------------------------------------------------------- validation
    @classmethod
    def from_stored(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "VQWeight":
        try:
            n, cols = (int(v) for v in spec["shape"])
            d, k, bits = int(spec["dim"]), int(spec["k"]), int(spec["bits"])
            rpb, cpb = int(spec["rows_per_block"]), int(spec["cols_per_block"])
            kind = str(spec["codebook"])
            svd_rank = None if spec.get("svd_rank") is None else int(spec["svd_rank"])
            norm_block = None if spec.get("norm_block") is None else int(spec["norm_block"])
            norm_bits = None if spec.get("norm_bits") is None else int(spec["norm_bits"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
            raise FormatError(f"vq weight spec is malformed ({e!r})") from None
        if n < 1 or cols < 1 or not 1 <= d <= 64 or rpb < 1 or cpb < d or cpb % d:
            raise FormatError(f"vq weight spec is out of range: shape={n}x{cols} dim={d} block={rpb}x{cpb}")
        if not 2 <= k <= (1 << MAX_INDEX_BITS) or bits != max(1, math.ceil(math.log2(k))):
            raise FormatError(f"vq weight spec is out of range: k={k} with {bits}-bit indices")
        if kind not in CODEBOOK_KINDS:
            raise FormatError(f"vq weight spec has unknown codebook type '{kind}' (known: {', '.join(CODEBOOK_KINDS)})")
        geom = VQGeometry(n, cols, d, k, rpb, cpb)
        indices = expect_tensor(tensors, "indices", torch.uint8, (n, row_bytes(geom.vectors, bits)))
        idx = unpack_rows(indices, bits, geom.vectors)
        if idx.numel() and int(idx.max()) >= k:
            raise FormatError(f"vq index {int(idx.max())} is out of range for a codebook of {k} entries")
        nbr, nbc = geom.row_blocks, geom.col_blocks
        codebook = scale = svd = None
        if svd_rank is not None:
            if d != 1 or kind != "int8" or not 1 <= svd_rank <= k:
                raise FormatError(f"vq SVD codebooks need dim 1, int8 factors and 1 <= rank <= {k}; "
                                  f"got dim={d} codebook={kind} rank={svd_rank}")
            svd = {
                "svd_u": expect_tensor(tensors, "svd_u", torch.int8, (geom.groups, svd_rank)),
                "svd_u_scale": expect_tensor(tensors, "svd_u_scale", torch.float16, (svd_rank,)),
                "svd_v": expect_tensor(tensors, "svd_v", torch.int8, (svd_rank, k)),
                "svd_v_scale": expect_tensor(tensors, "svd_v_scale", torch.float16, (svd_rank,)),
            }
            _finite_positive(svd["svd_u_scale"], "svd_u_scale")
            _finite_positive(svd["svd_v_scale"], "svd_v_scale")
        elif kind == "fp16":
            codebook = expect_tensor(tensors, "codebook", torch.float16, (nbr, nbc, k, d))
            if not bool(torch.isfinite(codebook.float()).all()):
                raise FormatError("tensor 'codebook' has non-finite values")
        else:
            if kind == "int8":
                codebook = expect_tensor(tensors, "codebook", torch.int8, (nbr, nbc, k, d))
                if codebook.numel() and int(codebook.to(torch.int16).min()) < -127:
                    raise FormatError("tensor 'codebook' holds -128, outside the symmetric int8 range")
            else:
                codebook = expect_tensor(tensors, "codebook_int4", torch.uint8, (nbr, nbc, row_bytes(k * d, 4)))
                if int(unpack_int4(codebook, k * d).min()) < -7:
                    raise FormatError("tensor 'codebook_int4' holds -8, outside the symmetric int4 range")
            scale = expect_tensor(tensors, "codebook_scale", torch.float16, (nbr, nbc))
            _finite_positive(scale, "codebook_scale")
        norm = None
        if norm_block is not None or norm_bits is not None:
            if norm_block is None or norm_bits is None or norm_block < d or norm_block % d or not 1 <= norm_bits <= 8:
                raise FormatError(f"vq normalization spec is out of range: block={norm_block} bits={norm_bits}")
            nsub = -(-cols // norm_block)
            codes = expect_tensor(tensors, "norm_codes", torch.uint8, (n, row_bytes(nsub, norm_bits)))
            rng = expect_tensor(tensors, "norm_range", torch.float32, (2,))
            if not bool(torch.isfinite(rng).all()) or float(rng[1]) < 0 or abs(float(rng[0])) > 126 or \
                    float(rng[0]) + float(rng[1]) * ((1 << norm_bits) - 1) > 126:
                raise FormatError("tensor 'norm_range' is out of range")
            norm = {"block": norm_block, "bits": norm_bits, "codes": codes, "range": rng}
        extra = set(tensors) - set(["indices", "codebook", "codebook_int4", "codebook_scale", "svd_u", "svd_u_scale",
                                    "svd_v", "svd_v_scale", "norm_codes", "norm_range"])
        if extra:
            raise FormatError(f"vq weight has unexpected tensors: {', '.join(sorted(extra))}")
        w = cls(geom, indices, codebook_kind=kind, codebook=codebook, codebook_scale=scale, svd=svd, norm=norm)
        if set(w.tensors()) != set(tensors):
            raise FormatError(f"vq weight tensors {sorted(tensors)} do not match its spec {sorted(w.tensors())}")
        return w
