"""Fine-tuning (vqmobile/finetune.py) on stories260k: every format's trainable parameters, the layer-wise and the
model-wise stages for GPTQ, GPTVQ (also with incoherence), QuIP# and VPTQ (calibration loss and test perplexity go
down), the stored format after tuning, and an interrupted run."""

from __future__ import annotations

import copy

import pytest
import torch

from vqmobile import checkpoint, ops
from vqmobile.data import calibration_data
from vqmobile.errors import UserError
from vqmobile.evaluate import perplexity
from vqmobile.finetune import _Tuner, finetune_layer
from vqmobile.layers import QuantLinear
from vqmobile.pipeline import quantize_
from vqmobile.quantizers.gptq import GPTQConfig
from vqmobile.quantizers.gptvq import GPTVQConfig
from vqmobile.quantizers.quip import QuIPConfig
from vqmobile.quantizers.rtn import RTNConfig
from vqmobile.quantizers.vptq import VPTQConfig

from conftest import WIKITEXT

METHODS = {
    "gptq": lambda **f: GPTQConfig(bits=2, group=32, **f),
    "gptvq": lambda **f: GPTVQConfig(vq_dim=2, k=16, rows_per_block=32, cols_per_block=64, em_iters=10, **f),
    "gptvq-incoherent": lambda **f: GPTVQConfig(vq_dim=2, k=16, rows_per_block=32, cols_per_block=64, em_iters=10,
                                                incoherence="hadamard", **f),
    "quip": lambda **f: QuIPConfig(bits=2, **f),
    "vptq": lambda **f: VPTQConfig(v=4, k=16, outlier=0.05, kmeans_iters=10, **f),
}
TUNE = dict(finetune_lr=1e-2, finetune_epochs=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib(stories):
    return calibration_data(stories.tokenizer, WIKITEXT / "wiki.valid.tokens", nsamples=16, seqlen=128, seed=0)


def _ppl(model, ids):
    return perplexity(model, ids, 512, 4, progress=False).ppl


@pytest.mark.parametrize("make", [
    lambda w, h: RTNConfig(bits=3, group=32).quantize_weight(w, None),
    lambda w, h: GPTVQConfig(vq_dim=2, k=16, rows_per_block=32, cols_per_block=64, em_iters=3).quantize_weight(w, h),
    lambda w, h: GPTVQConfig(vq_dim=2, k=16, rows_per_block=32, cols_per_block=64, em_iters=3, codebook="int4",
                             norm_block=32).quantize_weight(w, h),
    lambda w, h: GPTVQConfig(vq_dim=2, k=16, rows_per_block=32, cols_per_block=64, em_iters=3,
                             codebook="fp16").quantize_weight(w, h),
    lambda w, h: VPTQConfig(v=3, k=10, res_k=5, outlier=0.05, kmeans_iters=3).quantize_weight(w, h),
    lambda w, h: QuIPConfig(bits=3, incoherence="none").quantize_weight(w, h),
    lambda w, h: GPTVQConfig(vq_dim=2, k=16, rows_per_block=32, cols_per_block=64, em_iters=3,
                             incoherence="hadamard").quantize(w, h, key="t"),
], ids=["int", "vq-int8", "vq-int4-norm", "vq-fp16", "cvq-residual", "e8p-residual", "incoherent-vq"])
def test_trainable_parameters_round_trip(make):
    """decode(params) is the weight, and storing the untouched parameters changes no stored byte; storing moved
    ones changes the weight but keeps every dtype and shape (an incoherent weight adds its output gain)."""
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(172, 64, generator=g), torch.eye(64) + 0.1
    qw = make(w, h)
    before = {k: v.clone() for k, v in qw.tensors().items()}
    tr = qw.trainable()
    assert torch.equal(tr.decode(tr.params), qw.dequantize())
    qw.load_trainable(tr.params)
    assert all(torch.equal(qw.tensors()[k], v) for k, v in before.items())
    moved = {k: v * 1.1 for k, v in tr.params.items()}
    qw.load_trainable(moved)
    after = qw.tensors()
    grown = {"out_gain": (torch.float16, torch.Size([172]))} if qw.kind == "incoherent" else {}
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == \
        {**{k: (v.dtype, v.shape) for k, v in before.items()}, **grown}
    assert not torch.equal(qw.dequantize(), tr.decode(tr.params))
    assert torch.allclose(qw.dequantize(), tr.decode(moved), rtol=2e-2, atol=2e-2 * float(w.abs().max()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_layer_finetune_lowers_calibration_loss_and_perplexity(method, stories, calib, stories_test_ids):
    plain, tuned = copy.deepcopy(stories.model), copy.deepcopy(stories.model)
    quantize_(plain, METHODS[method](), calib, progress=False)
    rep = quantize_(tuned, METHODS[method](finetune="layer", **TUNE), calib, progress=False)
    assert [r["scope"] for r in rep.finetune] == [f"layer {i}" for i in range(5)]
    assert all(r["loss_after"] <= r["loss_before"] for r in rep.finetune)
    assert sum(r["loss_after"] for r in rep.finetune) < 0.9 * sum(r["loss_before"] for r in rep.finetune)
    assert all(r["parameters"] > 0 and r["steps"] == 16 for r in rep.finetune)
    assert _ppl(tuned, stories_test_ids) < _ppl(plain, stories_test_ids)


def test_model_finetune_lowers_kl_and_keeps_the_format(stories, calib, stories_test_ids, tmp_path):
    plain, tuned = copy.deepcopy(stories.model), copy.deepcopy(stories.model)
    cfg = METHODS["vptq"](finetune="model", finetune_samples=8, finetune_epochs=2, finetune_lr=1e-2)
    quantize_(plain, METHODS["vptq"](), calib, progress=False)
    rep = quantize_(tuned, cfg, calib, progress=False)
    (model_rep,) = rep.finetune
    assert model_rep["scope"] == "model" and model_rep["steps"] == 16 and model_rep["kept"]
    assert model_rep["probe"] == "held-out"  # trained on sequences 0-7, judged on 8-15
    assert model_rep["loss_after"] < 0.9 * model_rep["loss_before"]
    assert _ppl(tuned, stories_test_ids) < _ppl(plain, stories_test_ids)
    # the tuned model is an ordinary quantized model: same kinds and operators, and it reloads bit for bit
    mods = checkpoint.quantized_modules(tuned)
    assert all(m.qweight.kind == "cvq" and ops.op_support(m.qweight)[0] == "cvq_linear" for m in mods.values())
    checkpoint.save(tuned, stories.tokenizer, tmp_path / "ck", config=cfg.to_dict(), source={"model": "s"},
                    calibration=None)
    ids = stories_test_ids[:64][None]
    with torch.no_grad():
        assert torch.equal(checkpoint.load(tmp_path / "ck").model(input_ids=ids).logits,
                           tuned(input_ids=ids).logits)


def test_interrupted_finetune_leaves_the_layer_as_it_was(stories, calib, monkeypatch):
    """Ctrl-C while tuning: the weights keep their stored parameters and the layer keeps its QuantLinears."""
    from vqmobile.pipeline import _capture_layer_inputs, _run_layer

    model = copy.deepcopy(stories.model)
    quantize_(model, METHODS["vptq"](), calib, progress=False)
    layer = model.model.layers[0]
    with torch.no_grad():
        inputs, _ = _capture_layer_inputs(model, calib[:8], 8)  # layer 0 runs with the kwargs it was captured with
        targets = [o for o, _ in _run_layer(stories.model.model.layers[0], inputs)]
    before = {n: {k: v.clone() for k, v in m.qweight.tensors().items()}
              for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
    norms = [p.detach().clone() for p in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
    calls, original = [], _Tuner.step

    def step(self, loss):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, loss)

    monkeypatch.setattr(_Tuner, "step", step)
    with pytest.raises(KeyboardInterrupt):
        finetune_layer(layer, inputs, targets, epochs=5, lr=1e-2)
    mods = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
    assert set(mods) == set(before)
    for n, m in mods.items():
        assert all(torch.equal(m.qweight.tensors()[k], v) for k, v in before[n].items()), n
    # norm weights moved by the two steps that ran are put back as well
    assert torch.equal(layer.input_layernorm.weight, norms[0])
    assert torch.equal(layer.post_attention_layernorm.weight, norms[1])


def test_layer_finetune_is_judged_on_sequences_it_did_not_train_on(stories, calib):
    """Trained on the first batch of 8 sequences, the keep-or-revert decision is taken on the second: the reported
    losses are the layer's error there, before and after."""
    from vqmobile.finetune import _rel_mse
    from vqmobile.pipeline import _capture_layer_inputs, _run_layer

    model = copy.deepcopy(stories.model)
    quantize_(model, METHODS["vptq"](), calib, progress=False)
    layer = model.model.layers[0]
    with torch.no_grad():
        inputs, _ = _capture_layer_inputs(model, calib, 8)
        targets = [o for o, _ in _run_layer(stories.model.model.layers[0], inputs)]
        quantized = [o for o, _ in _run_layer(layer, inputs)]
    assert len(inputs) == 2
    rep, outs = finetune_layer(layer, inputs, targets, epochs=4, lr=1e-2, samples=8)
    assert rep.probe == "held-out" and rep.steps == 4
    assert rep.loss_before == pytest.approx(float(_rel_mse(quantized[1], targets[1])), rel=1e-6)
    assert rep.loss_after == pytest.approx(float(_rel_mse(outs[1], targets[1])), rel=1e-6)
    assert rep.kept == (rep.loss_after < rep.loss_before)


def test_bad_finetune_options_are_refused():
    with pytest.raises(UserError, match="--finetune all is not supported"):
        GPTQConfig(finetune="all")
    with pytest.raises(UserError, match="--finetune-lr"):
        VPTQConfig(finetune="layer", finetune_lr=0)
    with pytest.raises(UserError, match="--finetune-model-epochs"):
        VPTQConfig(finetune="layer+model", finetune_model_epochs=0)


def test_model_stage_takes_its_own_settings(stories, calib):
    """The model stage's epochs and sequences are its own when given, the layer stage's otherwise."""
    own = METHODS["vptq"](finetune="layer+model", finetune_epochs=1, finetune_samples=8, finetune_model_epochs=3,
                          finetune_model_samples=2, finetune_model_lr=1e-3)
    rep = quantize_(copy.deepcopy(stories.model), own, calib, progress=False)
    assert [r["steps"] for r in rep.finetune] == [1] * 5 + [6]
    assert METHODS["vptq"](finetune_epochs=3, finetune_lr=0.02).model_stage() == (0.02, 3, 32)
