"""Atomic outputs: a file or folder appears whole under its final name or not at all, so an interrupted or failed
run never leaves a half-written result for a user (or a later --resume) to trust."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_json(path: str | Path, record) -> None:
    """Write `record` as JSON to a hidden sibling of `path`, then rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, p)


def directory(out: Path, write) -> None:
    """Call write(tmp_dir) on a temporary sibling of `out`, then move it into place; nothing is left on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
