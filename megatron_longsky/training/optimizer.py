"""megatron-core optimizer (Adam/SGD, optionally distributed), its DDP config and its LR/WD
scheduler."""

from __future__ import annotations

from megatron_longsky.training.config import TrainConfig


def optimizer_config(cfg: TrainConfig, on_gpu: bool | None = None):
    """``on_gpu``: resolve ``model.params_dtype: auto`` as on a GPU (default: this machine)."""
    from megatron.core.optimizer import OptimizerConfig

    from megatron_longsky.runtime.device import dtype_from_name, use_cuda

    o = cfg.optimizer
    dtype = cfg.model.resolved_dtype(on_gpu=use_cuda() if on_gpu is None else on_gpu)
    return OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        params_dtype=dtype_from_name(dtype, "model.params_dtype"),
        use_distributed_optimizer=o.use_distributed_optimizer,
        # fp16 needs loss scaling; bf16 and fp32 do not.
        initial_loss_scale=2.0**16 if dtype == "float16" else None,
        decoupled_weight_decay=True,
    )


def ddp_config(cfg: TrainConfig, perf):
    """megatron-core's DistributedDataParallelConfig for ``cfg`` with the performance
    switches ``perf`` (:func:`megatron_longsky.model.perf.resolve_perf`)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        # Per-token loss: gradients are summed over ranks, then divided by the token count.
        average_in_collective=False,
        **perf.ddp_config_kwargs(),  # overlap_grad_reduce / overlap_param_gather (GPU), bucket size
    )


def build_optimizer(cfg: TrainConfig, model_chunks: list):
    """(MegatronOptimizer, OptimizerParamScheduler) for the DDP-wrapped model chunks.

    Weight decay is skipped for 1-D parameters (norm weights) and biases, megatron-core's
    standard rule. The scheduler counts optimizer steps (iterations).
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_longsky.runtime.distributed import has_gloo_groups

    optimizer = get_megatron_optimizer(optimizer_config(cfg), model_chunks, use_gloo_process_groups=has_gloo_groups())
    s = cfg.schedule
    decay_iters = s.decay_iters or cfg.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=s.init_lr,
        max_lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        lr_warmup_steps=s.warmup_iters,
        # megatron-core needs warmup < decay steps; a run shorter than its warmup never decays.
        lr_decay_steps=max(decay_iters, s.warmup_iters + 1),
        lr_decay_style=s.decay_style,
        start_wd=cfg.optimizer.weight_decay,
        end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant",
        # A resumed run takes its schedule from the checkpoint.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def current_lr(optimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])
