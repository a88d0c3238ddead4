"""vqmobile::attention: grouped-query attention of the new queries over a static KV cache, which it first extends
with the new keys and values, reading and writing the cache in place.

    vqmobile::attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos,
                        float scale, int window=0) -> Tensor

q float32 [T, heads, D] and the new keys and values k, v float32 [T, kv_heads, D] (projection outputs, heads side by
side) at positions input_pos .. input_pos+T-1; k_cache [kv_heads, D, max_seq] (keys transposed) and v_cache
[kv_heads, max_seq, D] as the exported decoders keep them, both float32 or both float16 (new values rounded to it,
cached ones widened to float32 exactly; a float16 cache halves what a long context reads per token). k and v go
into the caches at their positions, then each query attends over the positions it sees; window > 0: a sliding-window
layer's last `window` positions. Query head hq reads kv head hq // (heads / kv_heads). Result float32 [T, heads, D]:
the output projection's input as it is.

Writing the cache here rather than with `index_copy_` matters in an ExecuTorch program: its `index_put_` writes a
key into the transposed cache with one 4-byte memmove per element, and the transposes around it were an XNNPACK
call per layer. CPU and the ExecuTorch adapter run the native kernels (vqm_kv_write, then vqm_attention, which reads
only the positions each query sees); the decomposition (portable export, and CPU without the native module) writes
with index_copy_ and runs the masked attention over the whole cache in standard ops, one batch matmul per product
for all of a kv head's query heads.
"""

from __future__ import annotations

import torch

from .library import NAMESPACE, lib, native, write_out

lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
           "float scale, int window=0) -> Tensor")
lib.define("attention.out(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
           "float scale, int window=0, *, Tensor(c!) out) -> Tensor(c!)")


def write_cache(k, v, k_cache, v_cache, input_pos) -> None:
    """k, v [T, kv_heads, D] into the caches at positions input_pos .. input_pos+T-1, in standard ops (in place)."""
    pos = input_pos.reshape(1).to(torch.int64) + torch.arange(k.shape[0], dtype=torch.int64)
    k_cache.index_copy_(2, pos, k.permute(1, 2, 0).to(k_cache.dtype))
    v_cache.index_copy_(1, pos, v.transpose(0, 1).to(v_cache.dtype))


def attention_decomposed(q, k, v, k_cache, v_cache, input_pos, scale, window=0):
    write_cache(k, v, k_cache, v_cache, input_pos)
    return masked_attention(q, k_cache, v_cache, input_pos, scale, window)


def masked_attention(q, k_cache, v_cache, input_pos, scale, window=0):
    """The queries over the caches as they are (nothing written), in standard ops."""
    t, heads, d = q.shape
    kv_heads, _, max_seq = k_cache.shape
    groups = heads // kv_heads
    pos = input_pos.reshape(1).to(torch.int64) + torch.arange(t, dtype=torch.int64)  # [T]
    key = torch.arange(max_seq, dtype=torch.int64)
    seen = key[None, :] <= pos[:, None]
    if window:
        seen = seen & (key[None, :] > pos[:, None] - window)
    mask = torch.where(seen, 0.0, float("-inf")).repeat(groups, 1)  # [groups * T, S]: rows g * T + i
    qg = q.to(torch.float32).transpose(0, 1).reshape(kv_heads, groups * t, d)  # head hq = h * groups + g
    scores = torch.bmm(qg, k_cache.to(torch.float32)) * scale + mask
    # unflatten + flatten, not reshape(heads, t, d): that reshape makes torch.export guard T to one value
    o = torch.bmm(torch.softmax(scores, dim=-1), v_cache.to(torch.float32)).unflatten(1, (groups, t)).flatten(0, 1)
    return o.transpose(0, 1)


@torch.library.impl(lib, "attention", "CPU")
def _attention_cpu(q, k, v, k_cache, v_cache, input_pos, scale, window=0):
    if native is None:
        return attention_decomposed(q, k, v, k_cache, v_cache, input_pos, scale, window)
    pos = int(input_pos.reshape(-1)[0])
    native.kv_write(k, v, k_cache, v_cache, pos)
    return native.attention(q, k_cache, v_cache, pos, scale, window)


@torch.library.impl(lib, "attention.out", "CPU")
def _attention_out_cpu(q, k, v, k_cache, v_cache, input_pos, scale, window=0, *, out):
    return write_out(out, _attention_cpu(q, k, v, k_cache, v_cache, input_pos, scale, window))


@torch.library.register_fake(f"{NAMESPACE}::attention")
def _attention_fake(q, k, v, k_cache, v_cache, input_pos, scale, window=0):
    torch._check(q.shape[1] % k_cache.shape[0] == 0, lambda: "attention: heads must be a multiple of kv_heads")
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::attention.out")
def _attention_out_fake(q, k, v, k_cache, v_cache, input_pos, scale, window=0, *, out):
    return out
