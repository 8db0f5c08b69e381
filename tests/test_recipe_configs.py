"""The cluster recipes in examples/configs/recipes/: each stage loads, fits the node count
its header states (by `longsky plan`), and the stages chain by configuration alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_longsky.config import from_dict, load_config, load_yaml
from megatron_longsky.data.cip import CIPConfig
from megatron_longsky.eval.needle import NeedleConfig
from megatron_longsky.model.config import preset
from megatron_longsky.plan.cli import main as plan_main
from megatron_longsky.training.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"skywork13b_200k": ("skywork-13b", 204800), "llama3_8b_128k": ("llama3-8b", 131072)}
STAGES = ["cpt", "sft", "long_sft"]


def _path(recipe: str, stage: str) -> Path:
    return REPO / "examples" / "configs" / "recipes" / recipe / f"{stage}.yaml"


def _nodes(path: Path) -> int:
    found = re.search(r"^# nodes: (\d+) \(8 x H100 80GB", path.read_text(), re.MULTILINE)
    assert found, f"{path} does not state the node count it is sized for"
    return int(found.group(1))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_stage_fits_the_nodes_it_states(recipe, stage, capsys):
    path = _path(recipe, stage)
    nodes = _nodes(path)
    assert plan_main(["--config", str(path), "--nodes", str(nodes), "--json", "--require-fit"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["gpus"] == 8 * nodes
    cfg = load_train_config(path)
    par = cfg.parallel
    # one sequence shard per CP rank, two load-balancing chunks each, FP8 wants multiples of 16
    assert cfg.model.seq_length % (2 * par.context_parallel_size * 16) == 0
    assert cfg.model.kv_groups % par.tensor_model_parallel_size == 0
    assert cfg.model.fp8 and cfg.optimizer.use_distributed_optimizer
    if par.context_parallel_size > 1:
        assert par.sequence_parallel and cfg.model.recompute_granularity == "full"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_stages_chain_by_configuration(recipe):
    preset_name, long_length = RECIPES[recipe]
    cfgs = {stage: load_train_config(_path(recipe, stage)) for stage in STAGES}
    raw = {stage: load_yaml(_path(recipe, stage)) for stage in STAGES}
    assert all(r["model"]["preset"] == preset_name for r in raw.values())
    # each stage starts from the previous one's weights; the first from the HF import
    assert cfgs["sft"].checkpoint.init_from == cfgs["cpt"].checkpoint.save
    assert cfgs["long_sft"].checkpoint.init_from == cfgs["sft"].checkpoint.save
    assert cfgs["cpt"].checkpoint.init_from.endswith("hf_import")
    # the raised RoPE base is kept by every stage; the long stages run at the target length
    bases = {cfg.model.rope.base for cfg in cfgs.values()}
    assert len(bases) == 1 and bases.pop() > preset(preset_name)["rope"]["base"]
    assert cfgs["cpt"].model.seq_length == cfgs["long_sft"].model.seq_length == long_length
    assert cfgs["cpt"].data.kind == "gpt" and cfgs["sft"].data.kind == cfgs["long_sft"].data.kind == "sft"
    assert cfgs["sft"].data.packed and cfgs["long_sft"].data.packed
    assert cfgs["long_sft"].train_iters == 200
    # CPT reads what the CIP recipe builds, at the same length
    cip = load_config(CIPConfig, REPO / "examples" / "configs" / "cip" / f"{recipe}.yaml")
    assert cfgs["cpt"].data.prefixes == [cip.output_prefix]
    assert cip.seq_length == long_length


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_needle_config_sweeps_to_the_target_length(recipe):
    path = _path(recipe, "needle")
    _nodes(path)
    needle = from_dict(NeedleConfig, load_yaml(path), str(path))
    _, long_length = RECIPES[recipe]
    assert max(needle.lengths) <= long_length and max(needle.lengths) >= 0.95 * long_length
    assert needle.num_depths >= 11 and needle.mode == "chat"


def test_documented_plan_figures_are_what_plan_says(capsys):
    """docs/recipes.md's per-GPU figures and the sbatch header's are `longsky plan` output
    (issue 22: they had drifted from 36.3 / 49.8 GiB to what plan said)."""
    table = (REPO / "docs" / "recipes.md").read_text()
    rows = re.findall(r"`recipes/(\w+)/(\w+)\.yaml` \| (\d+) \|[^|]*\| ([\d.]+) GiB \|", table)
    assert len(rows) == 6, rows
    for recipe, stage, nodes, documented in rows:
        assert plan_main(["--config", str(_path(recipe, stage)), "--nodes", nodes, "--json"]) == 0
        peak = json.loads(capsys.readouterr().out)["memory"]["peak"] / 2**30
        assert f"{peak:.1f}" == documented, (recipe, stage, peak)
        if (recipe, stage) == ("skywork13b_200k", "cpt"):
            sbatch = (REPO / "examples" / "slurm" / "cpt.sbatch").read_text()
            assert f"longsky plan puts it at ~{peak:.0f} GiB/GPU" in sbatch
