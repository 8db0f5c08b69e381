"""Preemption: SIGTERM / SIGUSR1 -> save a checkpoint after the current step, exit 0.

The handler only sets a flag; the training loop checks it at the end of every step
(all ranks agree through a MAX all-reduce, since a launcher may signal only some of
them), saves a full checkpoint and returns, and ``longsky train`` exits with status 0.

Slurm: ask for a warning signal before the time limit and requeue on exit, e.g.::

    #SBATCH --signal=B:USR1@300     # USR1 to the batch shell 5 min before the limit
    #SBATCH --requeue
    srun longsky train --config job.yaml &
    SRUN_PID=$!
    trap 'kill -USR1 $SRUN_PID; wait $SRUN_PID; scontrol requeue $SLURM_JOB_ID' USR1
    wait $SRUN_PID

or ``#SBATCH --signal=USR1@300`` to deliver it to every task of the job step. Slurm
preemption sends SIGTERM to all tasks, then SIGKILL after ``KillWait`` seconds: the
current step plus one checkpoint save must fit in that grace time. A requeued job
resumes from ``latest`` with the same command (``checkpoint.load`` defaults to
``checkpoint.save``). A SIGKILL loses only the steps since the last checkpoint.
"""

from __future__ import annotations

import logging
import signal

import torch

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager installing the handlers; restores the previous ones on exit."""

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is None:
            log.warning("received %s: saving a checkpoint after this step, then exiting",
                        signal.Signals(signum).name)
        self.received = signum

    def __enter__(self):
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. in-process use from a worker thread)
                log.warning("cannot install a %s handler outside the main thread", signal.Signals(sig).name)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return False

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank received a signal."""
        from megatron_longsky.runtime.device import current_device

        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=current_device())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
