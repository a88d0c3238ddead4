"""A float Llama model written as an F32 GGUF that llama.cpp loads: the input of llama.cpp's own quantizer in the
decode race (export/llamacpp.py), so that llama.cpp runs the same weights as our bundle's source model.

Metadata and tokenizer come from the model's source GGUF when it has one (every field copied, the file type set to
F32; its hyperparameters and tensor names must match the model), else from the Hugging Face config and the
SentencePiece tokenizer.model beside it (gguf's SentencePieceVocab and SpecialVocab). Tensors are the model's state dict
under llama.cpp's names (gguf's tensor-name map) in float32, the q/k projections permuted to the interleaved rotary
layout of llama.cpp's llama graph (transformers permutes them the other way when it loads a GGUF).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from vqmobile.errors import UserError


def _rope_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from the half-split rotary layout (HF) to the pairwise one (llama.cpp): within each
    head, row j of the first half and row j of the second half become rows 2j and 2j+1."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy_metadata(writer, source: Path, config) -> set[str]:
    """Copy every field of the source GGUF (its own bookkeeping and file type aside); returns its tensor names."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = reader.fields
    expect = {"llama.block_count": config.num_hidden_layers, "llama.embedding_length": config.hidden_size,
              "llama.vocab_size": config.vocab_size}
    for key, want in expect.items():
        if key in fields and int(fields[key].contents()) != want:
            raise UserError(f"{source} is not this model's source: its {key} is {fields[key].contents()}, the model "
                            f"has {want}")
    for key, field in fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                              "general.quantization_version"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    return {t.name for t in reader.tensors}


def _hf_metadata(writer, config, vocab_dir: Path) -> None:
    """Hyperparameters from the HF config; vocabulary from the SentencePiece model in vocab_dir."""
    from gguf.vocab import SentencePieceVocab, SpecialVocab

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope scaling {rope.get('rope_type')!r} is not written to GGUF here: only plain RoPE models")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if not (vocab_dir / "tokenizer.model").is_file():
        raise UserError(f"{vocab_dir} has no source GGUF and no SentencePiece tokenizer.model to take the vocabulary "
                        "from: pass a model loaded from a GGUF or with a tokenizer.model")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    vocab = SentencePieceVocab(vocab_dir)
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    SpecialVocab(vocab_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer)


def write_f32_gguf(model: torch.nn.Module, out: str | Path, *, source_gguf: Path | None = None,
                   vocab_dir: Path | None = None) -> Path:
    """Write `model` (a float LlamaForCausalLM) to `out` as an F32 GGUF, atomically; returns out.

    source_gguf: the GGUF the model was loaded from, whose metadata and tokenizer are copied; otherwise vocab_dir
    (the HF directory) supplies the SentencePiece vocabulary."""
    import gguf

    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise UserError(f"only Llama models are written to GGUF here, not {getattr(config, 'model_type', None)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        if source_gguf is not None:
            source_names = _copy_metadata(writer, Path(source_gguf), config)
        else:
            if vocab_dir is None:
                raise UserError("a GGUF needs a vocabulary: give the source GGUF or the model's directory")
            _hf_metadata(writer, config, Path(vocab_dir))
            source_names = None
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        written = set()
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":  # llama.cpp reads a missing output.weight as tied
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"tensor {hf_name} has no llama.cpp name: the model is not a plain Llama")
            w = t.detach().to(torch.float32).contiguous().numpy()
            if hf_name.endswith("self_attn.q_proj.weight"):
                w = _rope_interleaved(w, config.num_attention_heads)
            elif hf_name.endswith("self_attn.k_proj.weight"):
                w = _rope_interleaved(w, config.num_key_value_heads)
            writer.add_tensor(name, np.ascontiguousarray(w))
            written.add(name)
        if source_names is not None and written != source_names:
            diff = sorted(written ^ source_names)[:3]
            raise UserError(f"the model's tensors differ from {source_gguf}'s (e.g. {', '.join(diff)}): it is not "
                            "this model's source")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
