"""Every supported family through the whole flow, on tiny models with random weights built offline from transformers
config classes and saved as safetensors directories (the stories260k tokenizer, vocabulary 512):

    qwen2   q/k/v biases, untied head, one sliding-window layer (Qwen 2's max_window_layers)
    qwen3   per-head q/k norms, head size 32 != hidden / heads, tied head
    phi3    fused qkv and gate_up projections (split at load), partial RoPE (Phi-4's 0.75), a window on every layer
    gemma3  sliding and global layers with their own RoPE bases, q/k norms, norms after attention and MLP, an
            embedding scaled by sqrt(hidden), GELU-tanh, one KV head, tied head

Structure discovery, the static-cache decoder against transformers' own forward, the pipeline's per-layer inputs,
GPTQ and GPTVQ, checkpoint reload, ExecuTorch and ONNX export checked against PyTorch, KV-cache decoding past the
window, generation and the C++ runner. The windows (16 and 24 tokens) are shorter than the sequences tested (64), so
a wrong mask fails. The real Gemma 3 270M runs in the slow test at the end.
"""

from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import torch

from conftest import STORIES, WIKITEXT
from test_export import ve
from vqmobile import checkpoint
from vqmobile.errors import UserError
from vqmobile.layers import QuantLinear
from vqmobile.model import load_model
from vqmobile.structure import decoder_structure

MAX_SEQ = 64
FAMILIES = ("qwen2", "qwen3", "phi3", "gemma3")


def _config(family: str):
    from transformers import Gemma3TextConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    if family == "qwen2":
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                           use_sliding_window=True, sliding_window=16, max_window_layers=1)
    if family == "qwen3":
        return Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           tie_word_embeddings=True)
    if family == "phi3":
        return Phi3Config(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=24,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.75})
    return Gemma3TextConfig(**common, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                            query_pre_attn_scalar=24, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{family: Hugging Face directory} of seeded random models; biases and norm weights are random too, so that
    each part the export must reproduce changes the result."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.2)
        path = root / family
        model.save_pretrained(path, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(STORIES / f, path / f)
        out[family] = path
    return out


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    from transformers import GPT2Config

    from vqmobile.cli import main

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"^unsupported architecture: gpt2 in .*\(supported: llama, qwen2, qwen3, "
                                        r"phi3, gemma3\)$"):
        load_model(str(tmp_path / "gpt2"))
    assert main(["--quiet", "quantize", str(tmp_path / "gpt2"), "--method", "rtn", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqmobile: error: unsupported architecture: gpt2") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# What the structure must show for each family: (q/k norms, norms after attention/MLP, biases, windows per layer,
# RoPE tables, activation, q/k/v stored separately under a fused module).
EXPECTED = {
    "qwen2": (False, False, True, [None, 16], [None, None], "SiLU", False),
    "qwen3": (True, False, False, [None, None], [None, None], "SiLU", False),
    "phi3": (False, False, False, [24, 24], [None, None], "SiLU", True),
    "gemma3": (True, True, False, [16, None], ["sliding_attention", "full_attention"], "GELUTanh", False),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_static_decoder_equals_transformers(tiny_dirs, family):
    """The structure found in each family, and the export decoder built on it computing what transformers computes:
    stateless (ONNX's form) and through the KV cache (prefill, then one token per call past the window)."""
    from transformers import AutoModelForCausalLM

    from vqmobile.export.model import StaticDecoder

    model = load_model(str(tiny_dirs[family])).model
    ids = torch.randint(3, 512, (1, MAX_SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[0]
        raw = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
        assert torch.allclose(raw(input_ids=ids, use_cache=False).logits[0], ref, rtol=0, atol=1e-5)  # split
    parts = decoder_structure(model)
    qk, post, bias, windows, ropes, act, fused = EXPECTED[family]
    assert [layer.attn.q_norm is not None for layer in parts.layers] == [qk] * 2
    assert [layer.attn_out_norm is not None and layer.mlp_out_norm is not None for layer in parts.layers] == [post] * 2
    assert (parts.layers[0].attn.q.bias is not None) == bias
    assert [layer.attn.window for layer in parts.layers] == windows
    assert [layer.rope for layer in parts.layers] == ropes
    assert act in type(parts.layers[0].act).__name__
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert ("model.layers.0.self_attn.qkv_proj.k_proj" in names) == fused
    assert ("model.layers.0.mlp.gate_up_proj.up_proj" in names) == fused
    with torch.no_grad():
        stateless = StaticDecoder(model, MAX_SEQ, cache=False)
        assert (stateless(ids)[0] - ref).abs().max() < 1e-4
        cached = StaticDecoder(model, MAX_SEQ)
        steps = [cached(ids[:, :20], torch.tensor([0]))[0]]
        steps += [cached(ids[:, i:i + 1], torch.tensor([i]))[0] for i in range(20, MAX_SEQ)]
        assert (torch.cat(steps) - ref).abs().max() < 1e-4
        if any(windows):  # the windows change the result: the comparison above tests them
            for layer in stateless.parts.layers:
                layer.attn.window = None
            assert (stateless(ids)[0] - ref).abs().max() > 1e-2


def test_pipeline_feeds_each_layer_its_own_inputs(tiny_dirs):
    """Gemma 3's sliding and global layers receive different masks and RoPE tables from the model's forward; the
    pipeline propagates the calibration batch with each layer's own, reproducing the model's hidden states."""
    from test_pipeline import assert_layer_inputs_are_hidden_states

    from vqmobile.pipeline import _capture_layer_inputs

    model = load_model(str(tiny_dirs["gemma3"])).model
    ids = torch.randint(3, 512, (4, MAX_SEQ), generator=torch.Generator().manual_seed(1))
    assert_layer_inputs_are_hidden_states(model, ids)
    _, kwargs = _capture_layer_inputs(model, ids, 4)
    cos = [kw[0]["position_embeddings"][0] for kw in kwargs]
    assert not torch.equal(cos[0], cos[1])  # local and global RoPE bases


def _methods():
    from vqmobile.quantizers.gptq import GPTQConfig
    from vqmobile.quantizers.gptvq import GPTVQConfig

    return {"gptq": GPTQConfig(bits=4, group=32),
            "gptvq": GPTVQConfig(vq_dim=2, k=16, rows_per_block=32, cols_per_block=64, em_iters=5, block_size=64,
                                 embedding="float")}


# The checkpoint each family exports (one per family: an ExecuTorch lowering costs seconds even for these models):
# both methods, both embeddings, tied and untied heads. GPTQ keeps the int8 embedding (Gemma's with its scale, its
# tied head an int_linear over the same bytes); GPTVQ keeps a float one (Qwen 3's tied head runs as dense_linear).
EXPORTED = {"qwen2": "gptq", "qwen3": "gptvq", "phi3": "gptvq", "gemma3": "gptq"}


@pytest.fixture(scope="module")
def flows(tiny_dirs, tmp_path_factory):
    """{(family, method): (in-memory quantized model, checkpoint path, bundle path or None)}: GPTQ 4-bit g32 with
    the int8 embedding, GPTVQ 2D with a float embedding."""
    from vqmobile.data import calibration_data
    from vqmobile.export.runtime.build import host_target
    from vqmobile.pipeline import quantize_

    root = tmp_path_factory.mktemp("flows")
    out = {}
    for family, path in tiny_dirs.items():
        loaded = load_model(str(path))
        calib = calibration_data(loaded.tokenizer, WIKITEXT / "wiki.valid.tokens", nsamples=8, seqlen=MAX_SEQ)
        for method, cfg in _methods().items():
            model = copy.deepcopy(loaded.model)
            quantize_(model, cfg, calib, progress=False)
            ck = root / f"{family}-{method}"
            checkpoint.save(model, loaded.tokenizer, ck, config=cfg.to_dict(), source={"model": family},
                            calibration=None)
            bundle = None
            if EXPORTED[family] == method:
                bundle = root / f"{family}-{method}-bundle"
                ve.export_bundle(str(ck), str(bundle), target=host_target(), formats=["executorch", "onnx"],
                                 max_seq=MAX_SEQ, progress=None)
            out[family, method] = (model, ck, bundle)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_reload_export_check(flows, family):
    from vqmobile.export.et_runtime import ETDecoder

    ids = torch.randint(3, 512, (1, MAX_SEQ), generator=torch.Generator().manual_seed(2))
    for method in _methods():
        model, ck, bundle = flows[family, method]
        reloaded = checkpoint.load(ck).model
        assert len(checkpoint.quantized_modules(reloaded)) == 2 * 7, (family, method)
        head = reloaded.get_output_embeddings()
        assert isinstance(head, QuantLinear) == (method == "gptq" and reloaded.config.tie_word_embeddings)
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits[0]
            assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits[0], want), (family, method)
        if bundle is None:
            continue
        ok, table, record = ve.check_bundle(str(bundle), windows=2)
        assert ok, table
        rows = {r["runtime"]: r for r in record["rows"]}
        assert rows["onnxruntime"]["max_abs_logit_diff"] < 1e-3 and rows["executorch"]["max_abs_logit_diff"] < 1e-3
        # decoding through the program's KV cache, one token per call past the window
        dec = ETDecoder(bundle / "model.pte", bundle / "lib" / "libvqmobile_executorch.so")
        got = torch.cat([dec(ids[:, :20], 0)[0]] + [dec(ids[:, i:i + 1], i)[0] for i in range(20, MAX_SEQ)])
        assert (got - want).abs().max() < 1e-3, (family, method)


def test_generate_and_runner_on_gemma(flows):
    """Gemma's bundle generates through the Python runtime, and the C++ runner decodes the same tokens."""
    from vqmobile.export.et_runtime import ETDecoder, greedy

    _, _, bundle = flows["gemma3", "gptq"]
    res = ve.generate(str(bundle), "Once upon a time", 30, stop_at_eos=False)
    assert len(res["new_tokens"]) == 30 and res["tokens_per_s"] > 0
    prompt = torch.tensor(res["prompt_ids"])
    dec = ETDecoder(bundle / "model.pte", bundle / "lib" / "libvqmobile_executorch.so")
    assert greedy(dec, prompt, 30, MAX_SEQ)["new_tokens"] == res["new_tokens"]
    run = subprocess.run([str(bundle / "bin" / "vqm_runner"), str(bundle / "model.pte"), "--tokens",
                          ",".join(map(str, prompt.tolist())), "--new-tokens", "30", "--repeats", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("tokens:"))
    assert [int(t) for t in line.split()[1:]] == res["new_tokens"]


# ----------------------------------------------------------------------------------------------- large vocabulary
def test_embedding_and_head_work_in_row_blocks(monkeypatch):
    """The int8 embedding is quantized, checked and dequantized a block of rows at a time, and the int head's GEMM
    path dequantizes a block of output rows at a time (a 262k vocabulary never exists in float32 whole): the result
    does not depend on the block size."""
    from vqmobile import embedding
    from vqmobile.ops import intlinear, op_forward

    w = torch.randn(1000, 72, generator=torch.Generator().manual_seed(0))
    whole = embedding.quantize_embedding(w)
    err = embedding.max_abs_error(whole, w)
    x = torch.randn(40, 72)  # more rows than the kernels take: the GEMM path
    y = op_forward(whole, x, None)
    monkeypatch.setattr(embedding, "ROWS", 7)
    monkeypatch.setattr(intlinear, "GEMM_ROWS", 13)
    blocks = embedding.quantize_embedding(w)
    assert torch.equal(blocks.codes, whole.codes) and torch.equal(blocks.scales, whole.scales)
    assert embedding.max_abs_error(blocks, w) == err
    assert torch.allclose(op_forward(blocks, x, None), y, rtol=0, atol=1e-5)
    emb = embedding.QuantEmbedding(blocks, torch.tensor(3.0))
    ids = torch.tensor([[0, 999, 7]])
    assert torch.equal(emb.dequantized()(ids), emb(ids)) and torch.equal(emb(ids), 3.0 * (whole.dequantize()[ids]))


# ------------------------------------------------------------------------------------------- the real Gemma 3 270M
@pytest.mark.slow
def test_gemma3_270m_whole_flow(tmp_path):
    """The real Gemma 3 270M from its registry packages: structure, sane perplexity, the Q8_0 embedding kept exactly
    in int8, GPTQ 4-bit, reload, export with a context longer than the sliding window, check, generation."""
    from vqmobile.api import evaluate
    from vqmobile.data import calibration_data
    from vqmobile.export.runtime.build import host_target
    from vqmobile.pipeline import quantize_
    from vqmobile.quantizers.gptq import GPTQConfig

    loaded = load_model("gemma3-270m")
    model, tok = loaded.model, loaded.tokenizer
    parts = decoder_structure(model)
    assert len(parts.layers) == 18 and model.config.vocab_size == 262144
    assert [layer.attn.window for layer in parts.layers] == ([512] * 5 + [None]) * 3
    fp = evaluate(model, tok, ctx=1024, windows=2, progress=False).ppl
    assert 5 < fp < 40, fp  # a 270M base model on WikiText-2
    calib = calibration_data(tok, WIKITEXT / "wiki.valid.tokens", nsamples=16, seqlen=256)
    report = quantize_(model, GPTQConfig(bits=4, group=128), calib, progress=False)
    assert report.embedding_max_abs_error == 0.0  # the GGUF's token_embd is Q8_0: the int8 embedding is exact
    q = evaluate(model, tok, ctx=1024, windows=2, progress=False).ppl
    assert fp < q < 1.5 * fp, (fp, q)
    ck = tmp_path / "ck"
    checkpoint.save(model, tok, ck, config={"method": "gptq"}, source={"model": "gemma3-270m"}, calibration=None)
    ids = torch.randint(0, 262144, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(checkpoint.load(ck).model(input_ids=ids).logits, model(input_ids=ids).logits)
    bundle = tmp_path / "bundle"
    ve.export_bundle(str(ck), str(bundle), target=host_target(), formats=["executorch", "onnx"], max_seq=1024,
                     progress=None)
    ok, table, _ = ve.check_bundle(str(bundle), windows=1)
    assert ok, table
    res = ve.generate(str(bundle), "The capital of France is", 16, stop_at_eos=False)
    prompt, new = res["prompt_ids"], res["new_tokens"]
    with torch.no_grad():  # teacher forcing: PyTorch's first choice after each prefix the program decoded
        logits = model(input_ids=torch.tensor([prompt + new])).logits[0]
    picks = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert sum(a == b for a, b in zip(picks, new)) >= 15, (picks, new)
