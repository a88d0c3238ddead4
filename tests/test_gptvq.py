"""GPTVQ on the real stories260k model: codebooks, the column pass, the VQ format, size accounting, bad input, and
end to end through the layer-wise pipeline and the checkpoint (every Hessian comes from real activations)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from vqmobile import checkpoint
from vqmobile.quantizers import codebook as cbk
from vqmobile.data import calibration_data
from vqmobile.errors import FormatError, UserError
from vqmobile.evaluate import perplexity
from vqmobile.quantizers.gptq import GPTQConfig
from vqmobile.quantizers.gptvq import GPTVQConfig, gptvq_quantize, nominal_bpv
from vqmobile.pipeline import quantize_
from vqmobile.layers import QuantLinear
from vqmobile.formats.vqweight import VQGeometry, VQWeight, expand, expand_adjoint

from conftest import WIKITEXT


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def calib16x128(stories):
    return calibration_data(stories.tokenizer, WIKITEXT / "wiki.valid.tokens", nsamples=16, seqlen=128, seed=0)


@pytest.fixture(scope="module")
def layers(stories, calib16x128):
    """Real weights and Hessians (from the float model's activations) of decoder layer 1's linears."""
    from vqmobile.pipeline import _capture_layer_inputs, _collect_hessians, _run_layer, linear_layers

    model = stories.model
    with torch.no_grad():
        inputs = _run_layer(model.model.layers[0], _capture_layer_inputs(model, calib16x128, 8)[0])
        mods = linear_layers(model.model.layers[1])
        hessians = _collect_hessians(model.model.layers[1], mods, inputs)
    return {n: (m.weight.detach().float().clone(), hessians[n]) for n, m in mods.items()}


def hloss(w, q, h):
    e = w - q
    return float(((e @ h) * e).sum())


# --------------------------------------------------------------------------------------------- size accounting
@pytest.mark.parametrize("bpv,dim,k,rows,cols", [
    (2.125, 1, 4, 1, 256), (2.125, 2, 16, 8, 256), (2.125, 4, 256, 256, 256),
    (2.25, 1, 4, 1, 128), (2.25, 2, 16, 4, 256), (2.25, 4, 256, 128, 256),
    (3.125, 1, 8, 2, 256), (3.125, 2, 64, 32, 256),
])
def test_from_target_picks_the_paper_configurations(bpv, dim, k, rows, cols):
    cfg = GPTVQConfig.from_target(bpv, dim)
    assert (cfg.vq_dim, cfg.k, cfg.rows_per_block, cfg.cols_per_block) == (dim, k, rows, cols)
    assert cfg.nominal_bpv() == pytest.approx(bpv)


def test_presets():
    mobile = GPTVQConfig.from_target(preset="mobile")
    assert (mobile.vq_dim, mobile.k, mobile.rows_per_block, mobile.cols_per_block) == (2, 64, 32, 256)
    assert mobile.nominal_bpv() == 3.125
    assert GPTVQConfig.from_target() == mobile  # no target at all: the mobile preset
    assert GPTVQConfig.from_target(preset="2.25", vq_dim=4).k == 256
    assert GPTVQConfig.from_target(preset="2.125").vq_dim == 2  # a bare target prefers 2D
    assert GPTVQConfig.from_target(2.125, 1, svd_rank=2).cols_per_block == 128  # SVD factors are cheaper: smaller l
    assert nominal_bpv(8, 256, 1 << 17) == 1.125  # d=8 works too


def test_stored_bpv_counts_every_byte(layers):
    """bits_per_weight comes from the stored tensors: index bitstreams (row padding included), codebooks, scales."""
    for name, (w, h) in layers.items():
        for cfg in (GPTVQConfig.from_target(3.125, 2), GPTVQConfig.from_target(2.25, 4, codebook="fp16"),
                    GPTVQConfig.from_target(2.125, 1)):
            qw, _ = gptvq_quantize(w, h, cfg)
            g = qw.geom
            n, kc = w.shape
            idx_bytes = n * math.ceil(math.ceil(kc / g.d) * g.bits / 8)
            cb_bytes = g.groups * g.k * g.d * (2 if cfg.codebook == "fp16" else 1)
            scale_bytes = 0 if cfg.codebook == "fp16" else 2 * g.groups
            assert qw.stored_bytes() == idx_bytes + cb_bytes + scale_bytes
            assert qw.bits_per_weight() == 8 * (idx_bytes + cb_bytes + scale_bytes) / (n * kc)


# ------------------------------------------------------------------------------------------------- codebooks
def test_em_lowers_the_weighted_error_and_seeds_are_real_vectors(layers):
    w, h = layers["mlp.down_proj"]
    x = w[:, :128].reshape(4, -1, 2)  # 4 blocks of 16 rows x 64 2D vectors
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    wt = (1.0 / torch.diagonal(h)[:128]).reshape(1, 1, 64, 2).expand(4, 16, 64, 2).reshape(4, -1, 2)
    seed = cbk.mahalanobis_seed(x, valid, 16)
    for b in range(4):  # every seed is one of the block's vectors
        assert all(bool(((x[b] == s).all(-1)).any()) for s in seed[b])

    def werr(c):
        a = cbk.nearest(x, wt, c)
        q = torch.gather(c, 1, a[..., None].expand(-1, -1, 2))
        return float((wt * (x - q) ** 2).sum())

    c, assign, iters = cbk.kmeans(x, wt, seed, iters=100)
    assert werr(c) < 0.7 * werr(seed)
    assert 1 < iters < 100  # converged (at most 0.1% of the assignments still changing)
    # Fewer vectors than centroids (a layer narrower than its block): handled, the vectors are reproduced exactly.
    c_small, _, _ = cbk.kmeans(x[:, :5], wt[:, :5], cbk.mahalanobis_seed(x[:, :5], valid[:, :5], 16), iters=10)
    assert werr_small_zero(x[:, :5], wt[:, :5], c_small)


def werr_small_zero(x, wt, c):
    a = cbk.nearest(x, wt, c)
    return torch.allclose(torch.gather(c, 1, a[..., None].expand(-1, -1, x.shape[-1])), x)


def test_nearest_matches_brute_force(layers):
    w, h = layers["self_attn.q_proj"]
    for d, k in ((1, 8), (2, 16), (4, 64)):
        x = w.reshape(2, -1, d)
        wt = torch.rand(1, x.shape[1], d, generator=torch.Generator().manual_seed(d)) + 0.1
        c = cbk.mahalanobis_seed(x, torch.ones(x.shape[:2], dtype=torch.bool), k) + 1e-3
        brute = ((x[:, :, None] - c[:, None]) ** 2 * wt[:, :, None]).sum(-1).argmin(-1)
        got = cbk.nearest(x, wt, c)
        bd = ((x - torch.gather(c, 1, brute[..., None].expand(-1, -1, d))) ** 2 * wt).sum(-1)
        gd = ((x - torch.gather(c, 1, got[..., None].expand(-1, -1, d))) ** 2 * wt).sum(-1)
        assert torch.allclose(gd, bd, rtol=1e-5, atol=1e-9)


def _dense_normal_equations(obj: cbk.Objective):
    """The normal matrix built explicitly (feasible only for tiny layers): columns = Q of each unit codebook."""
    shape = (obj.geom.row_blocks, obj.geom.col_blocks, obj.geom.k, obj.geom.d)
    m = torch.zeros(math.prod(shape), math.prod(shape), dtype=torch.float64)
    for i in range(m.shape[0]):
        e = torch.zeros(math.prod(shape))
        e[i] = 1
        m[:, i] = obj.adjoint(obj.q(e.reshape(shape)) @ obj.h).reshape(-1).double()
    b = obj.adjoint(obj.w @ obj.h).reshape(-1).double()
    return m, b, shape


def test_least_squares_update_is_exact_and_beats_adam(layers):
    w, h = layers["self_attn.k_proj"]  # 32 x 64
    cfg = GPTVQConfig(vq_dim=2, k=16, rows_per_block=16, cols_per_block=32, codebook="fp16", codebook_update=False)
    qw, st = gptvq_quantize(w, h, cfg)
    hd = h + cfg.damp * h.diagonal().mean() * torch.eye(64)
    obj = cbk.Objective(w, hd, qw.index_codes(), qw.geom)
    c0 = qw.codebooks()
    ls, iters = cbk.update_lstsq(obj, c0, iters=500, rtol=1e-7)
    m, b, shape = _dense_normal_equations(obj)
    exact = torch.linalg.lstsq(m, b).solution.float().reshape(shape)
    assert obj.loss(ls) == pytest.approx(obj.loss(exact), rel=1e-4)
    adam = cbk.update_adam(obj, c0, steps=25, lr=1e-3)
    assert obj.loss(ls) < obj.loss(adam) <= obj.loss(c0)
    # The default (50 iterations max) gets essentially all of it.
    ls50, _ = cbk.update_lstsq(obj, c0)
    assert obj.loss(ls50) <= obj.loss(exact) * 1.001
    assert obj.loss(ls50) < 0.97 * obj.loss(c0)


def test_expand_adjoint_is_the_transpose(layers):
    w, _ = layers["mlp.down_proj"]  # 64 x 172: partial last vector for d=8
    geom = VQGeometry(64, 172, 8, 16, 16, 176)
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(geom.row_blocks, geom.col_blocks, 16, 8, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 16, (64, geom.vectors), generator=gen)
    g = w.double()
    lhs = float((expand(c, idx, geom) * g).sum())
    rhs = float((c * expand_adjoint(g, idx, geom)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10)


def test_int_codebooks_are_symmetric_per_codebook(layers):
    w, _ = layers["mlp.gate_proj"]
    c = w[:2].reshape(2, 4, 16, 1)
    for kind, qmax in (("int8", 127), ("int4", 7)):
        vals, ints, scale = cbk.quantize_codebooks(c, kind)
        assert ints.abs().amax(dim=(-2, -1)).eq(qmax).all()
        assert torch.equal(scale, scale.half().float())
        assert torch.equal(vals, ints * scale[..., None, None])
        assert ((vals - c).abs() <= scale[..., None, None] / 2 + 1e-7).all()


# ------------------------------------------------------------------------------------------------ column pass
@pytest.mark.parametrize("dim", [1, 2, 4, 8])
def test_column_pass_beats_rounding_to_the_codebooks_and_handles_width_172(layers, dim):
    """GPTQ-style error feedback must beat assigning every vector to its nearest centroid with the same codebooks;
    down_proj is 172 wide (not a multiple of 8, narrower than a 256-column block)."""
    w, h = layers["mlp.down_proj"]
    cfg = GPTVQConfig(vq_dim=dim, k=16, rows_per_block=16, cols_per_block=min(256, 32 * dim), codebook="fp16",
                      codebook_update=False)
    qw, st = gptvq_quantize(w, h, cfg)
    assert qw.shape == (64, 172) and qw.geom.vectors == math.ceil(172 / dim)
    deq = qw.dequantize()
    # Plain nearest-centroid rounding (unweighted) of the original weight, with the pass's codebooks.
    geom = qw.geom
    pad = geom.vectors * dim - 172
    x = torch.nn.functional.pad(w, (0, pad)).reshape(64, geom.vectors, dim)
    cb = qw.codebooks()
    offs = geom.code_offsets()
    flat = cb.reshape(-1, dim)
    best = torch.stack([((x[:, j, None, :] - flat[offs[:, j, None] + torch.arange(16)]) ** 2)[..., : dim - (pad if j == geom.vectors - 1 else 0)].sum(-1).argmin(-1)
                        for j in range(geom.vectors)], 1)
    rtn = expand(cb, best, geom)
    assert hloss(w, deq, h) < 0.9 * hloss(w, rtn, h)
    assert st["loss_pass"] == pytest.approx(hloss(w, deq, h + 0.01 * h.diagonal().mean() * torch.eye(172)), rel=1e-3)


def test_codebook_update_and_int8_lower_the_layer_loss(layers):
    for name, (w, h) in layers.items():
        on, st_on = gptvq_quantize(w, h, GPTVQConfig.from_target(2.125, 2))
        off, st_off = gptvq_quantize(w, h, GPTVQConfig.from_target(2.125, 2, codebook_update=False))
        assert torch.equal(on.index_codes(), off.index_codes())  # the update keeps the indices
        assert hloss(w, on.dequantize(), h) <= hloss(w, off.dequantize(), h) * (1 + 1e-6), name
        assert on.codebook.dtype == torch.int8 and st_on["loss_final"] <= st_off["loss_final"] * (1 + 1e-6)


def test_gptvq_beats_gptq_on_layer_loss_at_fewer_bits(layers):
    vq = gq = 0.0
    for w, h in layers.values():
        a = gptvq_quantize(w, h, GPTVQConfig.from_target(2.125, 2))[0]
        b = GPTQConfig(bits=2, group=32, symmetric=True).quantize_weight(w, h)
        assert a.bits_per_weight() < b.bits_per_weight()
        vq += hloss(w, a.dequantize(), h) / hloss(w, 0 * w, h)
        gq += hloss(w, b.dequantize(), h) / hloss(w, 0 * w, h)
    assert vq < 0.7 * gq


def test_svd_codebooks(layers):
    w, h = layers["mlp.gate_proj"]  # 172 x 64
    full = GPTVQConfig(vq_dim=1, k=8, rows_per_block=1, cols_per_block=64, codebook="int8")
    qw_full, _ = gptvq_quantize(w, h, full)
    # Sorting the codebooks with the remapped indices leaves the weight unchanged.
    c, idx = cbk.sort_codebooks(qw_full.codebooks(), qw_full.index_codes(), qw_full.geom)
    assert torch.equal(expand(c, idx, qw_full.geom), qw_full.dequantize())
    assert (c[..., 1:, 0] >= c[..., :-1, 0]).all()
    # Full rank reproduces the codebooks up to int8 rounding of the factors; lower ranks cost accuracy, and the
    # stored factors are smaller than the int8 codebooks.
    losses = {}
    for r in (8, 4, 2):
        qw, st = gptvq_quantize(w, h, GPTVQConfig(vq_dim=1, k=8, rows_per_block=1, cols_per_block=64, svd_rank=r))
        assert set(qw.tensors()) == {"indices", "svd_u", "svd_u_scale", "svd_v", "svd_v_scale"}
        again = VQWeight.from_stored(qw.spec(), qw.tensors())
        assert torch.equal(again.dequantize(), qw.dequantize())
        losses[r] = hloss(w, qw.dequantize(), h)
        assert qw.stored_bytes() < qw_full.stored_bytes()
    base = hloss(w, qw_full.dequantize(), h)
    assert losses[8] < 1.05 * base and losses[2] > losses[8]


def test_blockwise_normalization(layers):
    """Per-sub-row log-domain scales: stored (4 bits per 32 columns, counted in the size), decoded, and they help on
    a layer whose rows differ in scale."""
    w, h = layers["self_attn.q_proj"]
    plain = GPTVQConfig(vq_dim=2, k=16, rows_per_block=16, cols_per_block=256)
    normed = GPTVQConfig(vq_dim=2, k=16, rows_per_block=16, cols_per_block=256, norm_block=32, norm_bits=4)
    assert normed.nominal_bpv() == pytest.approx(plain.nominal_bpv() + 4 / 32)
    a, _ = gptvq_quantize(w, h, plain)
    b, st = gptvq_quantize(w, h, normed)
    assert b.stored_bytes() - a.stored_bytes() == 64 * 1 + 4 * 2  # 2 sub-rows x 4 bits per row, 2 fp32 range values
    s = b.norm_scales()
    assert s.shape == (64, 2) and int(torch.unique(s).numel()) > 1
    again = VQWeight.from_stored(b.spec(), b.tensors())
    assert torch.equal(again.dequantize(), b.dequantize())
    assert torch.equal(b.dequantize(), expand(b.codebooks(), b.index_codes(), b.geom) * s.repeat_interleave(32, 1))
    assert hloss(w, b.dequantize(), h) < hloss(w, a.dequantize(), h)
    # Width 172 (partial sub-row and partial vector) with 1D and SVD codebooks.
    w2, h2 = layers["mlp.down_proj"]
    for cfg in (GPTVQConfig(vq_dim=4, k=16, rows_per_block=16, cols_per_block=64, norm_block=16),
                GPTVQConfig(vq_dim=1, k=4, rows_per_block=2, cols_per_block=128, norm_block=32, svd_rank=2)):
        q, _ = gptvq_quantize(w2, h2, cfg)
        assert torch.equal(VQWeight.from_stored(q.spec(), q.tensors()).dequantize(), q.dequantize())
        assert hloss(w2, q.dequantize(), h2) < 0.5 * hloss(w2, 0 * w2, h2)
    _user_error(GPTVQConfig, vq_dim=2, norm_block=33)
    tampered = dict(b.tensors(), norm_range=torch.tensor([float("nan"), 0.1]))
    with pytest.raises(FormatError, match="norm_range"):
        VQWeight.from_stored(b.spec(), tampered)


def test_deterministic(layers):
    w, h = layers["mlp.up_proj"]
    cfg = GPTVQConfig.from_target(3.125, 2, seed=3)
    a, b = gptvq_quantize(w, h, cfg)[0], gptvq_quantize(w, h, cfg)[0]
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


# ----------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("kw", [
    dict(vq_dim=2, k=16, rows_per_block=8, cols_per_block=256, codebook="int8"),
    dict(vq_dim=2, k=16, rows_per_block=8, cols_per_block=256, codebook="fp16"),
    dict(vq_dim=2, k=16, rows_per_block=8, cols_per_block=256, codebook="int4"),
    dict(vq_dim=4, k=12, rows_per_block=16, cols_per_block=64, codebook="int8"),  # k not a power of two
    dict(vq_dim=1, k=4, rows_per_block=1, cols_per_block=128, svd_rank=2),
])
def test_format_round_trip(layers, kw):
    w, h = layers["mlp.down_proj"]
    qw, _ = gptvq_quantize(w, h, GPTVQConfig(**kw))
    again = VQWeight.from_stored(qw.spec(), {k: v.clone() for k, v in qw.tensors().items()})
    assert torch.equal(again.dequantize(), qw.dequantize())
    x = w[:3, :172].clone()
    # Decode-sized inputs run the native kernel for int8 codebooks: equal to the dense product within the kernels'
    # documented float tolerance, 2e-5 * sum |w x| (native/README.md).
    dense = qw.dequantize()
    bound = 2e-5 * (x.abs() @ dense.abs().T) + 1e-7
    assert ((QuantLinear(again)(x) - torch.nn.functional.linear(x, dense)).abs() <= bound).all()
    if kw.get("codebook") == "int8" and "svd_rank" not in kw:
        # The documented layout: W[n, j*d+t] = codebook[n//R, (j*d)//C, idx[n,j], t] * scale[n//R, (j*d)//C].
        g, idx, t = qw.geom, qw.index_codes(), qw.tensors()
        n, j = 37, g.vectors - 1
        for tt in range(172 - j * g.d):
            val = t["codebook"][n // g.rows_per_block, (j * g.d) // g.cols_per_block, idx[n, j], tt].float() \
                * t["codebook_scale"][n // g.rows_per_block, (j * g.d) // g.cols_per_block].float()
            assert qw.dequantize()[n, j * g.d + tt] == val


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_tampered_format_is_rejected(layers):
    w, h = layers["mlp.down_proj"]
    qw, _ = gptvq_quantize(w, h, GPTVQConfig(vq_dim=4, k=12, rows_per_block=16, cols_per_block=64))
    spec, good = qw.spec(), qw.tensors()

    def rejects(tensors=None, spec_=None, match=None):
        with pytest.raises(FormatError, match=match) as e:
            VQWeight.from_stored(spec_ or spec, tensors or good)
        _one_line(e)

    bad = dict(good, indices=good["indices"].clone())
    bad["indices"][5, 0] = (bad["indices"][5, 0] & 0xF0) | 13  # index 13 >= k=12 (4-bit indices)
    rejects(bad, match="out of range for a codebook of 12")
    rejects(dict(good, codebook=good["codebook"].float()), match="codebook")
    rejects(dict(good, codebook=good["codebook"][:, :, :8]), match="codebook")
    rejects({k: v for k, v in good.items() if k != "codebook_scale"}, match="codebook_scale")
    rejects(dict(good, codebook_scale=torch.full_like(good["codebook_scale"], float("nan"))), match="scale")
    rejects(dict(good, extra=torch.zeros(1)), match="unexpected")
    neg = good["codebook"].clone()
    neg[0, 0, 0, 0] = -128
    rejects(dict(good, codebook=neg), match="-128")
    rejects(spec_=dict(spec, k=300), match="out of range")
    rejects(spec_=dict(spec, dim=3), match="out of range")  # 64 columns per block is not a multiple of 3
    rejects(spec_=dict(spec, shape=[64, 100]), match="indices|codebook")
    rejects(spec_=dict(spec, codebook="int2"), match="unknown codebook")
    rejects(spec_={k: v for k, v in spec.items() if k != "rows_per_block"}, match="malformed")
    svd, _ = gptvq_quantize(w, h, GPTVQConfig(vq_dim=1, k=4, rows_per_block=1, cols_per_block=128, svd_rank=2))
    rejects(svd.tensors(), svd.spec() | {"svd_rank": 3}, match="svd")


# ------------------------------------------------------------------------------------------------- bad input
def _user_error(fn, *a, **kw):
    with pytest.raises(UserError) as e:
        fn(*a, **kw)
    return _one_line(e)


def test_unreachable_bpv_names_the_nearest_configurations():
    msg = _user_error(GPTVQConfig.from_target, 1.7, 2)
    assert "1.7 bits per value" in msg and "nearest" in msg
    assert "1.625 bpv = 2D k=8 rows 4 x cols 256" in msg and "1.75 bpv = 2D k=8 rows 2 x cols 256" in msg
    msg = _user_error(GPTVQConfig.from_target, 3.125, 4)  # 4D would need 12-bit indices
    assert "4D" in msg and "nearest" in msg
    # Far targets are not "reached" by tiny blocks whose codebooks outweigh their indices (9 = 2D k=4 l=8).
    msg = _user_error(GPTVQConfig.from_target, 9.0)
    assert "nearest: 8.25 bpv = 1D k=256 rows 32 x cols 256" in msg
    _user_error(GPTVQConfig.from_target, -1.0)
    _user_error(GPTVQConfig.from_target, 3.125, preset="2.25")
    _user_error(GPTVQConfig.from_target, preset="mobile", vq_dim=4)
    _user_error(GPTVQConfig.from_target, preset="tiny")


def test_impossible_configurations_name_valid_ones():
    msg = _user_error(GPTVQConfig, vq_dim=4, k=256, rows_per_block=2, cols_per_block=256)
    assert "exceed" in msg and "--vq-rows 4" in msg and "--vq-k 128" in msg
    msg = _user_error(GPTVQConfig, vq_dim=3, k=16, rows_per_block=8, cols_per_block=256)
    assert "does not divide" in msg and "255 or 258" not in msg and "--vq-cols 255" in msg
    _user_error(GPTVQConfig, vq_dim=2, svd_rank=2)
    _user_error(GPTVQConfig, vq_dim=1, k=4, svd_rank=8)
    _user_error(GPTVQConfig, k=512)
    _user_error(GPTVQConfig, codebook="int2")
    _user_error(GPTVQConfig, cols_per_block=512)


# ------------------------------------------------------------------------------------------------ end to end
E2E_CONFIGS = {
    "1d-int8": dict(bpv=2.125, vq_dim=1),
    "1d-fp16": dict(bpv=2.125, vq_dim=1, codebook="fp16"),
    "1d-svd": dict(bpv=2.125, vq_dim=1, svd_rank=2),
    "2d-int8": dict(bpv=2.125, vq_dim=2),
    "2d-fp16": dict(bpv=2.125, vq_dim=2, codebook="fp16"),
    "4d-int8": dict(bpv=2.25, vq_dim=4),
    "4d-fp16-noupdate": dict(bpv=2.25, vq_dim=4, codebook="fp16", codebook_update=False),
    "mobile": dict(preset="mobile"),
}


@pytest.fixture(scope="module")
def quantized_models(stories, calib16x128):
    cache = {}

    def get(name):
        if name not in cache:
            model = copy.deepcopy(stories.model)
            if name.startswith("gptq"):
                cfg = GPTQConfig(bits=int(name[4]), group=64)
            else:
                kw = dict(E2E_CONFIGS[name])
                cfg = GPTVQConfig.from_target(kw.pop("bpv", None), kw.pop("vq_dim", None), kw.pop("preset", None), **kw)
            quantize_(model, cfg, calib16x128, progress=False)
            cache[name] = (model, cfg)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(E2E_CONFIGS))
def test_checkpoint_reload_gives_the_same_outputs_and_bpv(name, quantized_models, stories, tmp_path):
    model, cfg = quantized_models(name)
    qmods = checkpoint.quantized_modules(model)
    assert len(qmods) == 35 and all(m.qweight.kind == "vq" for m in qmods.values())
    out = tmp_path / "ck"
    manifest = checkpoint.save(model, stories.tokenizer, out, config=cfg.to_dict(), source={"model": "stories260k"},
                               calibration=None)
    ck = checkpoint.load(out)
    x = torch.arange(3, 260).remainder(500).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ck.model(x).logits)
    # The manifest's bits per weight is what the packed file holds (file size minus its JSON header, minus the int8
    # embedding stored beside the linears under its own manifest entry).
    path = out / checkpoint.QUANTIZED_FILE
    header = int.from_bytes(path.read_bytes()[:8], "little")
    data_bytes = os.path.getsize(path) - 8 - header - manifest["embedding"]["bytes"]
    nweights = sum(m.qweight.shape[0] * m.qweight.shape[1] for m in qmods.values())
    assert manifest["bits_per_weight"] == pytest.approx(8 * data_bytes / nweights, rel=1e-12)
    for lname, m in checkpoint.quantized_modules(ck.model).items():
        assert manifest["layers"][lname]["bits_per_weight"] == m.qweight.bits_per_weight()
    if cfg.svd_rank is None and cfg.vq_dim <= 2:
        # Narrow layers pay some extra codebook overhead (a 4D k=256 codebook is 1 KB: 2 bpv on a 64 x 64 layer).
        assert manifest["bits_per_weight"] < cfg.nominal_bpv() + 0.25


@pytest.mark.parametrize("vq,gptq", [("2d-int8", "gptq2"), ("mobile", "gptq3")])
def test_gptvq_2d_beats_gptq_at_no_more_bits(vq, gptq, quantized_models, stories_test_ids):
    mv, _ = quantized_models(vq)
    mg, _ = quantized_models(gptq)

    def bpw(m):
        q = checkpoint.quantized_modules(m).values()
        return sum(x.qweight.stored_bytes() for x in q) * 8 / sum(math.prod(x.qweight.shape) for x in q)

    assert bpw(mv) <= bpw(mg)
    p_vq = perplexity(mv, stories_test_ids, 512, 8, progress=False).ppl
    p_gq = perplexity(mg, stories_test_ids, 512, 8, progress=False).ppl
    assert p_vq < p_gq
