"""The one place that resolves a command's input and output paths and refuses collisions.

Every command that writes calls :func:`check_outputs` (or :func:`check_prefix` for a
dataset prefix) before any work. Paths are compared after ``os.path.realpath`` (``./``
spellings, ``..``, symlinks) and by inode (hard links), both ways:

- an output equal to an input, or the directory of an input (replacing it deletes the input),
  or inside an input that is a directory read as a whole (``tree_inputs``: an HF directory,
  a checkpoint);
- two outputs that are one path, or one inside the other;
- an input listed twice (``unique_inputs``), e.g. ``--input a --input ./a``;
- an existing output that is not a regular file (a character device, a FIFO, a directory
  where a file goes) or not a directory where a directory goes: refused even with
  ``--overwrite``;
- an existing output without ``--overwrite``.

Each refusal is an :class:`OutputExistsError` (a ``UserError``: one line, exit 2) naming
both paths. :class:`OutputLock` keeps two runs from writing one output at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Iterable, Sequence

from megatron_longsky.errors import UserError

log = logging.getLogger(__name__)


class OutputExistsError(UserError, ValueError):
    """An output already exists (and ``--overwrite`` was not given), is also an input, or
    collides with another path of the command; the message names both paths."""


class OutputLockedError(UserError, RuntimeError):
    """Another run holds the lock of an output; the message names the holder."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _real(path: str | Path) -> str:
    return os.path.realpath(os.fspath(path))


def _inode(path: str | Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies under it (both real paths)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_prefix(prefix: str | Path, flag: str = "--output-prefix") -> str:
    """A dataset prefix names files in a directory: not empty, not ending in '/', not a directory."""
    text = os.fspath(prefix)
    if not text.strip():
        raise OutputExistsError(f"{flag} is empty: give a path prefix such as out/corpus")
    if text.endswith(("/", os.sep)) or os.path.basename(text) in (".", ".."):
        raise OutputExistsError(f"{flag}={text} names a directory, not a file prefix: "
                                f"add a name, e.g. {text.rstrip('/') or '.'}/corpus")
    if os.path.isdir(text):
        raise OutputExistsError(f"{flag}={text} is a directory: add a file name prefix, e.g. {text}/corpus")
    return text


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path] = (), overwrite: bool = False,
                  flag: str = "--overwrite", *, tree_inputs: Iterable[str | Path] = (),
                  tree_outputs: Iterable[str | Path] = (), unique_inputs: bool = False,
                  report_dirs: Iterable[str | Path] = ()) -> None:
    """Refuse any collision between ``outputs`` (files), ``tree_outputs`` (directories the
    command creates or replaces whole), ``inputs`` (files) and ``tree_inputs`` (directories
    read as a whole), or an existing output without ``overwrite`` (see the module doc).
    ``report_dirs`` are directories the command writes a few named files into, keeping the
    rest (evaluation reports): one may not be an input nor lie inside an input directory,
    and an existing one must be a directory."""
    for report in map(os.fspath, report_dirs):
        real = _real(report)
        for src in [*map(os.fspath, inputs), *map(os.fspath, tree_inputs)]:
            if real == _real(src):
                raise OutputExistsError(f"output directory {report} is also an input ({src}): choose another output")
        for src in map(os.fspath, tree_inputs):
            if _inside(real, _real(src)):
                raise OutputExistsError(f"output directory {report} lies inside the input directory {src}: "
                                        "choose an output outside it")
        if os.path.exists(report) and not os.path.isdir(report):
            raise OutputExistsError(f"output directory {report} is {_kind(os.stat(report).st_mode)}, not a directory: "
                                    "choose another output")
    # as the user spelled them (pathlib would drop a "./"), for the messages
    files_out = [os.fspath(p) for p in outputs]
    trees_out = [os.fspath(p) for p in tree_outputs]
    files_in = [os.fspath(p) for p in inputs]
    trees_in = [os.fspath(p) for p in tree_inputs]
    for path in [*files_out, *trees_out]:
        if not path.strip():
            raise OutputExistsError("an output path is empty")
    all_out = [(p, _real(p), False) for p in files_out] + [(p, _real(p), True) for p in trees_out]
    all_in = [(p, _real(p), False) for p in files_in] + [(p, _real(p), True) for p in trees_in]

    if unique_inputs:
        seen: dict = {}
        for path, real, _ in all_in:
            key = _inode(path) or real
            if key in seen:
                raise OutputExistsError(f"input {path} is listed twice (also as {seen[key]})")
            seen[key] = path

    for out, out_real, out_tree in all_out:
        out_ino = _inode(out)
        for src, src_real, src_tree in all_in:
            if out_real == src_real or (out_ino is not None and out_ino == _inode(src)):
                raise OutputExistsError(f"output {out} is also an input ({src}): choose another output")
            if _inside(src_real, out_real):
                raise OutputExistsError(f"output {out} contains the input {src}: replacing it would delete the "
                                        "input; choose another output")
            if src_tree and _inside(out_real, src_real):
                raise OutputExistsError(f"output {out} lies inside the input directory {src}: choose an output "
                                        "outside it")
    for i, (a, a_real, a_tree) in enumerate(all_out):
        for b, b_real, b_tree in all_out[i + 1:]:
            if a_real == b_real:
                raise OutputExistsError(f"outputs {a} and {b} are the same file: choose different outputs")
            if _inside(a_real, b_real) or _inside(b_real, a_real):
                outer, inner = (b, a) if _inside(a_real, b_real) else (a, b)
                raise OutputExistsError(f"output {inner} lies inside the output {outer}: choose different outputs")

    existing = []
    for out, _, out_tree in all_out:
        try:
            mode = os.stat(out).st_mode
        except FileNotFoundError:
            if os.path.islink(out):  # a dangling symlink: replacing it is harmless but surprising
                existing.append(out)
            continue
        except OSError as exc:
            raise OutputExistsError(f"output {out} cannot be checked: {exc.strerror or exc}") from None
        wanted = stat.S_ISDIR(mode) if out_tree else stat.S_ISREG(mode)
        if not wanted:
            raise OutputExistsError(f"output {out} is {_kind(mode)}, not a "
                                    f"{'directory' if out_tree else 'regular file'}: refusing to replace it "
                                    f"(even with {flag}); choose another output")
        existing.append(out)
    if existing and not overwrite:
        raise OutputExistsError(f"output {existing[0]} already exists: pass {flag} to replace it")


# --------------------------------------------------------------------------- locks

def lock_path_for(path: str | Path) -> Path:
    """The lock file of an output (a dataset prefix, a file or a directory): ``.<name>.lock`` beside it."""
    path = Path(os.path.abspath(os.fspath(path)))
    return path.with_name(f".{path.name}.lock")


class OutputLock:
    """An exclusive ``fcntl.flock`` on ``.<name>.lock`` beside an output, held while a run
    writes it. A second run refuses at once (:class:`OutputLockedError` naming the holder's
    pid and command). The lock file records the holder and is removed on release; the lock
    dies with its process, so a killed run never blocks the next one."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.path = lock_path_for(output)
        self._fd: int | None = None

    def acquire(self, blocking: bool = False) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputLockedError(f"output {self.output} is being written by another run ({holder}; lock "
                                        f"file {self.path}): wait for it to finish or choose another output") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                    os.close(fd)
                    raise
                # a file system without flock (e.g. Lustre mounted without it): write unlocked
                log.warning("%s: this file system has no file locks (%s); two runs on this output are not "
                            "kept apart", self.path, exc.strerror)
                break
            except BaseException:
                os.close(fd)
                raise
            # The previous holder may have removed the file between our open and flock: retry on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(Path(sys.argv[0]).name.split()) or 'python'} "
                     f"{' '.join(sys.argv[1:3])}".strip().encode("utf-8", "replace") + b"\n")
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        return text.splitlines()[0] if text else "pid unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def output_locks(outputs: Sequence[str | Path]):
    """Hold :class:`OutputLock` on every output (in a fixed order) for the block."""
    locks = []
    try:
        for out in sorted({os.path.abspath(os.fspath(p)) for p in outputs}):
            locks.append(OutputLock(out).acquire())
        yield locks
    finally:
        for lock in reversed(locks):
            lock.release()
