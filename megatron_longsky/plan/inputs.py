"""What ``longsky plan`` and its dry-run start from: the simulated GPU machines, the
performance switches a run would take on them, and the planner's input.

Both :mod:`megatron_longsky.plan.cli` and :mod:`megatron_longsky.plan.dry_run` import from
here (neither imports the other's internals: the CLI calls the dry-run, never the reverse).
"""

from __future__ import annotations

import dataclasses

from megatron_longsky.config import ConfigError
from megatron_longsky.model.perf import Environment, resolve_perf
from megatron_longsky.plan.memory import PlanInput

# An H100 node of an NVIDIA PyTorch container: CUDA, Transformer Engine, apex.
SIMULATED_GPU = Environment(cuda=True, transformer_engine=True, apex_grad_accum_fusion=True)
# The same node without Transformer Engine (megatron-core's local layers, our attention).
SIMULATED_GPU_NO_TE = Environment(cuda=True, transformer_engine=False, apex_grad_accum_fusion=True)
SIMULATIONS = {"gpu-te": SIMULATED_GPU, "gpu": SIMULATED_GPU_NO_TE}
_CPU = Environment(cuda=False, transformer_engine=False, apex_grad_accum_fusion=False)


def perf_choices(cfg, attention: str):
    """The performance switches the run would take: on an H100 with TE and apex for
    ``attention='te'``, on a machine without TE otherwise."""
    env = SIMULATED_GPU if attention == "te" else _CPU
    impl = "transformer_engine" if attention == "te" else "local"
    packed = cfg.data.kind == "sft" and cfg.data.packed
    return resolve_perf(cfg.model, cfg.parallel, env, impl, cfg.optimizer.use_distributed_optimizer, packed)


def plan_input(cfg, world_size: int, vocab_size: int, attention: str) -> PlanInput:
    par = cfg.parallel
    model_parallel = par.model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(f"{world_size} GPUs are not divisible by TP*PP*CP = {model_parallel}")
    dp = world_size // model_parallel
    # The recompute the run will do (selective is dropped with TE's fused attention).
    recompute = perf_choices(cfg, attention).recompute_granularity
    return PlanInput(
        model=dataclasses.replace(cfg.model, recompute_granularity=recompute),
        vocab_size=vocab_size,
        micro_batch_size=cfg.micro_batch_size,
        num_microbatches=cfg.num_microbatches(dp),
        tensor_parallel=par.tensor_model_parallel_size,
        pipeline_parallel=par.pipeline_model_parallel_size,
        context_parallel=par.context_parallel_size,
        data_parallel=dp,
        sequence_parallel=par.sequence_parallel,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        attention=attention,
    )
