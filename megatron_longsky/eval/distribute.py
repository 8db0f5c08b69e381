"""Spread evaluation cases over data-parallel replicas of a Megatron job.

With world size > TP*PP*CP there are several model replicas; each takes every
``dp_size``-th case (all ranks of a replica take the same ones, so their collectives
match), and the results are all-gathered over the data-parallel group so every rank
ends with all of them, in the original order. Without megatron-core's parallel state
(HF backend, tests) everything runs locally.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def data_parallel_layout():
    """``(rank, size, group)`` of this process's data-parallel group, or None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return None
    return parallel_state.get_data_parallel_rank(), size, parallel_state.get_data_parallel_group()


def sharded_map(items: Sequence[T], fn: Callable[[T], R], progress=None) -> list[R]:
    """``[fn(x) for x in items]``, computed across data-parallel replicas when there are several."""
    layout = data_parallel_layout()
    if layout is None:
        out = []
        for item in items:
            out.append(fn(item))
            if progress is not None:
                progress.update(1)
        return out
    import torch.distributed as dist

    rank, size, group = layout
    mine = []
    for index in range(rank, len(items), size):
        mine.append((index, fn(items[index])))
        if progress is not None:
            progress.update(size)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, mine, group=group)
    results: list = [None] * len(items)
    for part in gathered:
        for index, value in part:
            results[index] = value
    return results
