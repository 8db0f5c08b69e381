"""The training loop: ``train(cfg) -> TrainResult``, and ``evaluate`` for held-out loss.

Usable in-process (the quickstart calls ``train(cfg)``) and under torchrun / srun
(``longsky train``). Each step: zero the DDP grad buffers, run megatron-core's
forward/backward schedule (1F1B with pipeline parallelism) over this rank's
micro-batches, reduce the per-token loss over the global batch, and step the
optimizer and LR schedule, unless the loss is not finite: then the step is skipped
(parameters unchanged), counted, and the run stops after
``max_consecutive_nan_steps`` in a row.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from megatron_longsky.checkpoint.layout import resolve_checkpoint
from megatron_longsky.checkpoint.model_io import load_model_weights
from megatron_longsky.training import step as step_lib
from megatron_longsky.training.checkpointing import (
    TrainerState, load_checkpoint, prepare_checkpoint_writer, save_checkpoint,
)
from megatron_longsky.training.config import TrainConfig, train_config_to_dict
from megatron_longsky.training.data import (
    build_gpt_splits, build_sft_splits, check_dataset_tokenizers, dataset_chat_template, micro_batch_loader,
)
from megatron_longsky.plan.flops import attention_peak, step_flops, utilization
from megatron_longsky.training.metrics import MetricsLogger, peak_memory_gib, resolve_peak_tflops
from megatron_longsky.training.optimizer import build_optimizer, current_lr, ddp_config
from megatron_longsky.training.preflight import ResolvedRun, check_training_inputs, resolve_vocab_size  # noqa: F401
from megatron_longsky.training.resume_check import check_same_run
from megatron_longsky.training.signals import PreemptionHandler

if TYPE_CHECKING:  # megatron-core is imported lazily at run time
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_longsky.runtime.distributed import Runtime
    from megatron_longsky.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss."""


@dataclass
class TrainResult:
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[Optional[float]] = field(default_factory=list)
    skipped_steps: int = 0
    final_iteration: int = 0
    checkpoint_dir: Optional[Path] = None
    metrics_path: Optional[Path] = None
    # Mean over the steps of this run, excluding the first (warm-up) step when there are others.
    tokens_per_s: float = 0.0
    steps_per_s: float = 0.0
    tflops_per_device: float = 0.0
    data_wait_fraction: float = 0.0
    valid_losses: dict[int, float] = field(default_factory=dict)
    exit_reason: str = "completed"  # or "preempted"
    resumed_from: Optional[Path] = None


@dataclass
class TrainingSetup:
    """Everything built for a run (also used by the overhead benchmark). Teardown after a
    failed setup, and evaluation, hold only some of it (no optimizer, maybe no model)."""

    cfg: TrainConfig
    runtime: Runtime
    owns_process_group: bool
    model: list[DistributedDataParallel] = field(default_factory=list)  # one chunk per virtual stage
    optimizer: Optional[MegatronOptimizer] = None
    scheduler: Optional[OptimizerParamScheduler] = None
    vocab_size: int = 0
    tokenizer: Optional[Tokenizer] = None
    # The resolved job config written into every checkpoint as config.yaml.
    config_dict: dict = field(default_factory=dict)


def _device():
    from megatron_longsky.runtime.device import current_device

    return current_device()


def build_training_model(cfg: TrainConfig, vocab_size: int, initialize: bool = True) -> list:
    """This stage's GPTModel wrapped in megatron-core DDP (and Float16Module for bf16/fp16).

    ``initialize``: layout-invariant initialisation from ``cfg.seed`` (the same weights at
    any TP/PP); False when a checkpoint is loaded next."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    from megatron_longsky.model import build_model
    from megatron_longsky.model.perf import initialize_tp_comm_overlap, resolve_for_train
    from megatron_longsky.runtime.device import dtype_from_name

    perf = resolve_for_train(cfg)
    initialize_tp_comm_overlap(perf, cfg.seq_length, cfg.micro_batch_size, cfg.model.hidden_size,
                               cfg.parallel.context_parallel_size, cfg.parallel.tensor_model_parallel_size,
                               bool(cfg.model.fp8), dtype_from_name(cfg.model.resolved_dtype(on_gpu=True)))
    model = build_model(cfg.model, cfg.parallel, vocab_size, seed=cfg.seed if initialize else None,
                        initialize=initialize, perf=perf)  # on this process's device
    tcfg = model.config
    if tcfg.bf16 or tcfg.fp16:
        model = Float16Module(tcfg, model)
    return [DistributedDataParallel(tcfg, ddp_config(cfg, perf), model)]


def setup_training(cfg: TrainConfig) -> tuple[TrainingSetup, TrainerState, Optional[Path]]:
    """Initialise distributed state, model, optimizer; resume or ``init_from`` if asked."""
    from megatron_longsky.runtime.distributed import initialize

    from megatron_longsky.utils.process import forked_children_die_with_this_process

    owns_pg = not torch.distributed.is_initialized()
    # Inputs, config combinations and the layout are checked before anything is built; what
    # the checks resolved (tokenizer, vocabulary, start checkpoint) is used as is below.
    resolved = check_training_inputs(cfg, *((None, None) if owns_pg else
                                            (torch.distributed.get_world_size(), torch.distributed.get_rank())))
    forked_children_die_with_this_process()  # data workers, async checkpoint writers
    runtime = initialize(cfg.parallel, cfg.seed)
    try:
        return _setup_after_initialize(cfg, runtime, owns_pg, resolved)
    except BaseException:
        # Leave no parallel state behind: a later run in this process may use another layout.
        teardown(TrainingSetup(cfg, runtime, owns_pg), barrier=False)
        raise


def _setup_after_initialize(cfg: TrainConfig, runtime, owns_pg: bool, resolved: ResolvedRun):
    from megatron.core.distributed import finalize_model_grads

    tokenizer, vocab_size = resolved.tokenizer, resolved.vocab_size
    resume_dir, init_dir = resolved.resume_dir, resolved.init_dir
    config_dict = train_config_to_dict(cfg)
    config_dict["model"]["vocab_size"] = vocab_size
    from megatron_longsky.runtime.device import use_cuda

    config_dict["model"]["params_dtype"] = cfg.model.resolved_dtype(use_cuda())  # 'auto' as this run took it
    config_dict["tokenizer_fingerprint"] = tokenizer.fingerprint  # the resume check compares it
    # The chat template the model learns (SFT data) or learned (the checkpoint it continues):
    # chat-mode evaluation builds its prompts with it.
    chat_template = dataset_chat_template(cfg.data)
    if chat_template is None and resolved.start_dir is not None:
        chat_template = resolved.start_config.get("chat_template")
    if chat_template is not None:
        config_dict["chat_template"] = chat_template
    if resume_dir is not None:
        differences = check_same_run(resolved.start_config, config_dict, resume_dir,
                                     cfg.checkpoint.allow_mismatch)
        if differences and runtime.rank == 0:
            log.warning("resuming %s despite other settings (checkpoint.allow_mismatch):\n  %s", resume_dir,
                        "\n  ".join(differences))

    model = build_training_model(cfg, vocab_size, initialize=resume_dir is None and init_dir is None)
    optimizer, scheduler = build_optimizer(cfg, model)
    tcfg = model[0].config
    tcfg.no_sync_func = model[0].no_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss

    prepare_checkpoint_writer()
    state = TrainerState()
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, model, optimizer, scheduler, cfg.schedule.on_resume)
        log.info("resumed from %s at iteration %d (%d samples consumed)", resume_dir, state.iteration,
                 state.consumed_samples)
    elif init_dir is not None:
        load_model_weights(model, init_dir)
        optimizer.reload_model_params()
        log.info("initialised weights from %s (fresh optimizer, schedule and data)", init_dir)
    setup = TrainingSetup(cfg, runtime, owns_pg, model=model, optimizer=optimizer, scheduler=scheduler,
                          vocab_size=vocab_size, tokenizer=tokenizer, config_dict=config_dict)
    return setup, state, resume_dir


def teardown(setup: TrainingSetup, barrier: bool = True) -> None:
    """Destroy megatron-core's parallel state; also the process group if this run created it."""
    from megatron.core import parallel_state

    from megatron_longsky.model.perf import release_tp_comm_overlap
    from megatron_longsky.runtime.distributed import shutdown

    release_tp_comm_overlap()  # TE's userbuffers live on these process groups
    if setup.owns_process_group:
        shutdown()
    elif parallel_state.model_parallel_is_initialized():
        if barrier:
            torch.distributed.barrier()
        parallel_state.destroy_model_parallel()


def build_splits(cfg: TrainConfig, tokenizer):
    train_samples = cfg.train_iters * cfg.global_batch_size
    if cfg.data.kind == "sft":
        return build_sft_splits(cfg, train_samples)
    valid_samples = cfg.eval_iters * cfg.global_batch_size if cfg.eval_interval else 0
    return build_gpt_splits(cfg, tokenizer, train_samples, valid_samples)


def _data_parallel():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def run_batches(setup: TrainingSetup, iterator, num_microbatches: int, forward_only: bool):
    """One global batch through megatron-core's schedule; returns the loss reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = setup.cfg
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, device=_device()),
        data_iterator=iterator,
        model=setup.model,
        num_microbatches=num_microbatches,
        seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size,
        forward_only=forward_only,
    )


def _forward_step(data_iterator, model, device):
    return step_lib.forward_step(data_iterator, model, device)


def evaluate_loss(setup: TrainingSetup, dataset, num_batches: int) -> float:
    """Mean per-token loss over the first ``num_batches`` global batches of ``dataset``."""
    cfg = setup.cfg
    dp_rank, dp_size = _data_parallel()
    num_batches = min(num_batches, len(dataset) // cfg.global_batch_size)
    if num_batches < 1:
        raise ValueError(f"evaluation data holds {len(dataset)} samples, less than one global batch "
                         f"({cfg.global_batch_size})")
    iterator = micro_batch_loader(dataset, cfg, 0, dp_rank, dp_size,
                                  total_samples=num_batches * cfg.global_batch_size)
    for chunk in setup.model:
        chunk.eval()
    reports = []
    with torch.no_grad():
        for _ in range(num_batches):
            reports += run_batches(setup, iterator, cfg.num_microbatches(dp_size), forward_only=True)
    for chunk in setup.model:
        chunk.train()
    loss, _ = step_lib.reduce_loss(reports)
    return loss


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) as configured; collective over all launched processes."""
    setup, state, resume_dir = setup_training(cfg)
    try:
        result = _train_loop(setup, state, resume_dir)
    except BaseException:
        teardown(setup, barrier=False)  # other ranks may not reach a barrier
        raise
    teardown(setup)
    return result


def _save(setup: TrainingSetup, state: TrainerState, async_queue=None, background: bool = True) -> Path:
    """Save now; in the background through ``async_queue`` when given and ``background``.
    A synchronous save first waits for background saves still in flight."""
    if async_queue is not None and not background:
        async_queue.maybe_finalize_async_calls(blocking=True)
        async_queue = None
    for chunk in setup.model:  # overlapped param all-gather: finish it, the weights saved must be current
        if chunk.ddp_config.overlap_param_gather:
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()
    return save_checkpoint(setup.cfg.checkpoint_root, state, setup.model, setup.optimizer, setup.scheduler,
                           setup.config_dict, keep_last=setup.cfg.checkpoint.keep_last, async_queue=async_queue,
                           optimizer_format=setup.cfg.checkpoint.optimizer_format)


def _async_queue(cfg: TrainConfig):
    """megatron-core's queue of background checkpoint writes, when asked for and on GPU."""
    if not cfg.checkpoint.async_save:
        return None
    from megatron_longsky.runtime.device import use_cuda

    if not use_cuda():
        log.warning("checkpoint.async_save is for GPU runs; saving synchronously on CPU")
        return None
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    log.info("asynchronous checkpoint saving enabled")
    return AsyncCallsQueue()


def _train_loop(setup: TrainingSetup, state: TrainerState, resume_dir: Optional[Path]) -> TrainResult:
    cfg = setup.cfg
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    dp_rank, dp_size = _data_parallel()
    num_microbatches = cfg.num_microbatches(dp_size)
    splits = build_splits(cfg, setup.tokenizer)
    iterator = step_lib.TimedIterator(
        micro_batch_loader(splits.train, cfg, state.consumed_samples, dp_rank, dp_size,
                           total_samples=cfg.train_iters * cfg.global_batch_size))
    metrics = MetricsLogger(cfg.output_dir, cfg.logging.log_interval, cfg.logging.tensorboard,
                            enabled=rank == 0, resume_iteration=state.iteration)
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    flops = step_flops(cfg.model, setup.vocab_size, cfg.global_batch_size,
                       pipeline_parallel=cfg.parallel.pipeline_model_parallel_size)
    peak, peak_source = resolve_peak_tflops(cfg.logging.peak_tflops_per_device, cfg.model)
    peaks = (peak, attention_peak(cfg.model, peak) if peak else None)  # MFU: each FLOP at its own peak
    if rank == 0:
        log.info("MFU/HFU: %s", peak_source)
    result = TrainResult(metrics_path=metrics.path, resumed_from=resume_dir)
    step_times, waits = [], []
    last_saved = None
    start_iteration = state.iteration
    async_queue = _async_queue(cfg)
    try:
        with PreemptionHandler() as preemption:
            while state.iteration < cfg.train_iters:
                start = time.perf_counter()
                wait_before = iterator.wait_seconds
                for chunk in setup.model:
                    chunk.zero_grad_buffer()
                setup.optimizer.zero_grad()
                reports = run_batches(setup, iterator, num_microbatches, forward_only=False)
                loss, loss_tokens = step_lib.reduce_loss(reports)
                state.iteration += 1
                state.consumed_samples += cfg.global_batch_size
                grad_norm = None
                lr = current_lr(setup.optimizer)  # the rate this step uses
                skipped = not math.isfinite(loss)
                if skipped:
                    state.skipped_steps += 1
                    state.consecutive_nan_steps += 1
                    log.warning("iteration %d: non-finite loss %s; step skipped (%d in a row, %d in total)",
                                state.iteration, loss, state.consecutive_nan_steps, state.skipped_steps)
                    if state.consecutive_nan_steps >= cfg.max_consecutive_nan_steps:
                        raise NonFiniteLossError(
                            f"stopping: {state.consecutive_nan_steps} consecutive non-finite losses (iterations "
                            f"{state.iteration - state.consecutive_nan_steps + 1}-{state.iteration}, "
                            f"max_consecutive_nan_steps={cfg.max_consecutive_nan_steps}); parameters are those "
                            "of the last finite step. Check the data around these samples, lower the learning "
                            "rate or raise the limit; resume from the last checkpoint."
                        )
                else:
                    ok, grad_norm, _ = setup.optimizer.step()
                    if ok:
                        setup.scheduler.step(increment=1)
                        state.consecutive_nan_steps = 0
                    else:  # fp16 loss-scale overflow: megatron-core skipped the update
                        skipped = True
                        state.skipped_steps += 1
                    grad_norm = float(grad_norm) if grad_norm is not None else None
                elapsed = time.perf_counter() - start
                wait = iterator.wait_seconds - wait_before
                step_times.append(elapsed)
                waits.append(wait)
                record = {
                    "iteration": state.iteration, "loss": loss, "loss_tokens": loss_tokens,
                    "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
                    "step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed,
                    **utilization(flops, elapsed, world, *peaks),
                    "peak_memory_gib": peak_memory_gib(), "data_wait_s": wait,
                    "data_wait_fraction": wait / elapsed if elapsed > 0 else 0.0,
                    "consumed_samples": state.consumed_samples,
                }
                metrics.log(record)
                result.iterations.append(state.iteration)
                result.losses.append(loss)
                result.grad_norms.append(grad_norm)
                if cfg.eval_interval and state.iteration % cfg.eval_interval == 0 and splits.valid is not None:
                    result.valid_losses[state.iteration] = evaluate_loss(setup, splits.valid, cfg.eval_iters)
                    metrics.log_eval(state.iteration, result.valid_losses[state.iteration])
                if async_queue is not None:  # publish background saves that have finished
                    async_queue.maybe_finalize_async_calls(blocking=False)
                stop = preemption.should_stop()
                interval = cfg.checkpoint.save_interval
                if stop or (interval and state.iteration % interval == 0):
                    # A preemption save is synchronous: the process exits right after it.
                    last_saved = _save(setup, state, async_queue, background=not stop)
                if stop:
                    result.exit_reason = "preempted"
                    log.warning("preempted: checkpoint %s saved at iteration %d; exiting", last_saved,
                                state.iteration)
                    break
            if result.exit_reason == "completed" and cfg.checkpoint.save_at_end:
                if last_saved is None and state.iteration == start_iteration and resume_dir is not None:
                    last_saved = resume_dir  # resumed an already finished run: nothing new to save
                elif last_saved is None or not last_saved.name.endswith(f"{state.iteration:07d}"):
                    last_saved = _save(setup, state, async_queue, background=False)
    finally:
        if async_queue is not None:  # wait for (and publish) saves still being written
            async_queue.maybe_finalize_async_calls(blocking=True)
            async_queue.close()
        metrics.close()
    timed = step_times[1:] if len(step_times) > 1 else step_times
    timed_waits = waits[1:] if len(waits) > 1 else waits
    if timed:
        mean = sum(timed) / len(timed)
        result.steps_per_s = 1.0 / mean
        result.tokens_per_s = tokens_per_step / mean
        result.tflops_per_device = utilization(flops, mean, world, *peaks)["tflops_per_device"]
        result.data_wait_fraction = sum(timed_waits) / sum(timed)
    result.skipped_steps = state.skipped_steps
    result.final_iteration = state.iteration
    result.checkpoint_dir = last_saved
    return result


def evaluate(cfg: TrainConfig, checkpoint: str | Path, prefixes: list[str], num_batches: int | None = None) -> float:
    """Held-out mean per-token loss of ``checkpoint``'s weights on ``prefixes`` (forward only).

    Uses ``cfg``'s model, layout, sequence length and batch sizes; every sample of the
    datasets counts (split 100,0,0), up to ``num_batches`` global batches (default
    ``cfg.eval_iters``). Collective, like :func:`train`.
    """
    import dataclasses

    from megatron_longsky.runtime.distributed import initialize
    from megatron_longsky.tokenizer import build_tokenizer

    owns_pg = not torch.distributed.is_initialized()
    runtime = initialize(cfg.parallel, cfg.seed)
    setup = TrainingSetup(cfg, runtime, owns_pg)
    try:
        ckpt_dir = resolve_checkpoint(checkpoint)
        tokenizer = build_tokenizer(cfg.tokenizer)
        eval_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prefixes=list(prefixes), weights=None))
        check_dataset_tokenizers(eval_cfg.data, tokenizer)
        vocab_size = resolve_vocab_size(cfg, tokenizer, ckpt_dir)
        model = build_training_model(cfg, vocab_size, initialize=False)
        setup = TrainingSetup(cfg, runtime, owns_pg, model=model, vocab_size=vocab_size, tokenizer=tokenizer)
        load_model_weights(model, ckpt_dir)
        num_batches = num_batches or cfg.eval_iters
        if cfg.data.kind == "sft":
            dataset = build_sft_splits(eval_cfg, num_batches * cfg.global_batch_size).train
        else:
            dataset = build_gpt_splits(eval_cfg, tokenizer, num_batches * cfg.global_batch_size, 0,
                                       prefixes=list(prefixes), split="100,0,0").train
        loss = evaluate_loss(setup, dataset, num_batches)
    except BaseException:
        teardown(setup, barrier=False)
        raise
    teardown(setup)
    return loss
