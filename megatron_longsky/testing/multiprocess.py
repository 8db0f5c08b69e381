"""Run a function in N real processes joined by gloo (tests and benchmarks).

Each worker gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT like torchrun would give,
runs ``fn(*args)`` and sends back its (picklable) return value. A failure in any
rank is re-raised in the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from megatron_longsky.runtime.distributed import free_port  # noqa: F401 - re-exported for tests


def _worker(local_rank, fn, args, world_size, port, out_dir, threads):
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(threads)
    path = Path(out_dir) / f"rank{local_rank}.pkl"
    try:
        result = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    finally:
        try:
            from megatron_longsky.runtime.distributed import shutdown

            shutdown()
        except Exception:  # noqa: BLE001
            pass
    with open(path, "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, world_size: int, *args, threads: int = 1, timeout: float = 600.0):
    """Run ``fn(*args)`` on ``world_size`` gloo processes; return the per-rank results."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="longsky-mp-") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, args, world_size, port, out_dir, threads),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"distributed run of {fn.__name__} exceeded {timeout}s")
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} of {fn.__name__} died without a result")
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{value}")
            results.append(value)
        return results
