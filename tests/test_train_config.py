"""Job config, data order, loss and metrics helpers: fast, single-process checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longsky.config import ConfigError
from megatron_longsky.training.batch import prepare_batch
from megatron_longsky.training.cli import main as cli_main
from megatron_longsky.training.config import load_train_config, train_config_from_dict, train_config_to_dict
from megatron_longsky.training.data import GlobalBatchSampler
from megatron_longsky.training.metrics import read_metrics
from megatron_longsky.training.step import masked_token_loss

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny", "num_layers": 3}, "train_iters": 7}))
    cfg = load_train_config(path, ["model.rope.base=500000", "parallel.tensor_model_parallel_size=2",
                                   "data.prefixes=[a, b]", "data.weights=[0.25, 0.75]"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 64  # preset fills the rest
    assert cfg.model.rope.base == 500000.0 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.data.prefixes == ["a", "b"] and cfg.data.weights == [0.25, 0.75] and cfg.train_iters == 7
    # round trip through the plain data stored in checkpoints
    again = train_config_from_dict(train_config_to_dict(cfg))
    assert again == cfg


def test_bad_config_errors_name_the_field_and_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train_iter: 5\n")
    with pytest.raises(ConfigError, match=r"job.yaml.*train_iter"):
        load_train_config(path)
    with pytest.raises(ConfigError, match=r"optimizer.lr.*expected a number"):
        load_train_config(None, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="weights has 1 entries for 2 prefixes"):
        load_train_config(None, ["data.prefixes=[a, b]", "data.weights=[1.0]"])
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        load_train_config(None, ["global_batch_size=6", "micro_batch_size=4"])
    cfg = load_train_config(None, ["global_batch_size=8", "micro_batch_size=2"])
    assert cfg.num_microbatches(2) == 2 and cfg.num_microbatches(4) == 1
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        cfg.num_microbatches(8)


@pytest.mark.parametrize("name", ["tiny_pretrain.yaml", "tiny_sft.yaml"])
def test_example_configs_load(name):
    cfg = load_train_config(EXAMPLES / name)
    assert cfg.model.seq_length == 256 and cfg.tokenizer.type == "byte"


def test_cli_print_config_and_bad_config_exit_status(tmp_path, capsys):
    assert cli_main(["--config", str(EXAMPLES / "tiny_pretrain.yaml"), "--print-config", "train_iters=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train_iters"] == 3
    from megatron_longsky.cli import main as longsky

    assert longsky(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and len(err.strip().splitlines()) == 1


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4]), st.integers(1, 3), st.integers(0, 3))
def test_every_layout_sees_the_same_global_batches(dp, mbs, micro_per_rank, start_step):
    global_batch = dp * mbs * micro_per_rank
    total = global_batch * 6
    seen: dict[int, list[int]] = {}
    for rank in range(dp):
        sampler = GlobalBatchSampler(total, start_step * global_batch, global_batch, mbs, rank, dp)
        batches = list(sampler)
        assert len(batches) == len(sampler) == (6 - start_step) * micro_per_rank
        for i, batch in enumerate(batches):
            seen.setdefault(start_step + i // micro_per_rank, []).extend(batch)
    for step, indices in seen.items():  # step i is samples [i*G, (i+1)*G) whatever the split
        assert sorted(indices) == list(range(step * global_batch, (step + 1) * global_batch))
    assert sorted(seen) == list(range(start_step, 6))


def test_sampler_rejects_a_misaligned_resume_position():
    with pytest.raises(ValueError, match="multiple of the global batch"):
        GlobalBatchSampler(64, 3, 8, 2, 0, 2)


def test_masked_loss_with_no_tokens_is_zero_not_nan():
    losses = torch.rand(2, 5, requires_grad=True)
    loss_sum, count, report = masked_token_loss(torch.zeros(2, 5), losses)
    assert loss_sum.item() == 0.0 and count.item() == 0 and torch.isfinite(report["lm loss"]).all()
    loss_sum.backward()
    assert torch.equal(losses.grad, torch.zeros(2, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1.0]])
    loss_sum, count, report = masked_token_loss(mask, losses.detach())
    assert count.item() == 3
    assert loss_sum.item() == pytest.approx(float(losses[0, 0] + losses[0, 1] + losses[1, 4]))


def test_prepare_batch_defaults_positions_and_checks_shapes():
    batch = {"tokens": torch.zeros(2, 4, dtype=torch.int32), "labels": torch.ones(2, 4, dtype=torch.int64),
             "loss_mask": torch.ones(2, 4)}
    inputs = prepare_batch(batch)
    assert inputs.tokens.dtype == torch.int64 and inputs.position_ids.tolist() == [[0, 1, 2, 3]] * 2
    assert inputs.packed_seq_params is None
    with pytest.raises(ValueError, match="same shape"):
        prepare_batch({**batch, "labels": torch.ones(2, 3, dtype=torch.int64)})
    with pytest.raises(KeyError, match="loss_mask"):
        prepare_batch({"tokens": batch["tokens"], "labels": batch["labels"]})


def test_flops_formula_matches_a_hand_count():
    from megatron_longsky.model.config import model_config_from_dict
    from megatron_longsky.plan.flops import step_flops

    m = model_config_from_dict({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                "num_query_groups": 2, "ffn_hidden_size": 176, "seq_length": 256})
    h, f, s, v, kv = 64, 176, 256, 384, 2 * 16
    qkv, proj, attn, mlp = 2 * h * (h + 2 * kv), 2 * h * h, 2 * 2 * (s // 2) * h, 2 * 3 * h * f
    layers = 2 * (qkv + proj + attn + mlp)
    forward = layers + 2 * h * v
    flops = step_flops(m, v, global_batch_size=1)
    assert flops.model_flops == flops.hardware_flops == 3 * forward * s
    # Full recomputation re-runs the layers' forward (not the output layer): hardware FLOPs only.
    full = step_flops(model_config_from_dict({**dataclasses.asdict(m), "recompute_granularity": "full",
                                              "recompute_method": "uniform", "recompute_num_layers": 1}), v, 1)
    assert full.model_flops == 3 * forward * s and full.hardware_flops == (3 * forward + layers) * s


def test_metrics_reader_keeps_the_last_record_per_iteration_and_plot(tmp_path):
    from megatron_longsky.training.plot import plot_loss

    path = tmp_path / "metrics.jsonl"
    lines = [{"iteration": 1, "loss": 3.0}, {"iteration": 2, "loss": 2.5}, {"iteration": 2, "loss": 2.4},
             {"iteration": 2, "valid_loss": 2.6}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"iteration\": 3, \"lo")  # cut by a kill
    assert [(r["iteration"], r["loss"]) for r in read_metrics(path)] == [(1, 3.0), (2, 2.4)]
    png = plot_loss(path, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_logger_writes_jsonl_tensorboard_and_truncates_on_resume(tmp_path):
    from megatron_longsky.training.metrics import MetricsLogger

    record = {"loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0, "tflops_per_device": 0.1,
              "mfu": None, "peak_memory_gib": 0.1, "data_wait_fraction": 0.0, "skipped": False}
    logger = MetricsLogger(tmp_path, log_interval=2, tensorboard=True, enabled=True)
    for it in range(1, 5):
        logger.log({"iteration": it, **record})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # a run resumed from iteration 2 drops the records of the steps it will redo
    MetricsLogger(tmp_path, log_interval=2, tensorboard=False, enabled=True, resume_iteration=2).close()
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
