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
from pathlib import Path

from megatron_longsky.utils.output_paths import OutputExistsError, check_outputs  # noqa: F401 - the one place


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(paths) -> list[Path]:
    """Delete temporary files and directories of ``paths`` (``.<name>.tmp-<pid>``) left by
    runs that were killed: their pid is no longer alive."""
    removed = []
    for final in map(Path, paths):
        if not final.parent.is_dir():
            continue
        for pattern in (f".{final.name}.tmp-*",):
            for tmp in final.parent.glob(pattern):
                pid = tmp.name.rsplit("-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    if tmp.is_dir() and not tmp.is_symlink():
                        shutil.rmtree(tmp, ignore_errors=True)
                    else:
                        tmp.unlink(missing_ok=True)
                    removed.append(tmp)
    return removed


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
    remove_stale_temps([path])
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
    """A fresh ``.<name>.tmp-<pid>`` directory beside ``path``, created with the umask's mode
    (``mkdtemp`` would make it 0700, and the renamed output would keep that). Temporary
    trees of killed runs are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps([path])
    tmp = temp_path_for(path)
    if tmp.exists():  # our pid, reused from a process that died: nothing of ours
        shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    return tmp


def recover_directory_swap(path: str | Path) -> list[Path]:
    """Finish what a killed :func:`atomic_directory` swap left: with ``path`` missing, the
    old tree (``.<name>.old-<pid>``) is put back; with ``path`` present, the old tree is
    deleted. Only trees of dead pids are touched. Returns what was restored or removed."""
    path = Path(path)
    done = []
    if not path.parent.is_dir():
        return done
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        if not os.path.lexists(path):
            os.replace(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)
        done.append(old)
    return done


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool | None = None, flag: str = "--overwrite"):
    """Yield a fresh temporary directory beside ``path``; when the block succeeds, swap it in.

    The run holds ``path``'s :class:`~megatron_longsky.utils.output_paths.OutputLock` for the
    whole block (a second run refuses); with ``overwrite=False`` an existing ``path`` is
    refused under the lock. An existing ``path`` is renamed aside first and deleted only
    once the new tree is in place, so ``path`` never holds a partial tree: a failure during
    the swap puts the old tree back, and after a hard kill between the two renames the next
    run (:func:`recover_directory_swap`) puts it back. On failure (also SIGTERM under
    ``stop_on_signals``) the temporary tree is removed and ``path`` is untouched."""
    from megatron_longsky.utils.output_paths import OutputLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(path):
        recover_directory_swap(path)
        if overwrite is False and os.path.lexists(path):
            raise OutputExistsError(f"output {path} already exists: pass {flag} to replace it")
        tmp = make_temp_dir_beside(path)
        try:
            yield tmp
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                if old.exists():
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)
                raise
            if old is not None:
                if old.is_symlink():
                    old.unlink()
                else:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
