"""Integer format, RTN and GPTQ on real weights of stories260k with a real Hessian."""

import pytest
import torch

from vqmobile.errors import FormatError, UserError
from vqmobile.quantizers.gptq import GPTQConfig
from vqmobile.hessian import HessianAccumulator
from vqmobile.formats.intweight import IntWeight
from vqmobile.quantizers.rtn import RTNConfig


@pytest.fixture(scope="module")
def down_proj(stories, stories_calib):
    """Layer 1's down_proj (in_features 172, not a multiple of any group) and its real Hessian."""
    layer = stories.model.model.layers[1]
    acc = HessianAccumulator(172)
    h = layer.mlp.down_proj.register_forward_hook(lambda _m, a, _o: acc.add(a[0]))
    with torch.no_grad():
        stories.model(stories_calib[:4])
    h.remove()
    return layer.mlp.down_proj.weight.detach().float(), acc.value()


def proxy_loss(w, q, h):
    d = q - w
    return torch.trace(d @ h @ d.T).item()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_round_trip_and_error(down_proj, bits, symmetric):
    w, _ = down_proj
    qw = RTNConfig(bits=bits, group=32, symmetric=symmetric).quantize_weight(w, None)
    deq = qw.dequantize()
    # Every weight lies within half a step of its grid point (clamping only at the group's min/max).
    step = qw.scales.float().repeat_interleave(32, 1)[:, :172]
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).float().mean() > 0.99
    again = IntWeight.from_stored(qw.spec(), qw.tensors())
    assert torch.equal(again.dequantize(), deq)
    n_groups = 6  # ceil(172 / 32)
    overhead_bits_per_row = n_groups * (16 + (0 if symmetric else 8))
    assert qw.stored_bytes() == w.shape[0] * ((172 * bits + 7) // 8 + overhead_bits_per_row // 8)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_hessian_loss(down_proj, act_order):
    w, h = down_proj
    rtn = RTNConfig(bits=3, group=32).quantize_weight(w, None).dequantize()
    gptq = GPTQConfig(bits=3, group=32, act_order=act_order).quantize_weight(w, h).dequantize()
    assert proxy_loss(w, gptq, h) < 0.8 * proxy_loss(w, rtn, h)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_lowers_rounding_error(down_proj, bits):
    w, h = down_proj
    err = {}
    for clip in (False, True):
        deq = RTNConfig(bits=bits, group=32, clip_search=clip).quantize_weight(w, None).dequantize()
        err[clip] = ((deq - w) ** 2).sum().item()
    assert err[True] < 0.95 * err[False]
    gptq = {clip: GPTQConfig(bits=bits, group=32, clip_search=clip).quantize_weight(w, h).dequantize()
            for clip in (False, True)}
    assert proxy_loss(w, gptq[True], h) < proxy_loss(w, gptq[False], h)


def test_gptq_per_channel(down_proj):
    w, h = down_proj
    qw = GPTQConfig(bits=4, group=0).quantize_weight(w, h)
    assert qw.group == 172 and qw.scales.shape == (w.shape[0], 1)


def test_tampered_format_is_rejected(down_proj):
    w, _ = down_proj
    qw = RTNConfig(bits=4, group=32).quantize_weight(w, None)
    t = qw.tensors()
    with pytest.raises(FormatError, match="codes"):
        IntWeight.from_stored(qw.spec(), {**t, "codes": t["codes"][:, :-1].contiguous()})
    with pytest.raises(FormatError, match="zero point"):
        IntWeight.from_stored(qw.spec(), {**t, "zeros": torch.full_like(t["zeros"], 200)})
    with pytest.raises(FormatError, match="missing"):
        IntWeight.from_stored(qw.spec(), {"codes": t["codes"]})


@pytest.mark.parametrize("kwargs,match", [({"bits": 9}, "--bits 9"), ({"bits": 1}, "--bits 1"),
                                           ({"group": 7}, "--group 7"), ({"group": -1}, "--group -1")])
def test_out_of_range_options(kwargs, match):
    with pytest.raises(UserError, match=match):
        RTNConfig(**kwargs)


def test_group_wider_than_layer():
    with pytest.raises(UserError, match="does not fit layer x: its input width is 64"):
        GPTQConfig(group=128).check_layer("x", 64, 64)
