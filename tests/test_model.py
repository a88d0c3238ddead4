"""Model import from the real registry package of the default model (GGUF) and from Hugging Face directories."""

import pytest
import torch

from conftest import STORIES
from vqmobile.errors import UserError
from vqmobile.model import load_model, prepare_model, registry_gguf_path


def test_default_model_from_registry_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("VQMOBILE_CACHE", str(tmp_path))
    path = prepare_model(progress=lambda _msg: None)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct" and (path / "model.safetensors").is_file()
    assert prepare_model(progress=pytest.fail) == path  # second call reuses the cache, no work
    from_dir = load_model("smollm2")
    from_gguf = load_model(str(registry_gguf_path()))
    cfg = from_dir.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert sum(p.numel() for p in from_dir.model.parameters()) == 134_515_008
    ids = from_dir.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(from_dir.model(ids).logits, from_gguf.model(ids).logits)
    assert from_gguf.tokenizer.decode(ids[0], skip_special_tokens=True) == "The capital of France is"


def test_hf_directory_is_loaded_offline_in_fp32():
    loaded = load_model(str(STORIES))
    assert loaded.model.dtype == torch.float32 and len(loaded.fingerprint) == 64


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        load_model(str(bogus))
