"""Switching finished datasets into place so that a kill at any point leaves the old or the new.

A writer puts every file of the new datasets under temporary names (``.<name>.tmp-<pid>``,
finished and fsynced), then :func:`switch_files`:

1. writes a journal ``.<marker>.switch`` beside each dataset's marker (its ``.idx``), each
   listing every rename of the whole switch (atomically: temp name, fsync, rename);
2. removes the old markers, so no moment shows an old ``.idx`` beside new data;
3. renames the data files and sidecars, then the markers, into place;
4. removes the journals.

Until the last journal exists nothing of the old datasets was touched: a killed run leaves
them whole (its temporaries are stale and removed by the next writer). Once every journal
exists, the new datasets are whole on disk (under temporary or final names) and
:func:`finish_interrupted_switch` completes the renames: every reader
(:func:`~megatron_longsky.data.index_format.check_pair`,
:func:`~megatron_longsky.data.metadata.read_meta`) and every writer calls it first, under the
dataset's output lock, when the journal's process is dead. SIGINT/SIGTERM are held back
during the switch itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Sequence

from megatron_longsky.errors import UserError
from megatron_longsky.utils.atomic import fsync_dir, pid_alive, temp_path_for

JOURNAL_SUFFIX = ".switch"


class SwitchError(UserError, ValueError):
    """A dataset is being switched into place by another live run, or its journal is unreadable."""


def journal_path(marker: str | Path) -> Path:
    """The journal beside a dataset's marker file (its ``.idx``)."""
    marker = Path(marker)
    return marker.with_name(f".{marker.name}{JOURNAL_SUFFIX}")


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM)):
    """Hold ``signals`` back (they stay pending) for a few renames that must not be split."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_journal(path: Path, record: dict) -> None:
    tmp = temp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def switch_files(groups: Sequence[tuple[Sequence[Path], Sequence[Path]]], _step=None) -> None:
    """Rename ``(temporaries, finals)`` groups into place together; each group's last file is
    its marker (see the module doc). ``_step(name)`` is called before each step (tests kill
    the process there)."""
    step = _step or (lambda name: None)
    groups = [([Path(t) for t in temps], [Path(f) for f in finals]) for temps, finals in groups]
    journals = [journal_path(finals[-1]) for _, finals in groups]
    record = {"pid": os.getpid(), "journals": [os.path.abspath(j) for j in journals],
              # in the order they are done: data files and sidecars, then the markers
              "renames": [[os.path.abspath(t), os.path.abspath(f)] for temps, finals in groups
                          for t, f in zip(temps[:-1], finals[:-1])]
              + [[os.path.abspath(temps[-1]), os.path.abspath(finals[-1])] for temps, finals in groups]}
    directories = {Path(os.path.abspath(finals[-1])).parent for _, finals in groups}
    with signals_deferred():
        try:
            for journal in journals:
                step(f"journal {journal.name}")
                _write_journal(journal, record)
            for directory in directories:
                fsync_dir(directory)
        except BaseException:
            for journal in journals:
                journal.unlink(missing_ok=True)
            raise
        try:
            _switch(groups, journals, directories, step)
        except BaseException:
            with contextlib.suppress(OSError):  # e.g. a full disk: the next reader finishes it
                _roll_forward(record)
            raise


def _switch(groups, journals, directories, step) -> None:
    for _, finals in groups:
        step(f"unlink {finals[-1].name}")
        finals[-1].unlink(missing_ok=True)
    for temps, finals in groups:
        for tmp, final in zip(temps[:-1], finals[:-1]):
            step(f"rename {final.name}")
            os.replace(tmp, final)
    for temps, finals in groups:
        step(f"rename {finals[-1].name}")
        os.replace(temps[-1], finals[-1])
    for directory in directories:
        fsync_dir(directory)
    for journal in journals:
        step(f"remove {journal.name}")
        journal.unlink(missing_ok=True)


def _roll_forward(record: dict) -> None:
    journals = [Path(j) for j in record["journals"]]
    if not all(j.exists() for j in journals):
        # Killed while writing the journals: no old file was touched yet; drop the new temporaries.
        for tmp, _ in record["renames"]:
            Path(tmp).unlink(missing_ok=True)
    else:
        for tmp, final in record["renames"]:  # data files first, markers last
            if os.path.exists(tmp):
                os.replace(tmp, final)
        for directory in {Path(f).parent for _, f in record["renames"]}:
            fsync_dir(directory)
    for journal in journals:
        journal.unlink(missing_ok=True)


def finish_interrupted_switch(prefix: str | Path, wait_s: float = 30.0) -> bool:
    """Complete (or drop) a switch of ``<prefix>.idx`` that a killed run left; True if one was.

    A switch by a live process is waited for (it takes milliseconds) up to ``wait_s``."""
    from megatron_longsky.utils.output_paths import OutputLock, OutputLockedError

    journal = journal_path(f"{prefix}.idx")
    deadline = time.monotonic() + wait_s
    while os.path.lexists(journal):
        try:
            record = json.loads(journal.read_text(encoding="utf-8"))
            pid = int(record["pid"])
            record["journals"], record["renames"]  # noqa: B018 - the shape is checked here
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise SwitchError(f"{journal}: unreadable switch journal ({exc}); remove it after checking "
                              f"{prefix}.*") from None
        if pid == os.getpid():  # our own switch failed part-way: finish it
            _roll_forward(record)
            return True
        if not pid_alive(pid):
            try:
                with OutputLock(prefix):
                    if journal.exists():
                        _roll_forward(record)
                        return True
                    return False
            except OutputLockedError:
                pass  # a writer holds it: it finishes the switch first thing
        if time.monotonic() > deadline:
            raise SwitchError(f"indexed dataset {prefix} is being switched into place by pid {pid} "
                              f"({journal}); try again when that run has finished")
        time.sleep(0.05)
    return False
