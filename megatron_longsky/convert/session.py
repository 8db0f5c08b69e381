"""A one-process megatron-core runtime for conversion (TP=1, PP=1).

Conversion needs no model parallelism: ``dist_checkpointing`` stores global tensors, so
a checkpoint written by one process loads at any TP/PP layout, and any checkpoint loads
into one process. Inside an existing single-process run (e.g. the quickstart) the
current runtime is reused; otherwise one is started and torn down afterwards, leaving
the caller's RNG states and the CPU compatibility layer as they were.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from megatron_longsky.convert.hf_config import ConversionError


@contextlib.contextmanager
def single_process_runtime():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longsky.runtime import cpu_compat
    from megatron_longsky.runtime.distributed import LaunchEnv, ParallelConfig, free_port, initialize, shutdown

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                f"conversion runs in one process, but this job has {dist.get_world_size()} ranks: "
                "run the converter on its own (any checkpoint layout loads into one process)"
            )
        if parallel_state.model_parallel_is_initialized():
            yield
            return
    rng = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    compat_was_active = cpu_compat.is_active()
    started = not dist.is_initialized()
    initialize(ParallelConfig(), seed=0, launch=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    try:
        yield
    finally:
        if started:
            shutdown()
        elif parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if not compat_was_active and cpu_compat.is_active():
            cpu_compat.disable()
        torch.random.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
