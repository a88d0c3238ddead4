"""Calibration and evaluation data: seeded calibration windows from a text file, and the WikiText-2 test stream.

The test stream follows the papers' procedure (rows = lines of the raw file joined with blank lines, tokenized once);
calibration never touches the test split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI checks data paths before loading it
    import torch


def default_data_dir() -> Path:
    """$VQMOBILE_DATA, else the shared/ folder beside the source checkout."""
    env = os.environ.get("VQMOBILE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def _data_file(path: str | Path | None, default_name: str, what: str) -> Path:
    p = Path(path).expanduser() if path is not None else default_data_dir() / default_name
    if not p.is_file():
        hint = "pass a text file" if path is not None else f"pass one with --calib/--data or set VQMOBILE_DATA to the folder holding {default_name}"
        raise UserError(f"{what} file {p} not found: {hint}")
    return p


def calibration_file(path: str | Path | None, nsamples: int, seqlen: int) -> Path:
    """The calibration text file (default: WikiText-2 validation), once the sample counts are checked."""
    if nsamples < 1 or seqlen < 2:
        raise UserError(f"calibration needs at least 1 sample of 2 tokens, got {nsamples} x {seqlen}")
    return _data_file(path, "wiki.valid.tokens", "calibration")


def evaluation_file(path: str | Path | None) -> Path:
    """The evaluation text file (default: the WikiText-2 raw test split)."""
    return _data_file(path, "wiki.test.raw", "evaluation")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


def calibration_data(tokenizer, path: str | Path | None = None, nsamples: int = 128, seqlen: int = 512,
                     seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of the file (default: WikiText-2 validation)."""
    import torch

    p = calibration_file(path, nsamples, seqlen)
    ids = _tokenize(tokenizer, p.read_text(encoding="utf-8", errors="replace"))
    if ids.numel() <= seqlen:
        raise UserError(f"calibration file {p} has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        "use a longer file or a smaller --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def wikitext_test_ids(tokenizer, path: str | Path | None = None) -> torch.Tensor:
    """The whole WikiText-2 raw test split as one token stream [T]."""
    p = evaluation_file(path)
    rows = p.read_text(encoding="utf-8").splitlines(keepends=True)
    return _tokenize(tokenizer, "\n\n".join(rows))
