"""GPU performance switches: resolved from a (simulated) machine and the config, accepted by
megatron-core, logged once, and reflected in the planner."""

from __future__ import annotations

import logging

import pytest

from megatron_longsky.config import ConfigError
from megatron_longsky.model.config import model_config_from_dict
from megatron_longsky.model.perf import OVERLAP_BUCKET_SIZE, Environment, log_choices, resolve_perf
from megatron_longsky.runtime.distributed import ParallelConfig

CPU = Environment(cuda=False, transformer_engine=False, apex_grad_accum_fusion=False)
H100 = Environment(cuda=True, transformer_engine=True, apex_grad_accum_fusion=True)
H100_NO_APEX = Environment(cuda=True, transformer_engine=True, apex_grad_accum_fusion=False)
GPU_NO_TE = Environment(cuda=True, transformer_engine=False, apex_grad_accum_fusion=True)


def _model(**kw):
    return model_config_from_dict({"preset": "tiny", **kw})


def _impl(env):
    return "transformer_engine" if env.transformer_engine else "local"


def test_cpu_keeps_every_gpu_switch_off():
    c = resolve_perf(_model(recompute_granularity="selective"), ParallelConfig(), CPU, "local",
                     use_distributed_optimizer=True)
    assert c.use_cpu_initialization
    assert not (c.gradient_accumulation_fusion or c.overlap_grad_reduce or c.overlap_param_gather
                or c.apply_rope_fusion or c.tp_comm_overlap)
    assert c.bucket_size is None
    # our attention materialises scores: selective recompute keeps recomputing core attention
    assert (c.recompute_granularity, c.recompute_modules) == ("selective", ("core_attn",))


def test_h100_with_te_and_apex_turns_them_on():
    c = resolve_perf(_model(recompute_granularity="selective"), ParallelConfig(), H100, "transformer_engine",
                     use_distributed_optimizer=True)
    assert not c.use_cpu_initialization
    assert c.gradient_accumulation_fusion and c.apply_rope_fusion
    assert c.overlap_grad_reduce and c.overlap_param_gather and c.bucket_size == OVERLAP_BUCKET_SIZE
    # TE's fused attention keeps no scores: selective recompute would only re-run it
    assert c.recompute_granularity is None and "fused attention" in c.reasons["recompute_granularity"]
    assert not c.tp_comm_overlap  # an option, off by default


def test_full_recompute_is_kept():
    c = resolve_perf(_model(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                     ParallelConfig(), H100, "transformer_engine")
    assert c.recompute_granularity == "full"


def test_gradient_accumulation_fusion_needs_apex_even_with_te():
    # megatron-core's output layer (ColumnParallelLinear) raises without fused_weight_gradient_mlp_cuda
    c = resolve_perf(_model(), ParallelConfig(), H100_NO_APEX, "transformer_engine")
    assert not c.gradient_accumulation_fusion and "apex" in c.reasons["gradient_accumulation_fusion"]
    assert resolve_perf(_model(), ParallelConfig(), GPU_NO_TE, "local").gradient_accumulation_fusion


def test_overlap_needs_the_distributed_optimizer():
    c = resolve_perf(_model(), ParallelConfig(), H100, "transformer_engine", use_distributed_optimizer=False)
    assert not c.overlap_grad_reduce and not c.overlap_param_gather and c.bucket_size is None


@pytest.mark.parametrize("packed, fused", [(True, False), (False, True)])
def test_rope_fusion_is_off_for_yarn_with_packed_rows(packed, fused):
    yarn = _model(rope={"scaling": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    assert resolve_perf(yarn, ParallelConfig(), H100, "transformer_engine", packed_rows=packed).apply_rope_fusion \
        is fused
    # any other RoPE is exact fused, packed or not
    assert resolve_perf(_model(), ParallelConfig(), H100, "transformer_engine", packed_rows=True).apply_rope_fusion
    # and there is no fused RoPE without TE
    assert not resolve_perf(_model(), ParallelConfig(), GPU_NO_TE, "local").apply_rope_fusion


def test_tp_comm_overlap_is_an_option_with_its_requirements():
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, tp_comm_overlap=True)
    assert resolve_perf(_model(), sp, H100, "transformer_engine").tp_comm_overlap
    with pytest.raises(ConfigError, match="sequence_parallel"):
        resolve_perf(_model(), ParallelConfig(tensor_model_parallel_size=2, tp_comm_overlap=True), H100,
                     "transformer_engine")
    with pytest.raises(ConfigError, match="a GPU, Transformer Engine"):
        resolve_perf(_model(), sp, CPU, "local")


def test_choices_are_logged_once(caplog):
    c = resolve_perf(_model(num_layers=3), ParallelConfig(), H100, "transformer_engine")
    with caplog.at_level(logging.INFO, logger="megatron_longsky.model.perf"):
        log_choices(c)
        log_choices(c)
    lines = [r.getMessage() for r in caplog.records if "performance switches" in r.getMessage()]
    assert len(lines) == 1 and "overlap_grad_reduce=False" in lines[0] and "apply_rope_fusion=True" in lines[0]


@pytest.mark.parametrize("env", [CPU, H100, H100_NO_APEX, GPU_NO_TE], ids=["cpu", "h100", "no_apex", "no_te"])
@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_megatron_core_accepts_the_resulting_configs(env, recompute):
    from megatron_longsky.model.build import transformer_config
    from megatron_longsky.plan.dry_run import simulated_transformer_engine
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.optimizer import ddp_config, optimizer_config

    model = {"preset": "tiny", "recompute_granularity": recompute, "params_dtype": "bfloat16"}
    if recompute == "full":
        model.update(recompute_method="uniform", recompute_num_layers=1)
    cfg = train_config_from_dict({"model": model, "optimizer": {"use_distributed_optimizer": True},
                                  "parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True}})
    perf = resolve_perf(cfg.model, cfg.parallel, env, _impl(env), True)
    with simulated_transformer_engine():
        tcfg = transformer_config(cfg.model, cfg.parallel, perf=perf, impl=_impl(env), on_gpu=env.cuda)
    ddp = ddp_config(cfg, perf)
    opt = optimizer_config(cfg)
    assert tcfg.use_cpu_initialization is not env.cuda
    assert tcfg.gradient_accumulation_fusion is perf.gradient_accumulation_fusion
    assert tcfg.apply_rope_fusion is perf.apply_rope_fusion
    assert tcfg.recompute_granularity == perf.recompute_granularity
    assert ddp.overlap_grad_reduce is ddp.overlap_param_gather is env.cuda
    assert opt.use_distributed_optimizer and opt.bf16 == tcfg.bf16


def test_planner_reflects_the_recompute_the_run_will_do():
    from megatron_longsky.plan.cli import plan_input
    from megatron_longsky.plan.memory import estimate_memory
    from megatron_longsky.training.config import train_config_from_dict

    cfg = train_config_from_dict({"model": {"preset": "tiny", "recompute_granularity": "selective"},
                                  "global_batch_size": 8})
    te = estimate_memory(plan_input(cfg, 8, 256, "te"))
    ours = estimate_memory(plan_input(cfg, 8, 256, "longsky"))
    assert plan_input(cfg, 8, 256, "te").model.recompute_granularity is None
    assert te.activations_per_layer == te.activations_per_layer_no_recompute
    assert ours.activations_per_layer < ours.activations_per_layer_no_recompute


def test_gpu_path_initialises_on_the_device_without_the_host_draw():
    """On GPU the seeded model is initialised by megatron-core where the parameters live
    (here the CPU layer stands in for the device); the host draw of full weights is the CPU path."""
    import torch

    from megatron_longsky.model import build_model
    from megatron_longsky.runtime.distributed import initialize, shutdown

    initialize(ParallelConfig(), seed=5)
    try:
        cfg = _model()
        gpu_without_extras = Environment(cuda=True, transformer_engine=False, apex_grad_accum_fusion=False)
        device_perf = resolve_perf(cfg, ParallelConfig(), gpu_without_extras, "local")
        on_device = build_model(cfg, ParallelConfig(), 128, pre_process=True, post_process=True, seed=5,
                                perf=device_perf)
        on_host = build_model(cfg, ParallelConfig(), 128, pre_process=True, post_process=True, seed=5)
        assert not on_device.config.use_cpu_initialization and on_host.config.use_cpu_initialization
        assert on_device.config.perform_initialization and not on_host.config.perform_initialization
        w_device = on_device.decoder.layers[0].mlp.linear_fc1.weight
        w_host = on_host.decoder.layers[0].mlp.linear_fc1.weight
        assert torch.isfinite(w_device).all() and w_device.std() > 0
        assert not torch.equal(w_device, w_host)  # megatron-core's draw, not the layout-invariant one
    finally:
        shutdown()
