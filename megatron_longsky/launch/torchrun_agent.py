"""torchrun for Slurm jobs: one agent per node that passes preemption signals on.

    srun --ntasks-per-node=1 python -m megatron_longsky.launch.torchrun_agent \\
        --nnodes=$SLURM_NNODES --nproc-per-node=8 ... -m megatron_longsky.cli train ...

takes torchrun's own arguments. The difference is SIGUSR1, the signal our sbatch
scripts ask Slurm for before the time limit (``--signal=B:USR1@N``) and forward to the
step: plain torchrun does not handle it and dies, and its workers are killed with it
before they can save. Here the agent forwards SIGUSR1 to its workers and keeps waiting
for them: they finish the step, save a checkpoint and exit 0 however long the save
takes, and the agent then exits 0 too. SIGTERM (``scancel``, Slurm's own preemption)
keeps torchrun's handling: forwarded to the workers, who save if the time Slurm leaves
(KillWait / GraceTime) allows; the agent itself waits up to
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds for them (torch >= 2.9 reads it; we default it
to 900 instead of torchrun's 30, which is shorter than a large checkpoint's save).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

# Seconds torchrun waits for its workers after a SIGTERM before killing them.
SHUTDOWN_GRACE_S = 900


def child_pids(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after its ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _forward(signum, frame) -> None:
    children = child_pids()
    print(f"longsky torchrun agent on {socket.gethostname()}: got {signal.Signals(signum).name}, "
          f"forwarding it to {len(children)} worker(s) and waiting for them to save and exit",
          file=sys.stderr, flush=True)
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun_main

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_S))
    signal.signal(signal.SIGUSR1, _forward)
    print(f"longsky torchrun agent on {socket.gethostname()} (Slurm task "
          f"{os.environ.get('SLURM_PROCID', '?')}/{os.environ.get('SLURM_NTASKS', '?')}): torchrun {' '.join(argv)}",
          file=sys.stderr, flush=True)
    torchrun_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
