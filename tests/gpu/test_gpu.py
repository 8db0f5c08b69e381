"""The GPU path on one CUDA device: training (local spec + our attention; TE spec + FP8),
a CPU-written checkpoint in the TE spec, evaluation and generation, conversion.

Skipped without CUDA; the TE tests skip without Transformer Engine. ``tests/gpu/run.sh``.
"""

import math

import pytest
from gpu_runner import run_scenario

pytestmark = pytest.mark.gpu
HEAD_DIM_128 = {"num_attention_heads": 2, "num_query_groups": 2}  # hidden 256 / 2 heads


def _learns(losses):
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert min(losses[1:]) < losses[0], losses


def test_local_spec_with_our_attention_trains_on_gpu(tmp_path):
    out = run_scenario("train_steps", tmp_path, {"name": "local", "model": {
        "transformer_impl": "local", "params_dtype": "bfloat16"}})
    _learns(out["losses"])


def test_te_spec_with_fp8_trains(tmp_path):
    out = run_scenario("train_steps", tmp_path, {"name": "te_fp8", "model": {
        "transformer_impl": "transformer_engine", "params_dtype": "bfloat16", "fp8": "hybrid",
        "fp8_recipe": "delayed"}})
    _learns(out["losses"])


def test_te_spec_with_fp8_dot_product_attention_trains(tmp_path):
    # head dimension 128: cuDNN's FP8 fused attention trains no other below sm100 (fused_attn.cpp;
    # attention/te_rules.py rule fp8-dpa-head-dim)
    out = run_scenario("train_steps", tmp_path, {"name": "te_fp8_dpa", "model": {
        "transformer_impl": "transformer_engine", "params_dtype": "bfloat16", "fp8": "hybrid",
        "fp8_recipe": "delayed", "fp8_attention": "dot_product", **HEAD_DIM_128}})
    _learns(out["losses"])


def test_cpu_written_checkpoint_loads_into_te_spec(cpu_checkpoint, tmp_path):
    out = run_scenario("load_cpu_checkpoint", tmp_path, {"checkpoint": cpu_checkpoint["checkpoint"]})
    assert out["device"].startswith("cuda") and out["param_devices"] == ["cuda"]
    assert out["te_modules"] > 0  # really the TE spec
    # fp32 on both sides; TE's GEMMs may use TF32, hence the tolerance
    diffs = [abs(a - b) for a, b in zip(out["nll"], cpu_checkpoint["nll"])]
    assert len(diffs) == len(cpu_checkpoint["nll"]) > 0 and max(diffs) < 0.05, max(diffs)
    assert all(math.isfinite(x) for x in out["init_from_losses"])


def test_evaluation_and_generation_on_gpu(cpu_checkpoint, tmp_path):
    out = run_scenario("evaluate", tmp_path, {"checkpoint": cpu_checkpoint["checkpoint"]})
    assert out["device"].startswith("cuda") and out["kv_cache"]
    assert out["needle_cases"] == 2
    assert all(math.isfinite(x) for x in out["ppl_nll_sum"])
    assert out["greedy"] == out["greedy_recomputed"] and len(out["greedy"]) > 0


def test_conversion_round_trip_on_gpu_machine(tmp_path):
    out = run_scenario("convert_round_trip", tmp_path)
    assert out["tensors"] > 0 and out["mismatched"] == [] and out["missing"] == []


# ------------------------------------------------------- issue 21: the GPU path, second reading

def test_transformer_engine_backend_choice_matches_our_rules_table(tmp_path):
    """attention/te_rules.py against TE's own get_attention_backend on this GPU and TE."""
    out = run_scenario("attention_backends", tmp_path)
    for name, case in out["cases"].items():
        # a refusal of ours is TE's 'no backend'; an allowance of ours is a backend TE has
        assert bool(case["ours"]) == any(case["te"]), (name, case, out["capability"], out["te_version"])
    cases = out["cases"]
    assert cases["bf16"]["ours"] and cases["bf16_cp"]["ours"] and cases["bf16_thd_cp"]["ours"]
    assert cases["fp32"]["ours"] == ["UnfusedDotProductAttention"] and not cases["fp32_cp"]["ours"]
    assert bool(cases["fp32_thd"]["ours"]) == (tuple(out["te_version"]) >= (2, 11))
    assert bool(cases["fp8_dpa_tensorwise"]["ours"]) == (tuple(out["capability"]) >= (10, 0))


def test_tensorwise_fp8_dot_product_attention_is_refused_below_sm100(tmp_path):
    out = run_scenario("tensorwise_fp8_attention", tmp_path, extra_env={"NVTE_DPA_FP8_RECIPE": ""})
    if tuple(out["capability"]) < (10, 0):
        assert "model.fp8_recipe" in out["refused"] and "no attention backend" in out["refused"], out
    else:
        _learns(out["losses"])


def test_tensorwise_fp8_attention_trains_with_delayed_scaling_for_the_attention(tmp_path):
    """NVTE_DPA_FP8_RECIPE=DelayedScaling: TE runs the attention with a DelayedScaling recipe
    (dot_product_attention.py, init_fp8_metadata) and FusedAttention takes it on sm90."""
    out = run_scenario("tensorwise_fp8_attention", tmp_path, extra_env={"NVTE_DPA_FP8_RECIPE": "DelayedScaling"})
    assert "refused" not in out, out
    _learns(out["losses"])


def test_float32_with_context_parallelism_is_refused_when_the_config_loads():
    """CP needs a second GPU; the refusal happens at config time, before any GPU work (the
    rule itself is compared with TE in test_transformer_engine_backend_choice_matches_our_rules_table)."""
    from megatron_longsky.training.config import load_train_config

    with pytest.raises(ValueError, match="no attention backend"):
        load_train_config(None, ["model.preset=tiny", "model.transformer_impl=transformer_engine",
                                 "model.params_dtype=float32", "parallel.context_parallel_size=2"])


def test_packed_rows_through_te_attention_train(tmp_path):
    _learns(run_scenario("packed_rows", tmp_path)["losses"])


def test_local_spec_on_gpu_with_default_dtype_trains(tmp_path):
    """The local spec with the GPU's config (fusions on, bf16 by default): megatron-core's
    WrappedTorchNorm asserted on persist_layer_norm here before model/norm.py."""
    out = run_scenario("train_steps", tmp_path, {"name": "local_default", "model": {"transformer_impl": "local"}})
    _learns(out["losses"])


def test_train_then_evaluate_in_one_process_with_userbuffers(tmp_path):
    import warnings

    out = run_scenario("train_then_evaluate", tmp_path)
    assert all(math.isfinite(x) for x in out["losses"]) and math.isfinite(out["eval_loss"])
    assert out["ub"] == "ok" or out["ub"].startswith("unavailable"), out["ub"]
    if out["ub"] != "ok":
        warnings.warn(f"TE userbuffers could not be initialised on this machine: {out['ub']}")
