"""Run a ``longsky`` subcommand as its own process group, like a user would.

Training and evaluation stages run as separate processes (``torchrun`` for several
ranks): megatron-core's parallel state is process-global, and each stage has its own
layout. Output goes to ``<run>/logs/<name>.log``; a failure raises with the log's tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_longsky.runtime.distributed import free_port
from megatron_longsky.utils.atomic import atomic_write_text


class StageFailed(RuntimeError):
    pass


def longsky_command(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_longsky.cli", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", "megatron_longsky.cli", *args,
    ]


def run_longsky(args: list[str], log_path: Path, nproc: int = 1, threads: int | None = None) -> None:
    env = dict(os.environ)
    # Two cores: one thread per rank when several ranks share them.
    env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 2) // nproc))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if nproc == 1:
        # A single process still sets up a process group: give it a free port, not the
        # default 29500 that another job on the machine may hold.
        env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(free_port())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = longsky_command(args, nproc)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise StageFailed(f"{' '.join(args[:1])} failed (exit {proc.returncode}); see {log_path}:\n{tail}")


def write_yaml(path: Path, data: dict) -> Path:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path
