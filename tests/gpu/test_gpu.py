"""The GPU path on one CUDA device: training (local spec + our attention; TE spec + FP8),
a CPU-written checkpoint in the TE spec, evaluation and generation, conversion.

Skipped without CUDA; the TE tests skip without Transformer Engine. ``tests/gpu/run.sh``.
"""

import math

import pytest
from gpu_runner import run_scenario

pytestmark = pytest.mark.gpu


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
    out = run_scenario("train_steps", tmp_path, {"name": "te_fp8_dpa", "model": {
        "transformer_impl": "transformer_engine", "params_dtype": "bfloat16", "fp8": "hybrid",
        "fp8_recipe": "delayed", "fp8_attention": "dot_product"}})
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
