"""End to end on the real stories260k model: layer-wise quantization, checkpoint round trip, perplexity."""

import json
import math
import os

import pytest
import torch

from vqmobile import checkpoint
from vqmobile.evaluate import perplexity
from vqmobile.quantizers.gptq import GPTQConfig
from vqmobile.quantizers.rtn import RTNConfig
from vqmobile.pipeline import quantize_
from vqmobile.layers import QuantLinear

WINDOWS = 40


@pytest.fixture(scope="module")
def fp_ppl(stories, stories_test_ids):
    return perplexity(stories.model, stories_test_ids, 512, WINDOWS, progress=False).ppl


@pytest.fixture(scope="module")
def quantized(stories, stories_calib):
    """stories260k quantized at 3 bits, group 32, by RTN and by GPTQ."""
    import copy

    out = {}
    for cfg in (RTNConfig(bits=3, group=32), GPTQConfig(bits=3, group=32)):
        model = copy.deepcopy(stories.model)
        quantize_(model, cfg, stories_calib, progress=False)
        out[cfg.method] = (model, cfg)
    return out


def test_every_decoder_linear_is_quantized(quantized):
    model, _ = quantized["gptq"]
    qlin = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qlin) == 5 * 7 + 1 and set(checkpoint.quantized_modules(model)) == set(qlin) - {"lm_head"}
    # the head is tied to the embedding: both are its int8 weight (embedding.py), not a GPTQ layer
    assert model.lm_head.qweight is model.model.embed_tokens.qweight and model.lm_head.qweight.bits == 8


def test_gptq_beats_rtn_at_3_bits(quantized, stories_test_ids, fp_ppl):
    ppl = {m: perplexity(model, stories_test_ids, 512, WINDOWS, progress=False).ppl
           for m, (model, _) in quantized.items()}
    assert all(math.isfinite(p) for p in ppl.values())
    assert fp_ppl < ppl["gptq"] < ppl["rtn"]
    assert ppl["gptq"] < 1.5 * fp_ppl  # sane: 3-bit GPTQ stays near the float model


def test_decode_cache_decodes_each_weight_once_and_changes_nothing(quantized, stories_test_ids):
    """perplexity() runs under ops.decode_cache: a window decodes every weight, the next ones reuse it, bit for bit;
    a stored tensor changed in place is decoded again, and a zero budget caches nothing."""
    from vqmobile.ops import decode_cache

    model, _ = quantized["gptq"]
    window = stories_test_ids[:512].unsqueeze(0)
    nweights = len({id(m.qweight) for m in model.modules() if isinstance(m, QuantLinear)})
    with torch.no_grad():
        plain = model(input_ids=window, use_cache=False).logits
        with decode_cache() as stats:
            first = model(input_ids=window, use_cache=False).logits
            second = model(input_ids=window, use_cache=False).logits
            assert (stats.misses, stats.hits) == (nweights, nweights)
            model.model.layers[0].mlp.down_proj.qweight.scales.mul_(1)  # same values, a new version: decoded again
            model(input_ids=window, use_cache=False)
            assert (stats.misses, stats.hits) == (nweights + 1, 2 * nweights - 1)
        with decode_cache(budget_bytes=0) as none:
            model(input_ids=window, use_cache=False)
            model(input_ids=window, use_cache=False)
    assert torch.equal(plain, first) and torch.equal(plain, second)
    assert none.hits == 0 and none.bytes == 0 and stats.bytes > 0


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_checkpoint_round_trip_and_bpw(quantized, stories, tmp_path, method):
    model, cfg = quantized[method]
    out = tmp_path / "ck"
    manifest = checkpoint.save(model, stories.tokenizer, out, config=cfg.to_dict(), source={"model": "stories260k"},
                               calibration=None)
    ck = checkpoint.load(out)
    x = torch.arange(1, 200).remainder(500).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ck.model(x).logits)
    # bits per weight from the bytes actually stored in quantized.safetensors: file size minus its header, minus
    # the int8 embedding stored beside the linears (its own manifest entry).
    path = out / checkpoint.QUANTIZED_FILE
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    data_bytes = os.path.getsize(path) - 8 - header_len - manifest["embedding"]["bytes"]
    nweights = sum(m.qweight.shape[0] * m.qweight.shape[1] for m in checkpoint.quantized_modules(ck.model).values())
    assert manifest["bits_per_weight"] == pytest.approx(8 * data_bytes / nweights, rel=1e-12)
    assert json.loads((out / checkpoint.MANIFEST).read_text())["bits_per_weight"] == manifest["bits_per_weight"]
    assert 3.0 < manifest["bits_per_weight"] < 4.0


def test_tampered_checkpoint_is_rejected(quantized, stories, tmp_path):
    model, cfg = quantized["rtn"]
    out = tmp_path / "ck"
    checkpoint.save(model, stories.tokenizer, out, config=cfg.to_dict(), source={}, calibration=None)
    data = bytearray((out / checkpoint.QUANTIZED_FILE).read_bytes())
    data[-1] ^= 0xFF
    (out / checkpoint.QUANTIZED_FILE).write_bytes(bytes(data))
    with pytest.raises(checkpoint.FormatError, match="sha256"):
        checkpoint.load(out)


def test_interrupted_save_leaves_nothing(quantized, stories, tmp_path, monkeypatch):
    model, cfg = quantized["rtn"]
    out = tmp_path / "ck"
    calls = []

    def interrupted_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted_save_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, stories.tokenizer, out, config=cfg.to_dict(), source={}, calibration=None)
    assert calls and not out.exists() and list(tmp_path.iterdir()) == []


def test_hessians_match_float64_reference_and_are_shared(stories, stories_calib):
    from vqmobile.pipeline import _capture_layer_inputs, _collect_hessians, linear_layers

    model = stories.model
    inputs, _ = _capture_layer_inputs(model, stories_calib[:8], 4)
    layer = model.model.layers[0]
    linears = linear_layers(layer)
    hessians = _collect_hessians(layer, linears, inputs)
    ref = {n: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64) for n, lin in linears.items()}
    count = dict.fromkeys(linears, 0)

    def record(name):
        def hook(_m, args, _o):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            ref[name].addmm_(x.T, x, alpha=2.0)
            count[name] += x.shape[0]
        return hook

    handles = [lin.register_forward_hook(record(n)) for n, lin in linears.items()]
    with torch.no_grad():
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
    for h in handles:
        h.remove()
    for name in linears:
        expected = ref[name] / count[name]
        assert torch.allclose(hessians[name].double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert hessians["self_attn.q_proj"] is hessians["self_attn.v_proj"]  # same input, one accumulator
    assert hessians["mlp.gate_proj"] is hessians["mlp.up_proj"]
    assert hessians["self_attn.o_proj"] is not hessians["self_attn.q_proj"]


def test_layer_inputs_are_the_models_hidden_states(stories, stories_calib):
    """What the pipeline feeds each layer (captured at layer 0, then propagated layer by layer with the layer's own
    kwargs: rotary embeddings, mask, positions) is exactly what the full model computes there."""
    assert_layer_inputs_are_hidden_states(stories.model, stories_calib[:4])


def assert_layer_inputs_are_hidden_states(model, ids):
    from vqmobile.pipeline import _capture_layer_inputs, _run_layer, _with_kwargs

    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        inputs, layer_kwargs = _capture_layer_inputs(model, ids, 2)
        for i, layer in enumerate(model.model.layers):
            inputs = _with_kwargs(inputs, layer_kwargs[i])
            got = torch.cat([hidden for hidden, _ in inputs])
            assert torch.allclose(got, want[i], rtol=0, atol=1e-5 * float(want[i].abs().max())), f"layer {i}"
            inputs = _run_layer(layer, inputs)
