"""Training checkpoints: model, optimizer, scheduler, data position, RNG states, config.

Layout (see :mod:`megatron_longsky.checkpoint.layout`)::

    <root>/latest                           written last, atomically
    <root>/iter_0000100/config.yaml         the job config
    <root>/iter_0000100/model/              dist_checkpointing (global tensors: reshardable)
    <root>/iter_0000100/optimizer/          dist_checkpointing of the optimizer state; for the
                                            distributed optimizer in megatron-core's
                                            'dp_reshardable' form (each DP x CP rank writes its
                                            own shard, reshards over DP x CP only) or
                                            'fully_reshardable' (per model parameter, reshards
                                            over TP/PP too); the form and the layout it was
                                            written at are recorded in the checkpoint
    <root>/iter_0000100/trainer/state.json  iteration, consumed samples, NaN counters, scheduler
    <root>/iter_0000100/trainer/rng_rank00000.pt   python/numpy/torch/megatron RNG per rank

A save goes to ``<root>/.iter_0000100.partial`` and is renamed into place by rank 0
after every rank has finished writing; only then is ``latest`` rewritten and old
iterations pruned. A crash at any point leaves ``latest`` on the previous complete
checkpoint; what it leaves (``.partial``/``.old`` directories, ``latest`` temporaries, an
iteration half deleted by pruning) is removed when the next run starts
(:func:`~megatron_longsky.checkpoint.layout.clean_checkpoint_root`).

Saves and loads go through megatron-core's fully parallel strategy wrappers over the
data-parallel group with context parallelism (the group the distributed optimizer shards
over), as Megatron-LM does: the writes of replicated tensors (weights, and everything of a
non-distributed optimizer) are spread over the DP x CP ranks instead of all falling on
DP rank 0, and on load each rank reads a part and the parts are exchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_longsky.checkpoint.layout import (
    MODEL, CheckpointError, iteration_dir, prune_checkpoints, store_tokenizer, write_checkpoint_config, write_latest,
)
from megatron_longsky.checkpoint.model_io import (
    load_model_weights,
    model_sharded_state_dict,
    reading_checkpoint,
    save_model_weights,
)
from megatron_longsky.runtime.device import use_cuda
from megatron_longsky.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)

OPTIMIZER = "optimizer"
TRAINER = "trainer"
STATE_FILE = "state.json"
# Distributed-optimizer checkpoint forms (megatron-core's names). 'dp_reshardable': each
# DP x CP rank writes its own flat shard, no gathering; loads at another DP x CP size but
# the same TP/PP and gradient buckets. 'fully_reshardable': per model parameter, gathered
# over DP x CP at save (memory: the whole TP/PP shard's optimizer state on every rank);
# loads at any layout.
DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
# Checkpoints written before the form was recorded are fully reshardable.
_UNRECORDED_FORMAT = FULLY_RESHARDABLE


@dataclass
class TrainerState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_nan_steps: int = 0


def _rank() -> int:
    return torch.distributed.get_rank()


def _barrier() -> None:
    torch.distributed.barrier()


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if use_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and use_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / TRAINER / f"rng_rank{rank:05d}.pt"


_WRITER_MANAGER = None


def _writer_server_init(parent_pid: int) -> None:
    """In the queue server: deaf to preemption signals, killed with the trainer, off its stdout."""
    import signal

    from megatron_longsky.utils.process import detach_from_output, die_with_parent

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)
    detach_from_output()


def prepare_checkpoint_writer() -> None:
    """Start dist_checkpointing's result-queue server now, deaf to SIGTERM/SIGUSR1.

    megatron-core's file writer reports through a ``multiprocessing`` Manager process it
    starts on the first save. Slurm signals every process of a task on preemption; that
    server would die and the save we are asked to make would fail. We start it ourselves
    (before the signal can arrive) with those signals ignored; it ends with this process,
    however this process ends (the kernel kills it when its parent dies, see
    :mod:`megatron_longsky.utils.process`), and never holds our stdout/stderr.
    """
    global _WRITER_MANAGER
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _WRITER_MANAGER is not None or filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_writer_server_init, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    _WRITER_MANAGER = manager


def _ensure_adam_state(optimizer) -> None:
    """Give every parameter an (empty) Adam state before loading into it.

    The distributed optimizer reads a common ``step`` from its state while building the
    state dict to load into; megatron-core's state initialiser does not create ``step``
    for torch's Adam (the fused apex/TE optimizers keep it elsewhere), so a resume before
    any step would fail. The values are overwritten by the load.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_optimizer.param_groups:
            for p in group["params"]:
                state = torch_optimizer.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                state.setdefault("step", torch.tensor(0.0))


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


@contextlib.contextmanager
def _keep_adam_step_on_reshardable_load(optimizer):
    """Work around two megatron-core 0.16.1 bugs with torch's Adam (no apex/TE) when the
    distributed optimizer loads its state:

    - the load copies every key of a parameter's Adam state from the checkpoint, but
      ``step`` is kept in the param groups, not per parameter: the 'fully_reshardable' copy
      fails with ``KeyError: 'step'``, and the 'dp_reshardable' one copies back the step
      the state had *before* the load (0 on a resume: Adam's bias correction restarts).
      ``load_state_dict`` has already set ``step`` from the param groups; we keep it;
    - that ``step`` is one tensor shared by every parameter's state, and torch's Adam
      increments it in place once per parameter: after a resume the bias correction
      would run ahead. Each parameter gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        original = inner._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, inner=inner, original=original):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            step = inner.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
            return original(model_param, tensors)

        inner._set_main_param_and_optimizer_states = set_states
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class method
    for inner in patched:
        for state in inner.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


class CheckpointLayoutError(CheckpointError):
    """A checkpoint cannot be loaded at this run's layout in the form it was written."""


def checkpoint_layout(model_chunks, optimizer_format: str) -> dict:
    """What a distributed-optimizer checkpoint's shards depend on, recorded at save and
    compared at load (Megatron-LM compares its TP/PP the same way)."""
    from megatron.core import parallel_state as ps

    return {
        "distrib_optim_sharding_type": optimizer_format,
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
        # The gradient buckets the flat optimizer shards follow (None: one bucket per buffer).
        "bucket_size": getattr(getattr(model_chunks[0], "ddp_config", None), "bucket_size", None),
    }


# The parts of the layout a 'dp_reshardable' checkpoint cannot change.
_DP_RESHARDABLE_FIXED = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "bucket_size")


def save_optimizer_format(requested: str, optimizer) -> str:
    """The form to write: 'auto' is megatron-core's and Megatron-LM's default,
    'dp_reshardable' (no gathering; resumes at any DP x CP size with the same TP/PP);
    'fully_reshardable' when asked for, before a resume at another TP/PP."""
    if not _is_distributed_optimizer(optimizer):
        return FULLY_RESHARDABLE  # a plain optimizer's state is stored per parameter anyway
    return DP_RESHARDABLE if requested == "auto" else requested


def load_optimizer_format(saved: dict | None, current: dict, ckpt_dir) -> str:
    """The form ``saved`` (the checkpoint's recorded layout) was written in, after checking
    that it loads at the ``current`` layout."""
    if not saved:
        return _UNRECORDED_FORMAT
    fmt = saved["distrib_optim_sharding_type"]
    if fmt == DP_RESHARDABLE:
        changed = [f"{k} {saved.get(k)} -> {current.get(k)}" for k in _DP_RESHARDABLE_FIXED
                   if saved.get(k) != current.get(k)]
        if changed:
            raise CheckpointLayoutError(
                f"{ckpt_dir}: its distributed-optimizer state is in the 'dp_reshardable' form, which "
                f"loads at another data/context-parallel size but not after this change: {', '.join(changed)}. "
                "Resume once at the layout it was saved with and checkpoint.optimizer_format=fully_reshardable "
                "until its next save, then resume at the new layout (or start from its weights alone with "
                "checkpoint.init_from)"
            )
    return fmt


def _optimizer_sharded_state_dict(optimizer, model_chunks, is_loading: bool, optimizer_format: str):
    if is_loading:
        _ensure_adam_state(optimizer)
    model_sd = model_sharded_state_dict(model_chunks)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                        metadata={"distrib_optim_sharding_type": optimizer_format})


def _parallel_group():
    """The group the fully parallel wrappers spread reads and writes over: data-parallel
    with context parallelism (replicas of the weights; the distributed optimizer's group)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def fully_parallel_save_strategy():
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _parallel_group())


def fully_parallel_load_strategy(checkpoint_dir: str | Path):
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(checkpoint_dir)),
                                            _parallel_group())


def save_checkpoint(root: str | Path, state: TrainerState, model_chunks, optimizer, scheduler,
                    config: dict, keep_last: int = 0, async_queue=None, optimizer_format: str = "auto") -> Path:
    """Collective. Writes ``<root>/iter_<state.iteration>`` completely, then points ``latest`` at it.

    With ``async_queue`` (megatron-core's ``AsyncCallsQueue``; the trainer uses it on GPU
    when ``checkpoint.async_save`` is set) the model and optimizer tensors are written by
    a background process and the rename + ``latest`` happen when the queue finalizes the
    save (``async_queue.maybe_finalize_async_calls``); the returned path exists only then.
    ``optimizer_format``: ``auto``, ``dp_reshardable`` or ``fully_reshardable``
    (:func:`save_optimizer_format`).
    """
    from megatron.core import dist_checkpointing

    if async_queue is not None:
        # One save in flight at a time: megatron-core's async writers share one results queue.
        async_queue.maybe_finalize_async_calls(blocking=True)
    root = Path(root)
    iteration = state.iteration  # the caller goes on changing `state` while this one is written
    final = iteration_dir(root, iteration)
    staging = root / f".{final.name}.partial"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        (staging / MODEL).mkdir(parents=True)
        (staging / OPTIMIZER).mkdir(parents=True)
        (staging / TRAINER).mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), _rng_file(staging, _rank()))
    fmt = save_optimizer_format(optimizer_format, optimizer)
    layout = checkpoint_layout(model_chunks, fmt)
    if _rank() == 0:
        atomic_write_json(staging / TRAINER / STATE_FILE, {
            **dataclasses.asdict(state),
            "scheduler": scheduler.state_dict(),
            "world_size": torch.distributed.get_world_size(),
            "distributed_optimizer": _is_distributed_optimizer(optimizer),
            "layout": layout,
        })
        # The checkpoint carries its tokenizer (a relative path in config.yaml, like an import's).
        tokenizer = config.get("tokenizer")
        write_checkpoint_config(staging, {**config, "tokenizer": store_tokenizer(staging, tokenizer)}
                                if isinstance(tokenizer, dict) else config)
    optimizer_sd = _optimizer_sharded_state_dict(optimizer, model_chunks, False, fmt)
    if async_queue is None:
        save_model_weights(model_chunks, staging, sharded_strategy=fully_parallel_save_strategy())
        dist_checkpointing.save(optimizer_sd, str(staging / OPTIMIZER), sharded_strategy=fully_parallel_save_strategy(),
                                content_metadata=layout)
        _publish(root, staging, final, iteration, keep_last)
        return final
    model_request = dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(staging / MODEL),
                                            sharded_strategy=fully_parallel_save_strategy(), async_sharded_save=True)
    optimizer_request = dist_checkpointing.save(optimizer_sd, str(staging / OPTIMIZER),
                                                sharded_strategy=fully_parallel_save_strategy(),
                                                async_sharded_save=True, content_metadata=layout)
    async_queue.schedule_async_request(_one_request(
        [model_request, optimizer_request], functools.partial(_publish, root, staging, final, iteration, keep_last)))
    return final


def _one_request(requests: list, then):
    """Several dist_checkpointing async saves as one request: written one after another
    by one background process, finalized in the same order on every rank, then ``then``.

    Two requests in flight at once would race: each writer posts its results to
    megatron-core's single process-wide results queue, and each finalize takes whichever
    result is first, so the model's metadata could describe the optimizer's files."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    calls = []
    for request in requests:
        args = list(request.async_fn_args)
        if request.preload_fn is not None:  # stage tensors to host memory now, as the caller would
            args[1] = request.preload_fn()
        calls.append((request.async_fn, tuple(args), dict(request.async_fn_kwargs)))
    finalize = [fn for request in requests for fn in request.finalize_fns] + [then]
    return AsyncRequest(_run_in_order, (calls,), finalize)


def _run_in_order(calls) -> None:
    for fn, args, kwargs in calls:
        if fn is not None:
            fn(*args, **kwargs)


def _publish(root: Path, staging: Path, final: Path, iteration: int, keep_last: int) -> None:
    """Collective: the staged checkpoint becomes ``iter_N``, then ``latest`` points at it."""
    _barrier()
    if _rank() == 0:
        old = None
        if final.exists():  # re-saving an iteration: swap the new one in, then drop the old
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        write_latest(root, iteration)
        removed = prune_checkpoints(root, keep_last)
        log.info("saved checkpoint %s%s", final, f" (pruned {removed})" if removed else "")
    _barrier()


def read_trainer_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / TRAINER / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {ckpt_dir} is a weights-only checkpoint "
                                "(start from it with checkpoint.init_from instead of resuming)")
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}): a truncated or corrupt checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("scheduler"), dict):
        raise CheckpointError(f"{path}: not a trainer state (an object with a 'scheduler' object): a truncated "
                              "or corrupt checkpoint")
    return state


def check_optimizer_kind(ckpt_dir: Path, saved: dict, distributed: bool) -> None:
    """Refuse to resume optimizer state saved by the other optimizer kind (their formats differ)."""
    saved_distributed = saved.get("distributed_optimizer", distributed)
    if saved_distributed != distributed:
        raise CheckpointError(
            f"{ckpt_dir} holds {'distributed' if saved_distributed else 'non-distributed'} optimizer state but "
            f"this run has optimizer.use_distributed_optimizer={not saved_distributed}: their formats differ. "
            f"Resume with use_distributed_optimizer={saved_distributed}, or start a new stage from its weights "
            "with checkpoint.init_from"
        )


def load_checkpoint(ckpt_dir: str | Path, model_chunks, optimizer, scheduler,
                    schedule_policy: str = "check") -> TrainerState:
    """Collective. Restore everything saved by :func:`save_checkpoint`, at any layout its
    optimizer form allows (:class:`CheckpointLayoutError` otherwise, before anything loads).

    ``schedule_policy``: what to do when the LR schedule differs from the checkpoint's
    (see :func:`megatron_longsky.training.resume_check.check_schedule`).

    RNG states are restored when the world size matches the one saved (they are per rank);
    otherwise the fresh seeds are kept (and a warning says so).
    """
    from megatron.core import dist_checkpointing

    from megatron_longsky.training.resume_check import check_schedule

    ckpt_dir = Path(ckpt_dir)
    saved = read_trainer_state(ckpt_dir)
    changed = check_schedule(saved["scheduler"], scheduler, schedule_policy, ckpt_dir)
    if changed and _rank() == 0:
        log.warning("resuming %s with the %s learning-rate schedule:\n  %s", ckpt_dir,
                    "config's" if schedule_policy == "use_config" else "checkpoint's", "\n  ".join(changed))
    check_optimizer_kind(ckpt_dir, saved, _is_distributed_optimizer(optimizer))
    fmt = load_optimizer_format(dist_checkpointing.load_content_metadata(str(ckpt_dir / OPTIMIZER)),
                                checkpoint_layout(model_chunks, "auto"), ckpt_dir)
    load_model_weights(model_chunks, ckpt_dir, sharded_strategy=fully_parallel_load_strategy(ckpt_dir / MODEL))
    sharded = _optimizer_sharded_state_dict(optimizer, model_chunks, True, fmt)
    with reading_checkpoint(ckpt_dir / OPTIMIZER, "the optimizer state"):
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir / OPTIMIZER),
                                         sharded_strategy=fully_parallel_load_strategy(ckpt_dir / OPTIMIZER))
    # no_grad: megatron-core 0.16.1 copies the dp_reshardable state into the main params
    # without it, which autograd refuses when they are views of fp32 model params.
    with _keep_adam_step_on_reshardable_load(optimizer), torch.no_grad():
        optimizer.load_state_dict(loaded)
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = _rng_file(ckpt_dir, _rank())
    if saved.get("world_size") == torch.distributed.get_world_size() and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif _rank() == 0:
        log.warning("%s was saved by %s processes, this run has %d: RNG states start fresh",
                    ckpt_dir, saved.get("world_size"), torch.distributed.get_world_size())
    fields = {f.name for f in dataclasses.fields(TrainerState)}
    return TrainerState(**{k: v for k, v in saved.items() if k in fields})
