"""Issue 15: the same run at any layout, settings that do what they say, one FLOP model.
Issue 12.4: every stage of both recipes resolves its vocabulary from the chain it belongs to."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_longsky.checkpoint.layout import write_checkpoint_config
from megatron_longsky.config import ConfigError
from megatron_longsky.model.config import model_config_from_dict, preset
from megatron_longsky.plan.flops import (
    DEVICE_PEAK_TFLOPS, UnknownPeakError, device_kind, device_peak_tflops, step_flops,
)
from megatron_longsky.testing.multiprocess import run_distributed
from megatron_longsky.tokenizer import ByteTokenizer
from megatron_longsky.training.config import load_train_config, train_config_from_dict
from megatron_longsky.training.loop import resolve_vocab_size

from _training_fixtures import tiny_config_dict, write_sft_dataset, write_token_dataset

REPO = Path(__file__).resolve().parents[1]


# --- 15.1: the padded vocabulary is a property of the model, not of the layout ---------------

def _cfg(tmp_path, **top):
    return train_config_from_dict(tiny_config_dict(tmp_path, str(tmp_path / "ds"), **top))


def test_padded_vocabulary_is_the_same_at_any_tp(tmp_path):
    tok = ByteTokenizer()  # 259 ids
    sizes = {tp: resolve_vocab_size(_cfg(tmp_path, model={"vocab_size": None},
                                         parallel={"tensor_model_parallel_size": tp}), tok, None)
             for tp in (1, 2, 4)}
    assert set(sizes.values()) == {384}
    # A TP size that does not divide the padded vocabulary is refused, naming the setting.
    model = model_config_from_dict({"preset": "tiny"})
    assert model.padded_vocab_size(259, tensor_parallel=8) == 384
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by"):
        model.padded_vocab_size(259, tensor_parallel=5)
    assert model_config_from_dict({"preset": "tiny", "make_vocab_size_divisible_by": 80}).padded_vocab_size(
        259, tensor_parallel=5) == 320


def _first_loss(tmp, prefix, tp):
    import torch

    from megatron_longsky.training.loop import train

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="env://")
    cfg = tiny_config_dict(tmp, prefix, train_iters=1, model={"vocab_size": None},
                           parallel={"tensor_model_parallel_size": tp},
                           checkpoint={"save": f"{tmp}/tp{tp}", "save_at_end": False}, output_dir=f"{tmp}/tp{tp}")
    return train(train_config_from_dict(cfg)).losses[0]


@pytest.mark.slow
def test_from_scratch_run_starts_from_the_same_model_at_tp1_and_tp2(tmp_path):
    prefix = write_token_dataset(tmp_path / "ds")
    tp1 = run_distributed(_first_loss, 1, str(tmp_path), prefix, 1)[0]
    tp2 = run_distributed(_first_loss, 2, str(tmp_path), prefix, 2)
    # The loss of step 1 is computed by the initial weights: the same model at both layouts.
    assert tp2[0] == tp2[1] == pytest.approx(tp1, rel=1e-5)


# --- 12.4: the vocabulary of every recipe stage comes from its chain ------------------------

RECIPES = {"skywork13b_200k": "skywork-13b", "llama3_8b_128k": "llama3-8b"}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_stage_resolves_its_vocabulary_from_the_chain(recipe, tmp_path):
    from megatron_longsky.eval.megatron_backend import padded_vocab_for_checkpoint

    hf_vocab = preset(RECIPES[recipe])["vocab_size"]
    tokenizer = SimpleNamespace(vocab_size=hf_vocab)
    stages = ["cpt", "sft", "long_sft"]
    cfgs = {s: load_train_config(REPO / "examples" / "configs" / "recipes" / recipe / f"{s}.yaml") for s in stages}
    # `longsky convert import` records the HF vocabulary padded by the model config.
    previous = model_config_from_dict({"preset": RECIPES[recipe]}).padded_vocab_size(
        tensor_parallel=cfgs["cpt"].parallel.tensor_model_parallel_size)
    for stage in stages:
        ckpt = tmp_path / f"before_{stage}"
        write_checkpoint_config(ckpt, {"model": {"vocab_size": previous}})
        vocab = resolve_vocab_size(cfgs[stage], tokenizer, ckpt)
        assert vocab == previous and vocab >= hf_vocab, stage
        previous = vocab
    # the needle sweep (and export) read the last stage's checkpoint
    final = {"model": {**preset(RECIPES[recipe]), "vocab_size": previous}}
    assert padded_vocab_for_checkpoint(final, model_config_from_dict(final["model"])) == previous
    # a stage whose model.vocab_size cannot be the checkpoint's is still refused
    write_checkpoint_config(tmp_path / "other", {"model": {"vocab_size": previous + 128}})
    with pytest.raises(ConfigError, match="model.vocab_size"):
        resolve_vocab_size(cfgs["sft"], tokenizer, tmp_path / "other")


# --- 15.2: packed SFT rows are a property of the data config ----------------------------------

@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    return write_sft_dataset(tmp_path_factory.mktemp("sft"), num_samples=40)


def _sft_rows(tmp_path, prefix, cp):
    from megatron_longsky.training.data import build_sft_splits

    cfg = _cfg(tmp_path, model={"seq_length": 256}, parallel={"context_parallel_size": cp},
               data={"kind": "sft", "prefixes": [prefix], "packed": True})
    dataset = build_sft_splits(cfg, train_samples=1).train.dataset
    return dataset, [dataset[i] for i in range(len(dataset))]


def test_cp1_and_cp2_pack_the_same_rows(tmp_path, sft_prefix):
    one, rows1 = _sft_rows(tmp_path, sft_prefix, 1)
    two, rows2 = _sft_rows(tmp_path, sft_prefix, 2)
    assert one.pad_to_multiple == two.pad_to_multiple == 64
    assert np.array_equal(one.plan.sample_ids, two.plan.sample_ids)
    assert np.array_equal(one.plan.row_offsets, two.plan.row_offsets)
    assert len(rows1) == len(rows2) > 1
    for a, b in zip(rows1, rows2):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


def test_context_parallel_size_is_checked_against_pad_to_multiple(tmp_path, sft_prefix):
    data = {"kind": "sft", "prefixes": [sft_prefix], "packed": True}
    for cp in (2, 4, 8, 16, 32):  # the default serves CP up to 32
        _cfg(tmp_path, model={"seq_length": 256}, parallel={"context_parallel_size": cp}, data=data)
    with pytest.raises(ConfigError, match="data.pad_to_multiple=64 is not a multiple of 128: context_parallel_size=64"):
        _cfg(tmp_path, model={"seq_length": 256}, parallel={"context_parallel_size": 64}, data=data)
    with pytest.raises(ConfigError, match="data.pad_to_multiple=8"):
        _cfg(tmp_path, model={"seq_length": 256}, parallel={"context_parallel_size": 8},
             data={**data, "pad_to_multiple": 8})
    with pytest.raises(ConfigError, match="not a multiple of data.pad_to_multiple"):
        _cfg(tmp_path, model={"seq_length": 96}, data=data)


# --- 15.4: settings that would be silently ignored are config errors naming the key ---------

@pytest.mark.parametrize("top,key", [
    ({"eval_interval": 2, "data": {"kind": "sft", "prefixes": ["x"]}, "model": {"seq_length": 64}}, "eval_interval"),
    ({"eval_interval": 2, "data": {"split": "100,0,0"}}, "eval_interval"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel"),
    ({"model": {"recompute_granularity": "selective", "recompute_method": "uniform"}}, "model.recompute_method"),
    ({"model": {"recompute_num_layers": 1}}, "model.recompute_num_layers"),
    ({"model": {"recompute_granularity": "full"}}, "model.recompute_method"),
    ({"model": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
      "parallel": {"pipeline_model_parallel_size": 2}}, "model.recompute_num_layers"),
])
def test_ignored_settings_are_config_errors(tmp_path, top, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(tmp_path, **top)


def test_settings_that_take_effect_are_accepted(tmp_path):
    _cfg(tmp_path, eval_interval=2, data={"split": "90,10,0"})
    _cfg(tmp_path, parallel={"tensor_model_parallel_size": 2, "sequence_parallel": True})
    _cfg(tmp_path, model={"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
         parallel={"pipeline_model_parallel_size": 2})


# --- 15.5: one FLOP model and one table of device peaks ---------------------------------------

def test_device_peak_table():
    assert set(DEVICE_PEAK_TFLOPS) == {"h100", "h200", "a100", "b200"}
    assert device_peak_tflops("h100", "bf16") == 989.0 and device_peak_tflops("h100", "fp8") == 1979.0
    assert device_peak_tflops("NVIDIA H200", "fp8") == 1979.0
    assert device_peak_tflops("NVIDIA B200", "bf16") == 2250.0 and device_peak_tflops("b200", "fp8") == 4500.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert device_kind("NVIDIA H100 80GB HBM3") == "h100" and device_kind("NVIDIA H100 PCIe") is None
    for device, precision in [("NVIDIA L40S", "bf16"), ("a100", "fp8"), ("cpu", "bf16")]:
        with pytest.raises(UnknownPeakError, match="unknown peak"):
            device_peak_tflops(device, precision)


def test_training_peak_follows_the_gpu_and_the_gemm_precision(monkeypatch):
    import torch

    from megatron_longsky.training.metrics import format_record, resolve_peak_tflops

    bf16 = model_config_from_dict({"preset": "tiny"})
    fp8 = model_config_from_dict({"preset": "tiny", "fp8": "hybrid"})
    monkeypatch.setattr("megatron_longsky.training.metrics.use_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert resolve_peak_tflops(None, bf16)[0] == 989.0
    assert resolve_peak_tflops(None, fp8)[0] == 1979.0  # FP8 runs use the FP8 peak
    assert resolve_peak_tflops(500.0, fp8)[0] == 500.0
    # the GEMMs' precision is the parameters' dtype: fp16 at its peak, fp32 has none in the table
    assert resolve_peak_tflops(None, model_config_from_dict({"preset": "tiny", "params_dtype": "float16"}))[0] == 989.0
    peak, why = resolve_peak_tflops(None, model_config_from_dict({"preset": "tiny", "params_dtype": "float32"}))
    assert peak is None and "at fp32" in why
    monkeypatch.setattr("megatron_longsky.training.metrics.use_cuda", lambda: False)
    assert "unknown peak for cpu at fp32" in resolve_peak_tflops(None, bf16)[1]  # auto is float32 on CPU
    monkeypatch.setattr("megatron_longsky.training.metrics.use_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA RTX 6000 Ada Generation")
    peak, why = resolve_peak_tflops(None, bf16)
    assert peak is None and "unknown peak" in why and "RTX 6000" in why
    record = {"iteration": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 1.0,
              "tflops_per_device": 1.0, "mfu": None, "hfu": None, "peak_memory_gib": 0.0,
              "data_wait_fraction": 0.0}
    assert "unknown peak" in format_record(record)


def test_training_and_plan_report_mfu_and_hfu_from_the_same_flops(tmp_path, capsys, monkeypatch):
    from megatron_longsky.plan.cli import main as plan_main
    from megatron_longsky.runtime.distributed import free_port
    from megatron_longsky.training.loop import train
    from megatron_longsky.training.metrics import read_metrics

    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # a single-process run on a shared machine
    prefix = write_token_dataset(tmp_path / "ds", num_docs=16)
    model = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    cfg = train_config_from_dict(tiny_config_dict(tmp_path, prefix, train_iters=2, model=model,
                                                  logging={"log_interval": 1, "tensorboard": False,
                                                           "peak_tflops_per_device": 1e-3},
                                                  checkpoint={"save_at_end": False}))
    train(cfg)
    flops = step_flops(cfg.model, 384, cfg.global_batch_size)
    assert flops.hardware_flops > flops.model_flops
    for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl"):
        assert r["tflops_per_device"] == pytest.approx(flops.model_flops / r["step_time_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1e-3)
        assert r["hfu"] / r["mfu"] == pytest.approx(flops.hardware_flops / flops.model_flops)
    # the planner: the same FLOPs, and FP8 runs divided by the FP8 peak of the chosen device
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"model": {"preset": "llama3-8b", "seq_length": 8192, "fp8": "hybrid", **model},
                               "global_batch_size": 8}))
    for device in ("h100", "b200"):
        assert plan_main(["--config", str(job), "--nodes", "1", "--json", "--device", device,
                          "--efficiency", "0.5"]) == 0
        report = json.loads(capsys.readouterr().out)
        expected = step_flops(load_train_config(job).model, 128256, 8)
        assert report["flops"]["hardware_flops"] == pytest.approx(expected.hardware_flops)
        # GEMMs at the FP8 peak; core attention (fp8_attention off) at the BF16 share of it
        peak = DEVICE_PEAK_TFLOPS[device]["fp8"]
        bf16_share = DEVICE_PEAK_TFLOPS["h100"]["bf16"] / DEVICE_PEAK_TFLOPS["h100"]["fp8"]
        seconds = ((expected.hardware_flops - expected.attention_flops) / peak
                   + expected.attention_flops / (peak * bf16_share)) / (8 * 1e12 * 0.5)
        assert report["time"]["step_seconds"] == pytest.approx(seconds)
        # One MFU/HFU definition (issue 22): each FLOP counted at the peak it runs at, so a step
        # that sustains the stated efficiency on every FLOP reports it as HFU, FP8 or not.
        assert report["time"]["hfu"] == pytest.approx(0.5)
        model_at_peak = ((expected.model_flops - expected.model_attention_flops) / peak
                         + expected.model_attention_flops / (peak * bf16_share)) / 1e12
        assert report["time"]["mfu"] == pytest.approx(model_at_peak / (seconds * 8))


# --- 15.7: one YAML + flags + key=value merge, used by every command ----------------------------

def _command_configs(tmp_path, argv_tail):
    """(command, seed) for each command that takes a YAML, flags and overrides."""
    from megatron_longsky.data.cip import parse_args as cip_args
    from megatron_longsky.eval import needle_cli, tasks_cli
    from megatron_longsky.synl import generate

    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("seed: 1\n")
    out = str(tmp_path / "out")
    common = ["--config", str(yaml_path), *argv_tail]
    return {
        "build-cip": cip_args(["--input-prefix", "a", "--output-prefix", out, *common])[0].seed,
        "needle": needle_cli.needle_config_from_args(
            needle_cli.build_parser().parse_args(["--hf-model", out, "--output", out, *common])).seed,
        "eval passkey": tasks_cli.task_config(
            tasks_cli.build_parser().parse_args(["passkey", "--hf-model", out, "--output", out, *common])).seed,
        "build-synl": generate.config_from_args(generate.build_parser().parse_args(["--output", out, *common])).seed,
    }


def test_every_command_merges_yaml_flags_and_overrides_the_same_way(tmp_path):
    assert set(_command_configs(tmp_path, []).values()) == {1}  # the YAML
    assert set(_command_configs(tmp_path, ["--seed", "2"]).values()) == {2}  # a flag beats the YAML
    assert set(_command_configs(tmp_path, ["--seed", "2", "seed=3"]).values()) == {3}  # key=value wins
    # an override swallowed by a multi-valued flag is recovered by the shared helper
    from megatron_longsky.data.cip import parse_args as cip_args

    cfg, _ = cip_args(["--input-prefix", "a", "b", "seed=5", "--output-prefix", str(tmp_path / "o")])
    assert cfg.input_prefixes == ["a", "b"] and cfg.seed == 5
    # nothing outside the config core merges by hand
    package = REPO / "megatron_longsky"
    by_hand = [str(p.relative_to(REPO)) for p in package.rglob("*.py")
               if p.name != "config.py" or p.parent != package
               if "apply_overrides(" in p.read_text() or "load_yaml(args" in p.read_text()]
    assert by_hand == []


# --- 15.3: TP larger than the KV groups wherever megatron-core 0.16.1 allows it ---------------

def test_tp_larger_than_kv_groups_is_accepted_where_megatron_core_accepts_it(tmp_path):
    from megatron.core.transformer import TransformerConfig

    from megatron_longsky.convert.hf_config import ConversionError
    from megatron_longsky.convert.importer import validate_layout
    from megatron_longsky.plan.memory import PlanInput, estimate_memory

    for groups, tp in [(1, 2), (1, 4), (2, 4), (4, 2)]:
        model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": groups,
                 "ffn_hidden_size": 64}
        m = model_config_from_dict(model)
        TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=groups,
                          tensor_model_parallel_size=tp)  # megatron-core's own rule
        assert m.tensor_parallel_error(tp) is None
        validate_layout(m, tp, 1)  # importer
        _cfg(tmp_path, model=model, parallel={"tensor_model_parallel_size": tp})  # train
        plan = estimate_memory(PlanInput(model=m, tensor_parallel=tp, vocab_size=128))  # planner
        assert plan.peak > 0
    m = model_config_from_dict({"num_layers": 2, "hidden_size": 96, "num_attention_heads": 6,
                                "num_query_groups": 2, "ffn_hidden_size": 96})
    with pytest.raises(ValueError):  # megatron-core refuses 2 groups over TP=3 ...
        TransformerConfig(num_layers=2, hidden_size=96, num_attention_heads=6, num_query_groups=2,
                          tensor_model_parallel_size=3)
    with pytest.raises(ConversionError, match="neither a divisor nor a multiple"):  # ... and so do we
        validate_layout(m, 3, 1)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        _cfg(tmp_path, model={"num_layers": 2, "hidden_size": 96, "num_attention_heads": 6,
                              "num_query_groups": 2, "ffn_hidden_size": 96},
             parallel={"tensor_model_parallel_size": 3})


# --- 15.9: imports go downwards; overwrites are crash-safe ------------------------------------

def test_model_package_does_not_import_the_converter():
    import subprocess
    import sys

    code = ("import sys, megatron_longsky.model, megatron_longsky.model.init; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron_longsky.convert')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_production_modules_do_not_import_the_testing_package():
    import ast

    offenders = []
    for path in (REPO / "megatron_longsky").rglob("*.py"):
        if "testing" in path.relative_to(REPO / "megatron_longsky").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.startswith("megatron_longsky.testing")]
    assert offenders == []


def test_converter_overwrite_keeps_the_old_tree_when_the_swap_fails(tmp_path, monkeypatch):
    import os

    from megatron_longsky.convert import importer
    from megatron_longsky.utils.atomic import atomic_directory

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def failing_swap(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".ckpt.tmp-"):
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_swap)
    with pytest.raises(OSError, match="disk went away"):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary trees left
    monkeypatch.setattr(os, "replace", real_replace)
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # the importer and the exporter share this code rather than each swapping by hand
    from megatron_longsky.convert import exporter

    for module in (importer, exporter):
        source = Path(module.__file__).read_text()
        assert "atomic_directory(" in source and "rmtree(out" not in source


# --- 15.10: dead code is gone; TrainingSetup is typed -----------------------------------------

def test_dead_code_is_gone_and_training_setup_is_typed():
    import dataclasses

    import megatron_longsky.config as config_core
    import megatron_longsky.model.config as model_config
    from megatron_longsky.data import indexed
    from megatron_longsky.runtime import cpu_compat, distributed
    from megatron_longsky.training.loop import TrainingSetup

    assert not hasattr(config_core, "dump_config") and not hasattr(cpu_compat, "cpu_safe")
    assert not hasattr(distributed.Runtime, "is_cpu") and not hasattr(indexed, "dataset_info")
    assert not hasattr(model_config, "replace")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainingSetup)}
    assert "object" not in types.values(), types
    assert types["optimizer"] == "Optional[MegatronOptimizer]" and types["runtime"] == "Runtime"


# --- 15.12: benchmark verdicts come from medians first and name the measured commit -----------

def test_benchmark_results_lead_with_verdict_and_commit():
    import re
    import subprocess

    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert sections
    for section in sections:
        title, body = section.split("\n", 1)
        opening = body.strip().split("\n\n")[0]
        found = re.match(r"\*\*Measured:\*\* commit `([0-9a-f]{7,40})` \((\d{4}-\d{2}-\d{2})", opening)
        assert found, f"{title}: does not open with the commit it measured"
        assert "**Verdict" in opening, f"{title}: no verdict up front"
        if "median" in body and "best" in body:  # both reported: the verdict is the medians'
            verdict = opening[opening.index("**Verdict"):]
            best_at = verdict.find("best")
            assert "median" in verdict and (best_at < 0 or verdict.index("median") < best_at), title
        known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{found.group(1)}^{{commit}}"],
                               capture_output=True)
        if (REPO / ".git").exists() and subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
                                                       capture_output=True, text=True).stdout.strip() == "false":
            assert known.returncode == 0, f"{title}: commit {found.group(1)} is not in this repository"
