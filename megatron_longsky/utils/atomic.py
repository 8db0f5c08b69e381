"""Outputs appear under their final name only when complete.

Everything we write (datasets, manifests, checkpoints pointers, reports) goes to a
temporary name in the same directory and is renamed into place at the end, so an
interrupted run never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from megatron_longsky.errors import UserError


class OutputExistsError(UserError, ValueError):
    """An output already exists (and ``--overwrite`` was not given) or is also an input."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also catches hard links and symlinks
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs, inputs=(), overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuse to write ``outputs`` over any of ``inputs``, or over existing files unless ``overwrite``."""
    outputs, inputs = [Path(p) for p in outputs], [Path(p) for p in inputs]
    for out in outputs:
        for source in inputs:
            if _same_file(out, source):
                raise OutputExistsError(f"output {out} is also an input ({source}): choose another output")
    existing = [out for out in outputs if out.exists() or out.is_symlink()]
    if existing and not overwrite:
        raise OutputExistsError(f"output {existing[0]} already exists: pass {flag} to replace it")


def fsync_dir(directory: str | Path) -> None:
    """Make renames in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


@contextlib.contextmanager
def atomic_paths(paths):
    """Like :func:`atomic_path` for several files that must appear together.

    Files are renamed in the given order, so put the one that marks completion
    (e.g. an ``.idx`` index) last.
    """
    paths = [Path(p) for p in paths]
    tmps = [temp_path_for(p) for p in paths]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmps
        for tmp, final in zip(tmps, paths):
            os.replace(tmp, final)
    finally:
        for tmp in tmps:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def make_temp_dir_beside(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a fresh temporary directory beside ``path``; when the block succeeds, swap it in.

    An existing ``path`` is renamed aside first and deleted only once the new tree is in
    place, so ``path`` never holds a partial tree: a failure during the swap puts the old
    tree back, and a hard kill between the two renames leaves it under ``.<name>.old-*``.
    On failure the temporary tree is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = make_temp_dir_beside(path)
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
