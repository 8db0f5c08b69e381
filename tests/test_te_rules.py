"""Transformer Engine's attention-backend and FP8-recipe rules (attention/te_rules.py): one
test per rule, and the places that consult the table (config validation, the run-time check
before the model is built, ``longsky doctor``, ``longsky plan --dry-run``), for the
second-reading defects (issue 21: 3 tensorwise + FP8 attention on H100, 4 float32 with CP,
5 mxfp8 on H100, 6 userbuffers twice, 7 the FP8 shard rule with sequence parallelism)."""

from __future__ import annotations

import sys
import types

import pytest

from megatron_longsky.attention import te_rules
from megatron_longsky.attention.te_rules import FLASH, FUSED, UNFUSED, AttentionCase

H100, B200, A100, ADA, SM120 = (9, 0), (10, 0), (8, 0), (8, 9), (12, 0)
BASE = dict(dtype="bfloat16", head_dim=128)
FP8_DPA = dict(fp8=True, fp8_recipe="delayed", fp8_attention="dot_product")


def _train_config(**overrides):
    from megatron_longsky.training.config import load_train_config

    return load_train_config(None, ["model.preset=tiny"] + [f"{k}={v}" for k, v in overrides.items()])


# --------------------------------------------------------------------------- one test per rule
# rule name -> (a case it applies to, a case it does not, the backends it switches off)
RULE_CASES = {
    "dtype": (dict(dtype="float32"), dict(dtype="float16"), {FLASH, FUSED}),
    "unfused-context-parallel": (dict(context_parallel=2), dict(context_parallel=1), {UNFUSED}),
    "unfused-thd": (dict(packed=True, te_version=(2, 10)), dict(packed=True, te_version=(2, 11)), {UNFUSED}),
    "fp8-dpa-flash-unfused": (FP8_DPA, dict(FP8_DPA, training=False), {FLASH, UNFUSED}),
    "fp8-current-scaling-dpa": (dict(FP8_DPA, fp8_recipe="tensorwise", capability=H100),
                                dict(FP8_DPA, fp8_recipe="tensorwise", capability=B200), {FUSED}),
    "fp8-sm120": (dict(FP8_DPA, capability=SM120), dict(FP8_DPA, capability=B200), {FLASH, FUSED}),
    "fp8-dpa-sm90": (dict(FP8_DPA, capability=ADA), dict(FP8_DPA, capability=H100), {FUSED}),
    "fp8-dpa-head-dim": (dict(FP8_DPA, capability=H100, head_dim=64), dict(FP8_DPA, capability=H100), {FUSED}),
    "fp8-dpa-thd": (dict(FP8_DPA, packed=True), dict(FP8_DPA), {FUSED}),
    "head-dim-multiple-of-8": (dict(head_dim=100), dict(head_dim=96), {FLASH, FUSED}),
    "head-dim-max": (dict(head_dim=512), dict(head_dim=256), {FLASH, FUSED}),
    "fused-head-dim-hopper": (dict(head_dim=256, capability=A100), dict(head_dim=256, capability=H100), {FUSED}),
    "capability-sm80": (dict(capability=(7, 5)), dict(capability=A100), {FLASH, FUSED}),
}


def test_every_rule_has_a_test_and_cites_transformer_engine():
    assert set(RULE_CASES) == {r.name for r in te_rules.RULES}
    for rule in te_rules.RULES:
        assert rule.source.startswith("transformer_engine/") and rule.setting and rule.off


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_rule(name):
    on, off, backends = RULE_CASES[name]
    rule = next(r for r in te_rules.RULES if r.name == name)
    assert rule.applies(AttentionCase(**{**BASE, **on})) and set(rule.off) == backends
    assert not rule.applies(AttentionCase(**{**BASE, **off}))
    assert all(rule not in rules for rules in te_rules.backends(AttentionCase(**{**BASE, **off})).values())


@pytest.mark.parametrize("recipe, refused, accepted", [
    ("delayed", ADA[:1] + (0,), H100), ("tensorwise", A100, ADA), ("mxfp8", H100, B200), ("mxfp8", SM120, B200),
    ("blockwise", ADA, H100),
])
def test_fp8_recipe_rules(recipe, refused, accepted):
    assert te_rules.recipe_problem(recipe, refused) is not None
    assert te_rules.recipe_problem(recipe, accepted) is None
    assert te_rules.recipe_problem(recipe, None) is None  # unknown device: decided at run time
    assert all(r.source.startswith("transformer_engine/pytorch/quantization.py") for r in te_rules.RECIPE_RULES)


def test_a_normal_bf16_run_keeps_every_backend():
    assert te_rules.available_backends(AttentionCase(**BASE, context_parallel=1, capability=H100)) == [
        FLASH, FUSED, UNFUSED]
    # CP with bf16: Flash and Fused; packed rows at CP on TE 2.9 too
    assert te_rules.available_backends(AttentionCase(**BASE, context_parallel=4, packed=True)) == [FLASH, FUSED]


# ------------------------------------------------------- defect 3: tensorwise + FP8 attention

def test_tensorwise_fp8_attention_is_refused_below_sm100_and_allowed_with_delayed_scaling_for_attention():
    from megatron_longsky.model.config import ModelConfig

    model = ModelConfig(hidden_size=256, num_attention_heads=2, fp8="hybrid", fp8_recipe="tensorwise",
                        fp8_attention="dot_product")
    with pytest.raises(te_rules.AttentionBackendError, match="model.fp8_recipe.*no attention backend.*sm90"):
        te_rules.check_model(model, capability=H100, environ={})
    te_rules.check_model(model, capability=B200, environ={})
    # TE then builds a DelayedScaling recipe for the attention (dot_product_attention.py init_fp8_metadata)
    te_rules.check_model(model, capability=H100, environ={"NVTE_DPA_FP8_RECIPE": "DelayedScaling"})
    te_rules.check_model(ModelConfig(hidden_size=256, num_attention_heads=2, fp8="hybrid",
                                     fp8_attention="dot_product"), capability=H100, environ={})


def test_doctor_does_not_report_fp8_attention_for_tensorwise_on_h100(monkeypatch):
    from megatron_longsky.runtime.doctor import Environment, diagnose

    monkeypatch.delenv("NVTE_DPA_FP8_RECIPE", raising=False)
    env = Environment(python="3.12", torch="2.10.0a0", cuda="13.1", cudnn=91000, nccl="2.28",
                      gpus=[("NVIDIA H100 80GB HBM3", H100)] * 8, transformer_engine="2.10.0",
                      transformer_engine_error=None, apex="nvidia", megatron_core="0.16.1", longsky="0.1.0",
                      einops="0.8.1", device_setting="auto")
    cfg = _train_config(**{"model.hidden_size": 256, "model.num_attention_heads": 2, "model.num_query_groups": 2,
                           "model.fp8": "hybrid", "model.fp8_recipe": "tensorwise",
                           "model.fp8_attention": "dot_product"})
    report = diagnose(env, cfg)
    assert dict(report.paths)["FP8 attention (model.fp8_attention)"].startswith("unavailable for fp8_recipe=tensorwise")
    assert len(report.problems) == 1 and "no attention backend" in report.problems[0]
    delayed = _train_config(**{"model.hidden_size": 256, "model.num_attention_heads": 2, "model.num_query_groups": 2,
                               "model.fp8": "hybrid", "model.fp8_attention": "dot_product"})
    report = diagnose(env, delayed)
    assert report.problems == [] and dict(report.paths)["FP8 attention (model.fp8_attention)"].startswith("available")
    # mxfp8 on H100 (defect 5), by the doctor too
    mx = _train_config(**{"model.fp8": "hybrid", "model.fp8_recipe": "mxfp8"})
    assert any("fp8_recipe=mxfp8 on sm90" in p for p in diagnose(env, mx).problems)


# ------------------------------------------------------------ defect 4: float32 with TE and CP

def test_gpu_default_dtype_is_bf16_and_float32_with_te_and_cp_is_refused_at_config_time():
    from megatron_longsky.model.build import transformer_config
    from megatron_longsky.model.config import ModelConfig
    from megatron_longsky.model.perf import Environment, resolve_perf
    from megatron_longsky.runtime.distributed import ParallelConfig

    assert ModelConfig().params_dtype == "auto"
    assert ModelConfig().resolved_dtype(on_gpu=True) == "bfloat16"
    assert ModelConfig().resolved_dtype(on_gpu=False) == "float32"
    assert ModelConfig(params_dtype="float32").resolved_dtype(on_gpu=True) == "float32"
    gpu = Environment(cuda=True, transformer_engine=False, apex_grad_accum_fusion=False)
    tcfg = transformer_config(ModelConfig(), ParallelConfig(), perf=resolve_perf(ModelConfig(), ParallelConfig(), gpu,
                                                                                "local"), impl="local", on_gpu=True)
    assert tcfg.bf16 and str(tcfg.params_dtype) == "torch.bfloat16"
    # explicit TE + float32 + CP: refused when the config loads
    with pytest.raises(ValueError, match="model.params_dtype, parallel.context_parallel_size.*no attention backend"):
        _train_config(**{"model.transformer_impl": "transformer_engine", "model.params_dtype": "float32",
                         "parallel.context_parallel_size": 2})
    # packed rows on TE < 2.11 (any TE 2.9-2.11 may run it)
    with pytest.raises(ValueError, match="data.packed"):
        _train_config(**{"model.transformer_impl": "transformer_engine", "model.params_dtype": "float32",
                         "data.kind": "sft", "data.prefixes": "[x]", "data.packed": "true"})
    # auto spec: fine for CPU (our attention takes float32 at any CP)
    assert _train_config(**{"model.params_dtype": "float32", "parallel.context_parallel_size": 2})
    _train_config(**{"model.transformer_impl": "transformer_engine", "parallel.context_parallel_size": 2})


def test_run_time_check_on_a_te_machine_refuses_float32_with_cp_before_building():
    from megatron_longsky.model.perf import Environment, resolve_for_train

    te_h100 = Environment(cuda=True, transformer_engine=True, apex_grad_accum_fusion=True, capability=H100,
                          te_version=(2, 10))
    cfg = _train_config(**{"model.params_dtype": "float32", "parallel.context_parallel_size": 2})
    with pytest.raises(te_rules.AttentionBackendError, match="float32"):
        resolve_for_train(cfg, te_h100, "transformer_engine")
    resolve_for_train(cfg, te_h100, "local")  # our attention on a GPU without TE: fine
    resolve_for_train(_train_config(**{"parallel.context_parallel_size": 2}), te_h100, "transformer_engine")


def test_evaluation_defaults_to_bf16_on_a_gpu_unless_asked():
    from megatron_longsky.eval.megatron_backend import evaluation_model_config

    imported = {"model": {"preset": "tiny", "params_dtype": "float32"}}
    assert evaluation_model_config(imported, "c", on_gpu=True).params_dtype == "bfloat16"
    assert evaluation_model_config(imported, "c", on_gpu=True, dtype="float32").params_dtype == "float32"
    assert evaluation_model_config(imported, "c", on_gpu=False).params_dtype == "float32"
    assert evaluation_model_config({"model": {"preset": "tiny"}}, "c", on_gpu=False).params_dtype == "float32"


# --------------------------------------------------------------------- defect 5: mxfp8 per device

def test_mxfp8_is_refused_on_h100_at_run_time_and_by_the_dry_run_device():
    from megatron_longsky.model.perf import Environment, resolve_for_train
    from megatron_longsky.plan.dry_run import DryRunError, dry_run_train_stage, simulated_environment

    cfg = _train_config(**{"model.fp8": "hybrid", "model.fp8_recipe": "mxfp8", "model.vocab_size": 256})
    h100 = Environment(cuda=True, transformer_engine=True, apex_grad_accum_fusion=True, capability=H100)
    with pytest.raises(te_rules.AttentionBackendError, match="mxfp8 on sm90"):
        resolve_for_train(cfg, h100, "transformer_engine")
    with pytest.raises(DryRunError, match="fp8_recipe=mxfp8 on sm90"):
        dry_run_train_stage("x", cfg, 8, 256, build_meta=False, env=simulated_environment("gpu-te", "h100"))
    result = dry_run_train_stage("x", cfg, 8, 256, build_meta=False, env=simulated_environment("gpu-te", "b200"))
    assert result.facts["fp8"] == "hybrid"


# ------------------------------------------------------------ defect 6: userbuffers once a process

@pytest.fixture
def fake_te(monkeypatch):
    """transformer_engine.pytorch.module.base with TE's userbuffer bookkeeping (module/base.py:
    initialize_ub asserts 'UB communicators are already initialized'; destroy_ub clears it)."""
    calls = []
    base = types.SimpleNamespace(_ub_communicators=None)

    def initialize_ub(shape, tp_size, use_fp8=False, dtype=None, **_):
        assert base._ub_communicators is None, "UB communicators are already initialized."
        base._ub_communicators = {}
        calls.append(("init", tuple(shape)))

    def destroy_ub():
        base._ub_communicators = None
        calls.append(("destroy",))

    base.initialize_ub, base.destroy_ub = initialize_ub, destroy_ub
    module = types.SimpleNamespace(base=base)
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.module = module
    te = types.ModuleType("transformer_engine")
    te.pytorch = pytorch
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", pytorch)
    import megatron_longsky.model.perf as perf

    monkeypatch.setattr(perf, "_UB_KEY", None)
    return calls


def test_userbuffers_are_initialised_once_per_process_and_destroyed_at_teardown(fake_te, monkeypatch):
    import torch

    from megatron_longsky.model.perf import PerfChoices, initialize_tp_comm_overlap
    from megatron_longsky.training import loop

    choices = PerfChoices(False, False, False, False, False, None, tp_comm_overlap=True)
    args = (choices, 1024, 1, 64, 1, 2, False, torch.bfloat16)
    initialize_tp_comm_overlap(*args)
    initialize_tp_comm_overlap(*args)  # train, then evaluate in the same process: TE would assert here
    assert fake_te == [("init", (1024, 64))]
    initialize_tp_comm_overlap(choices, 2048, 1, 64, 1, 2, False, torch.bfloat16)  # other buffers: replaced
    assert fake_te[1:] == [("destroy",), ("init", (2048, 64))]
    # the trainer's teardown destroys them with the process groups they were made on
    loop.teardown(loop.TrainingSetup(None, None, False))
    assert fake_te[-1] == ("destroy",)
    initialize_tp_comm_overlap(*args)
    assert fake_te[-1] == ("init", (1024, 64))


# ------------------------------------------------- defect 7: the FP8 shard rule with sequence parallelism

def test_fp8_shard_rule_counts_sequence_parallel_ranks():
    overrides = {"model.fp8": "hybrid", "model.seq_length": 48, "parallel.tensor_model_parallel_size": 4,
                 "parallel.sequence_parallel": "true"}
    # 48 tokens / TP 4 = 12 rows per rank: TE's assert_dim_for_fp8_exec needs a multiple of 8
    with pytest.raises(ValueError, match="12 rows per rank; FP8 needs them divisible by 8"):
        _train_config(**overrides)
    _train_config(**{**overrides, "micro_batch_size": 2, "global_batch_size": 8})  # 24 rows
    _train_config(**{**overrides, "parallel.sequence_parallel": "false"})  # each rank holds all 48 rows
