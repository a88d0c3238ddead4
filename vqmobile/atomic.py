"""Atomic outputs: a file or folder appears whole under its final name or not at all, so an interrupted or failed
run never leaves a half-written result for a user (or a later --resume) to trust. Missing parent folders are
created like `mkdir -p` and removed again when the write fails; what appears gets the modes the user's umask gives
(files 0644 and folders 0755 under the usual umask 022), like any other tool's output. Torch-free: the CLI checks
an output location with it before loading anything heavy."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_output(out: str | Path, *, overwrite: bool, folder: bool = True, option: str = "--out") -> Path:
    """Check where a result (a folder, or a file when folder=False) will go before any long work starts, so a bad
    location fails in the first second. Returns the absolute path. Nothing is created: a run that fails before it
    writes leaves nothing behind."""
    out = Path(out).expanduser().resolve()
    if out.exists():
        if not overwrite:
            raise UserError(f"output {out} already exists: choose another {option} or pass --overwrite")
        if out.is_dir() != folder:
            raise UserError(f"output {out} is a {'folder' if out.is_dir() else 'file'}: choose another {option}")
    base = out.parent  # the nearest existing ancestor decides whether the missing parents can be created
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{base} is not a folder: choose another {option}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {base}: choose another {option}")
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give `path` (and everything under it) the modes a plain create would have: temporary files and folders are
    made private (mkdtemp's 0700, safetensors' 0600), and those modes must not survive the rename."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        executable = p.is_dir() or mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


# What a user can fix when a write fails: space, quota, permissions, a read-only file system.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


@contextmanager
def _parents(folder: Path, out: Path):
    """Create `folder` and its missing parents for the duration of a write of `out`; on failure remove the ones
    made here. A full disk or a permission error becomes a one-line UserError naming `out`, not our temporary path."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException as e:
        for d in missing:  # deepest first; a folder something else wrote into in the meantime stays
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and e.errno in _USER_OS_ERRORS:
            raise UserError(f"cannot write {out}: {e.strerror}; nothing was written: free some space or choose "
                            "another location") from None
        raise


def write_json(path: str | Path, record) -> None:
    """Write `record` as JSON to a hidden sibling of `path`, then rename it into place."""
    p = Path(path).expanduser()
    with _parents(p.parent, p):
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_file(path: str | Path, write) -> None:
    """Call write(tmp_path) for a hidden sibling of `path` (same suffix, so format-sniffing writers such as
    matplotlib's savefig still work), then rename it into place."""
    p = Path(path).expanduser()
    with _parents(p.parent, p):
        tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}{p.suffix}")
        try:
            write(tmp)
            _apply_umask(tmp)
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def directory(out: Path, write) -> None:
    """Call write(tmp_dir) on a temporary sibling of `out`, then move it into place; nothing is left on failure."""
    with _parents(out.parent, out):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            write(tmp)
            _apply_umask(tmp)
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
