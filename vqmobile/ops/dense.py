"""vqmobile::dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor: a float32 linear whose weight is read in
place as [n, k]. The exported decoders use it for an lm_head tied to a float embedding, so that the program stores that
matrix once instead of once more inside an XNNPACK delegate. No stored format binds to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import NAMESPACE, bias32, lib, write_out

lib.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
lib.define("dense_linear.out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)")


def dense_linear_decomposed(x, weight, bias):
    return F.linear(x.to(torch.float32), weight.to(torch.float32), bias)


@torch.library.impl(lib, "dense_linear", "CPU")
def _dense_linear_cpu(x, weight, bias):
    return F.linear(x.to(torch.float32), weight.to(torch.float32), bias32(bias))


@torch.library.impl(lib, "dense_linear.out", "CPU")
def _dense_linear_out_cpu(x, weight, bias, *, out):
    return write_out(out, _dense_linear_cpu(x, weight, bias))


@torch.library.register_fake(f"{NAMESPACE}::dense_linear")
def _dense_linear_fake(x, weight, bias):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "dense_linear: x and weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::dense_linear.out")
def _dense_linear_out_fake(x, weight, bias, *, out):
    return out


