"""File fingerprints (sha256) for model sources, checkpoints and bundles."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the files' bytes, in sorted path order (a single file gives its plain sha256)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])
