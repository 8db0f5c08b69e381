"""Helper processes end with the process that started them.

A trainer killed by SIGKILL, an OOM killer or a crash runs no cleanup, so its helpers
(the checkpoint writer's queue server, megatron-core's async checkpoint writer,
DataLoader workers) would live on, holding the job's stdout open so whatever reads it
waits forever. On Linux the kernel can signal a child when its parent dies
(``PR_SET_PDEATHSIG``); elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_registered = False


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def detach_from_output() -> None:
    """Point stdin/stdout/stderr at /dev/null, so this helper never holds the job's pipes."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def forked_children_die_with_this_process() -> None:
    """Every child this process forks from now on (DataLoader workers, megatron-core's
    async checkpoint writer) is killed when this process dies. Children started by
    ``spawn``/``exec`` call :func:`die_with_parent` themselves."""
    global _registered
    if _registered or not sys.platform.startswith("linux"):
        return
    _registered = True
    os.register_at_fork(after_in_child=die_with_parent)
