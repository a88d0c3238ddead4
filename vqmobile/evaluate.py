"""Perplexity on a token stream: non-overlapping windows of the context length, the last partial window dropped,
exp of the mean next-token negative log-likelihood. Results always carry the context length and window count.
Quantized weights decode once per run (ops.decode_cache), not once per window."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .ops import decode_cache


@dataclass
class Perplexity:
    ppl: float
    ctx: int
    windows: int
    total_windows: int
    tokens: int
    seconds: float

    def __str__(self) -> str:
        part = "" if self.windows == self.total_windows else f" of {self.total_windows}"
        return f"perplexity {self.ppl:.3f} (context {self.ctx}, {self.windows}{part} windows)"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, ctx: int, windows: int | None = None,
               progress: bool = True) -> Perplexity:
    total = ids.numel() // ctx
    if total == 0:
        raise ValueError(f"the evaluation stream has {ids.numel()} tokens, fewer than one window of {ctx}")
    n = total if windows is None else max(1, min(windows, total))
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    with decode_cache():
        for w in tqdm(range(n), desc=f"perplexity ctx={ctx}", unit="window", disable=not progress, leave=False):
            window = ids[w * ctx:(w + 1) * ctx].unsqueeze(0)
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
            nll_sum += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += ctx - 1
    return Perplexity(math.exp(nll_sum / count), ctx, n, total, count, time.perf_counter() - start)
