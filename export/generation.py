"""`vqmobile generate BUNDLE --prompt TEXT`: greedy decoding through the ExecuTorch runtime with the KV cache."""

from __future__ import annotations


from vqmobile.errors import UserError

from .bundle import open_bundle
from .et_runtime import ETDecoder, greedy, set_adapter_threads


def generate(bundle: str, prompt: str, max_new_tokens: int = 64, *, stop_at_eos: bool = True,
             threads: int | None = None) -> dict:
    """Greedy continuation of `prompt` by the bundle's .pte (host ExecuTorch runtime + adapter library).

    Returns {text, prompt_tokens, new_tokens (ids), prefill_s, decode_s, tokens_per_s (decode only), ...}."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    b = open_bundle(bundle)
    if b.pte is None:
        raise UserError(f"bundle {b.path} has no ExecuTorch program: export it with --format executorch")
    tok = b.tokenizer()
    ids = tok(prompt, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise UserError("the prompt is empty after tokenization")
    if ids.numel() >= b.max_seq:
        raise UserError(f"the prompt has {ids.numel()} tokens; this bundle holds at most {b.max_seq} in its cache")
    dec = ETDecoder(b.pte, b.host_library())
    if threads:
        set_adapter_threads(threads)
    eos = tok.eos_token_id if stop_at_eos else None
    res = greedy(dec, ids, max_new_tokens, b.max_seq, eos)
    res["text"] = tok.decode(res["new_tokens"], skip_special_tokens=True)
    res["prompt"] = prompt
    res["prompt_ids"] = ids.tolist()
    return res
