"""Recipe dry-run (``longsky plan --dry-run``): every stage of both recipes, with the real
configs, builds the megatron-core configs the GPU path builds (TE, FP8), has megatron-core
validate them, builds the model on the meta device, and chains the stages; a stage that
would fail makes the command exit 1 with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_longsky.plan.cli import main as plan_main
from megatron_longsky.plan.dry_run import DryRunError, dry_run_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "examples" / "configs" / "recipes"


@pytest.mark.parametrize("recipe", ["llama3_8b_128k", "skywork13b_200k"])
def test_every_stage_of_the_recipe_passes_and_chains(recipe):
    from megatron_longsky.plan.cli import plan_input
    from megatron_longsky.plan.memory import params_on_rank
    from megatron_longsky.plan.dry_run import stated_nodes
    from megatron_longsky.training.config import load_train_config

    results = {r.name: r.facts for r in dry_run_recipe(RECIPES / recipe)}
    assert list(results) == ["import", "cpt", "sft", "long_sft", "needle", "export"]
    for stage in ("cpt", "sft", "long_sft"):
        facts = results[stage]
        cfg = load_train_config(RECIPES / recipe / f"{stage}.yaml")
        # the GPU path's switches, as megatron-core accepted them
        assert facts["fp8"] == "hybrid" and facts["distributed_optimizer"]
        assert facts["overlap_grad_reduce"] and facts["overlap_param_gather"] and facts["grad_accum_fusion"]
        assert facts["rope_fusion"]  # no YaRN in these recipes
        assert facts["recompute"] == ("full" if cfg.model.recompute_granularity == "full" else None)
        # the meta model holds what the planner counts
        p = plan_input(cfg, 8 * stated_nodes(RECIPES / recipe / f"{stage}.yaml"), facts["vocab"], "te")
        assert facts["params_per_rank"] == params_on_rank(p, "first")
        assert facts["gpus"] == 8 * stated_nodes(RECIPES / recipe / f"{stage}.yaml")
    # one vocabulary through the whole chain, and into the export
    assert len({results[s]["vocab"] for s in ("cpt", "sft", "long_sft")}) == 1
    # the export writes the model's own vocabulary (as imported), not the padded embedding rows
    hf_vocab = results["import"]["vocab"].split()[0]
    assert results["export"]["vocab"] == f"{hf_vocab} of {results['cpt']['vocab']} rows"


def test_cli_runs_one_stage_with_overrides_and_nodes(capsys):
    cpt = RECIPES / "llama3_8b_128k" / "cpt.yaml"
    assert plan_main(["--dry-run", "--config", str(cpt), "--nodes", "8"]) == 0
    out = capsys.readouterr().out
    assert "gpus=64" in out and "DP=8" in out and "validated by megatron-core" in out
    # key=value overrides as for longsky train
    assert plan_main(["--dry-run", "--config", str(cpt), "--nodes", "4", "model.recompute_granularity=selective",
                      "model.recompute_method=null", "model.recompute_num_layers=null"]) == 0
    assert "recompute=None" in capsys.readouterr().out  # TE's fused attention: not re-run


@pytest.mark.parametrize("overrides, reason", [
    # our config checks (issue 15.4: no setting silently ignored), before megatron-core's own
    (["model.recompute_method=null"], "model.recompute_granularity='full' needs model.recompute_method"),
    (["parallel.tensor_model_parallel_size=3"], "TP=3 does not divide the 32 attention heads"),
    # the cluster shape from --nodes
    (["parallel.pipeline_model_parallel_size=8"], "stage cpt: ConfigError: 32 GPUs are not divisible"),
    # megatron-core's shape checks while building the model on the meta device
    (["model.ffn_hidden_size=14337"], "stage cpt"),
])
def test_a_stage_that_would_fail_exits_1_with_the_reason(overrides, reason, capsys):
    code = plan_main(["--dry-run", "--recipe", str(RECIPES / "llama3_8b_128k"), "--nodes", "4", *overrides])
    assert code == 1
    assert reason in capsys.readouterr().err


def test_broken_chain_is_reported():
    with pytest.raises(DryRunError, match="stage sft: checkpoint.init_from=/elsewhere is not the previous"):
        dry_run_recipe(RECIPES / "llama3_8b_128k", ["checkpoint.init_from=/elsewhere"], build_meta=False)
    with pytest.raises(DryRunError, match="stage needle: lengths up to 131072 exceed"):
        dry_run_recipe(RECIPES / "llama3_8b_128k", ["model.seq_length=65536", "model.max_position_embeddings=65536"],
                       build_meta=False)


def test_plan_counts_checkpoint_memory(capsys):
    import json

    cpt = str(RECIPES / "skywork13b_200k" / "cpt.yaml")
    assert plan_main(["--config", cpt, "--nodes", "16", "--json"]) == 0
    dp = json.loads(capsys.readouterr().out)["checkpoint"]
    assert plan_main(["--config", cpt, "--nodes", "16", "--json", "checkpoint.optimizer_format=fully_reshardable",
                      "checkpoint.async_save=false"]) == 0
    full = json.loads(capsys.readouterr().out)["checkpoint"]
    assert dp["optimizer_format"] == "dp_reshardable" and full["optimizer_format"] == "fully_reshardable"
    # dp_reshardable: no gathering; every one of the 128 ranks writes about 1/32 of its TP shard's state
    assert dp["save_gpu_transient"] == 0
    assert dp["written_per_rank"] * 128 == pytest.approx(dp["total_size"], rel=0.02)
    # fully_reshardable gathers the TP shard's fp32 state (param, m, v) into host memory on every rank
    gib = 1024**3
    assert 300 * gib < full["save_host_per_node"] < 400 * gib
    assert full["save_gpu_transient"] > 0
