"""vqmobile::rms_norm, vqmobile::add_rms_norm, vqmobile::rope and vqmobile::silu_mul: the exported decoders' steps
between the linears and attention, one call each: norms (with the residual connection before them), rotary embedding
and the MLP's SiLU-gated product.

    vqmobile::rms_norm(Tensor x, Tensor weight, float eps, float offset=0.) -> Tensor
    vqmobile::add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, float offset=0.) -> (Tensor, Tensor)
    vqmobile::rope(Tensor x, Tensor cos, Tensor sin) -> Tensor
    vqmobile::silu_mul(Tensor gate_up) -> Tensor

rms_norm: float32 x [..., d] -> (x * rsqrt(mean(x^2) + eps)) * (offset + weight) over the last dimension (offset 0:
Llama, Qwen, Phi; 1: Gemma, whose weight is stored minus one); add_rms_norm: (x + residual, rms_norm of that sum).
rope: x float32 [T, H, D], a projection's output with its heads side by side, and cos, sin [1, T, R] (R <= D, even)
-> [T, H, D], the first R features of each head rotated (rotate-half convention), the rest copied. silu_mul: gate_up
float32 [..., 2n], a stacked gate/up projection's output -> silu(gate) * up [..., n].

In standard ops a norm is a portable mean between two XNNPACK partitions, a RoPE two slices, a concatenation and a
partition, a residual sum and the gated product (after a split) partitions of their own, each call costing an
ExecuTorch program more than a 576-wide row's arithmetic. CPU and the ExecuTorch adapter run the native kernels
(vqm_rms_norm, vqm_add_rms_norm, vqm_rope, vqm_silu_mul); the decompositions are the standard ops the Hugging Face
modules run. export/model.py uses rms_norm only for a norm that `rms_norm_form` recognizes, silu_mul only for an
activation that `is_silu` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import NAMESPACE, lib, native, write_out

lib.define("rms_norm(Tensor x, Tensor weight, float eps, float offset=0.) -> Tensor")
lib.define("rms_norm.out(Tensor x, Tensor weight, float eps, float offset=0., *, Tensor(a!) out) -> Tensor(a!)")
lib.define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, float offset=0.) -> (Tensor, Tensor)")
lib.define("add_rms_norm.out(Tensor x, Tensor residual, Tensor weight, float eps, float offset=0., *, "
           "Tensor(a!) total, Tensor(b!) out) -> (Tensor(a!), Tensor(b!))")
lib.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
lib.define("rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out) -> Tensor(a!)")
lib.define("silu_mul(Tensor gate_up) -> Tensor")
lib.define("silu_mul.out(Tensor gate_up, *, Tensor(a!) out) -> Tensor(a!)")


def rms_norm_decomposed(x, weight, eps, offset=0.0):
    xf = x.to(torch.float32)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * (offset + weight)


def add_rms_norm_decomposed(x, residual, weight, eps, offset=0.0):
    total = x + residual
    return total, rms_norm_decomposed(total, weight, eps, offset)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_decomposed(x, cos, sin):
    """RoPE of x [T, H, D] on the first cos.shape[-1] features of each head."""
    x = x.to(torch.float32)
    cos, sin = cos.squeeze(0).unsqueeze(1), sin.squeeze(0).unsqueeze(1)  # [1, T, R] -> [T, 1, R]: every head
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr = x[..., :rot]
    return torch.cat((xr * cos + rotate_half(xr) * sin, x[..., rot:]), dim=-1)


def silu_mul_decomposed(gate_up):
    g, u = gate_up.to(torch.float32).chunk(2, dim=-1)
    return F.silu(g) * u


def is_silu(act: torch.nn.Module) -> bool:
    """Whether the activation module computes SiLU, judged on its outputs for a random input."""
    x = 4 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(act(x), F.silu(x))


def rms_norm_form(module: torch.nn.Module) -> tuple[torch.Tensor, float, float] | None:
    """(weight, eps, offset) when `module` computes rms_norm's values exactly, judged on its own outputs for a random
    input, else None: a norm of another kind (or with other arithmetic) keeps running as itself."""
    w = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.dtype != torch.float32 or not isinstance(eps, float):
        return None
    x = 3 * torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = module(x)
        for offset in (0.0, 1.0):
            if torch.equal(rms_norm_decomposed(x, w, eps, offset), y):
                return w, eps, offset
    return None


@torch.library.impl(lib, "rms_norm", "CPU")
def _rms_norm_cpu(x, weight, eps, offset=0.0):
    if native is None:
        return rms_norm_decomposed(x, weight, eps, offset)
    return native.rms_norm(x, weight.to(torch.float32).contiguous(), eps, offset)


@torch.library.impl(lib, "rms_norm.out", "CPU")
def _rms_norm_out_cpu(x, weight, eps, offset=0.0, *, out):
    return write_out(out, _rms_norm_cpu(x, weight, eps, offset))


@torch.library.register_fake(f"{NAMESPACE}::rms_norm")
def _rms_norm_fake(x, weight, eps, offset=0.0):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::rms_norm.out")
def _rms_norm_out_fake(x, weight, eps, offset=0.0, *, out):
    return out


@torch.library.impl(lib, "add_rms_norm", "CPU")
def _add_rms_norm_cpu(x, residual, weight, eps, offset=0.0):
    if native is None:
        return add_rms_norm_decomposed(x, residual, weight, eps, offset)
    return native.rms_norm(x, weight.to(torch.float32).contiguous(), eps, offset, residual=residual)


@torch.library.impl(lib, "add_rms_norm.out", "CPU")
def _add_rms_norm_out_cpu(x, residual, weight, eps, offset=0.0, *, total, out):
    s, y = _add_rms_norm_cpu(x, residual, weight, eps, offset)
    return write_out(total, s), write_out(out, y)


@torch.library.register_fake(f"{NAMESPACE}::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps, offset=0.0):
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::add_rms_norm.out")
def _add_rms_norm_out_fake(x, residual, weight, eps, offset=0.0, *, total, out):
    return total, out


@torch.library.impl(lib, "rope", "CPU")
def _rope_cpu(x, cos, sin):
    if native is None:
        return rope_decomposed(x, cos, sin)
    return native.rope(x, cos.to(torch.float32), sin.to(torch.float32))


@torch.library.impl(lib, "rope.out", "CPU")
def _rope_out_cpu(x, cos, sin, *, out):
    return write_out(out, _rope_cpu(x, cos, sin))


@torch.library.register_fake(f"{NAMESPACE}::rope")
def _rope_fake(x, cos, sin):
    torch._check(cos.shape[-1] <= x.shape[-1], lambda: "rope: the rotary dimension exceeds the head dimension")
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::rope.out")
def _rope_out_fake(x, cos, sin, *, out):
    return out


@torch.library.impl(lib, "silu_mul", "CPU")
def _silu_mul_cpu(gate_up):
    if native is None:
        return silu_mul_decomposed(gate_up)
    return native.silu_mul(gate_up)


@torch.library.impl(lib, "silu_mul.out", "CPU")
def _silu_mul_out_cpu(gate_up, *, out):
    return write_out(out, _silu_mul_cpu(gate_up))


@torch.library.register_fake(f"{NAMESPACE}::silu_mul")
def _silu_mul_fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::silu_mul.out")
def _silu_mul_out_fake(gate_up, *, out):
    return out
