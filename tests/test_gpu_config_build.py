"""The model a GPU run builds, built here (issue 21, defects 1 and 2, and the dry-run).

megatron-core's local spec puts ``WrappedTorchNorm`` in for RMSNorm, which asserts no
``persist_layer_norm`` and no ``sequence_parallel`` (transformer/torch_norm.py): every GPU
run without TE, and every run with sequence parallelism, failed at construction. The
dry-run forced those flags off, so it could not see it; it now builds the meta model from
the exact TransformerConfig of the run.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_longsky"
SP_OVERRIDES = ["model.preset=tiny", "model.vocab_size=256", "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true"]


def _cfg(*overrides):
    from megatron_longsky.training.config import load_train_config

    return load_train_config(None, [*SP_OVERRIDES, *overrides])


def test_local_spec_on_a_gpu_has_no_persist_layer_norm_and_our_norm():
    from megatron_longsky.model.build import transformer_config
    from megatron_longsky.model.config import ModelConfig
    from megatron_longsky.model.norm import LongSkyRMSNorm
    from megatron_longsky.model.perf import Environment, resolve_perf
    from megatron_longsky.model.spec import local_layer_spec
    from megatron_longsky.runtime.distributed import ParallelConfig

    gpu = Environment(cuda=True, transformer_engine=False, apex_grad_accum_fusion=False)
    local = transformer_config(ModelConfig(), ParallelConfig(), perf=resolve_perf(ModelConfig(), ParallelConfig(),
                                                                                 gpu, "local"), impl="local", on_gpu=True)
    assert not local.persist_layer_norm and local.bias_activation_fusion  # the other fusions stay on
    spec = local_layer_spec()
    assert spec.submodules.input_layernorm is LongSkyRMSNorm and spec.submodules.pre_mlp_layernorm is LongSkyRMSNorm


def test_norm_matches_torch_rmsnorm_and_marks_its_weight_for_the_tp_all_reduce():
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longsky.model.norm import LongSkyRMSNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, normalization="RMSNorm",
                            tensor_model_parallel_size=2, sequence_parallel=True, persist_layer_norm=True)
    norm = LongSkyRMSNorm(cfg, 16, eps=1e-6)
    assert norm.weight.sequence_parallel is True  # read by finalize_model_grads (sum over TP)
    reference = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_()
        reference.weight.copy_(norm.weight)
    x = torch.randn(3, 2, 16)
    assert torch.equal(norm(x), reference(x))
    assert list(norm.state_dict()) == list(reference.state_dict()) == ["weight"]
    plain = LongSkyRMSNorm(dataclasses.replace(cfg, tensor_model_parallel_size=1, sequence_parallel=False), 16)
    assert plain.weight.sequence_parallel is False


@pytest.mark.parametrize("simulate", ["gpu", "gpu-te"])
def test_dry_run_builds_the_meta_model_from_the_exact_transformer_config(simulate):
    from megatron_longsky.plan.dry_run import meta_model, simulated_environment, train_stage_configs

    env = simulated_environment(simulate, "h100")
    fp8 = ["model.fp8=hybrid", "model.seq_length=256"] if simulate == "gpu-te" else []
    cfg = _cfg("optimizer.use_distributed_optimizer=true", *fp8)
    tcfg, *_ = train_stage_configs(cfg, 8, 256, env)
    model = meta_model(cfg, tcfg, 256, env)
    built = model.config
    # Only where weights are allocated and whether they are drawn differ.
    differ = {f.name for f in dataclasses.fields(tcfg) if getattr(built, f.name) != getattr(tcfg, f.name)}
    assert differ <= {"use_cpu_initialization", "perform_initialization"}, differ
    assert built.sequence_parallel and built.bias_activation_fusion and built.masked_softmax_fusion
    assert built.gradient_accumulation_fusion
    assert built.persist_layer_norm == (simulate == "gpu-te")
    assert built.fp8 == ("hybrid" if simulate == "gpu-te" else None)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.decoder.final_layernorm.weight.sequence_parallel


def test_a_construction_time_assertion_fails_the_dry_run_naming_the_setting(monkeypatch):
    """What the dry-run reports when megatron-core refuses the layers (here: the old local spec,
    megatron-core's WrappedTorchNorm, under sequence parallelism)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_longsky.model import spec as spec_module
    from megatron_longsky.plan.dry_run import DryRunError, dry_run_train_stage, simulated_environment

    monkeypatch.setattr(spec_module, "local_layer_spec", lambda: get_gpt_layer_local_spec(normalization="RMSNorm"))
    with pytest.raises(DryRunError, match=r"stage x: AssertionError building the model \(setting: .*"
                                          r"(parallel.sequence_parallel|persist_layer_norm).*torch_norm.py"):
        dry_run_train_stage("x", _cfg(), 8, 256, env=simulated_environment("gpu", "h100"))
    monkeypatch.undo()
    result = dry_run_train_stage("x", _cfg(), 8, 256, env=simulated_environment("gpu", "h100"))
    assert result.facts["sp"] is True and result.facts["layers"] == "local" and result.facts["dtype"] == "bfloat16"


def test_dry_run_cli_simulate_and_device(capsys):
    from megatron_longsky.plan.cli import main

    tiny = str(PACKAGE.parent / "examples" / "configs" / "tiny_pretrain.yaml")
    assert main(["--dry-run", "--simulate", "gpu", "--config", tiny, "--nodes", "1", "--gpus-per-node", "2",
                 "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]) == 0
    assert "dry-run (gpu, h100)" in capsys.readouterr().out
    assert main(["--dry-run", "--config", tiny, "--nodes", "1", "--gpus-per-node", "2", "model.fp8=hybrid",
                 "model.fp8_recipe=mxfp8"]) == 1
    assert "fp8_recipe=mxfp8 on sm90" in capsys.readouterr().err


def test_plan_cli_and_dry_run_do_not_import_each_other_both_ways():
    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert "megatron_longsky.plan.cli" not in imported(PACKAGE / "plan" / "dry_run.py")
    assert "megatron_longsky.plan.dry_run" not in imported(PACKAGE / "plan" / "inputs.py")
