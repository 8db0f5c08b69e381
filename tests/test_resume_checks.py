"""A resume continues one run: it refuses a checkpoint of other data/model/tokenizer and a
changed learning-rate schedule, each with a clear message and an explicit override."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from megatron_longsky.config import ConfigError
from megatron_longsky.training.resume_check import check_same_run, check_schedule, run_differences

from _training_fixtures import tiny_config_dict, write_token_dataset

SAVED_SCHEDULE = {"max_lr": 1e-2, "min_lr": 1e-3, "lr_warmup_steps": 1, "lr_decay_steps": 4,
                  "lr_decay_style": "cosine", "start_wd": 0.1, "end_wd": 0.1, "num_steps": 4}


def _scheduler(**changes):
    values = {k: v for k, v in SAVED_SCHEDULE.items() if k != "num_steps"}
    return SimpleNamespace(**{**values, **changes}, override_opt_param_scheduler=False,
                           use_checkpoint_opt_param_scheduler=True)


def test_schedule_change_is_refused_naming_the_fields_and_the_overrides():
    with pytest.raises(ConfigError) as err:
        check_schedule(SAVED_SCHEDULE, _scheduler(lr_decay_steps=8, max_lr=2e-2), "check", "ckpt/iter_4")
    message = str(err.value)
    assert "optimizer.lr" in message and "schedule.decay_iters" in message and "train_iters" in message
    assert "schedule.on_resume=use_config" in message and "schedule.on_resume=use_checkpoint" in message
    assert check_schedule(SAVED_SCHEDULE, _scheduler(), "check", "x") == []


@pytest.mark.parametrize("policy, override, use_checkpoint", [("use_config", True, False),
                                                              ("use_checkpoint", False, True)])
def test_schedule_override_sets_megatron_cores_flags(policy, override, use_checkpoint):
    scheduler = _scheduler(lr_warmup_steps=3)
    assert check_schedule(SAVED_SCHEDULE, scheduler, policy, "x")
    assert scheduler.override_opt_param_scheduler is override
    assert scheduler.use_checkpoint_opt_param_scheduler is use_checkpoint


def test_run_identity_compares_data_model_and_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = tiny_config_dict(tmp_path, "data/a_text_document")
    same = tiny_config_dict(tmp_path, str(tmp_path / "data/a_text_document"))  # same path, absolute
    same["parallel"] = {"tensor_model_parallel_size": 2}  # layout may change
    assert run_differences(saved, same) == []
    other = tiny_config_dict(tmp_path, "data/b_text_document", model={**saved["model"], "hidden_size": 64})
    with pytest.raises(ConfigError) as err:
        check_same_run(saved, other, "runs/x/iter_0000002")
    assert "data.prefixes" in str(err.value) and "model.hidden_size" in str(err.value)
    assert "checkpoint.init_from" in str(err.value) and "checkpoint.allow_mismatch=true" in str(err.value)
    assert len(check_same_run(saved, other, "x", allow_mismatch=True)) == 2


@pytest.mark.slow
def test_resume_refuses_other_data_and_changed_schedule_then_extends_with_use_config(tmp_path):
    """End to end, in process: the checks run before any weights are loaded, and
    schedule.on_resume=use_config extends a finished run with the new schedule."""
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import train

    a = write_token_dataset(tmp_path / "a_text_document", seed=0)
    b = write_token_dataset(tmp_path / "b_text_document", seed=1)

    def cfg(prefix, **kw):
        return train_config_from_dict(tiny_config_dict(tmp_path, prefix, output_dir=str(tmp_path / "run"),
                                                       schedule={"warmup_iters": 1, "decay_style": "linear"}, **kw))

    first = train(cfg(a, train_iters=4))
    assert first.final_iteration == 4
    with pytest.raises(ConfigError, match="data.prefixes"):
        train(cfg(b, train_iters=4))
    with pytest.raises(ConfigError, match="schedule.decay_iters"):
        train(cfg(a, train_iters=8))
    extended = cfg(a, train_iters=8)
    extended = dataclasses.replace(extended, schedule=dataclasses.replace(extended.schedule, on_resume="use_config"))
    result = train(extended)
    assert result.iterations == [5, 6, 7, 8]
    # Linear decay over 8 iterations (1 warm-up): iteration 5 uses lr at step 4, well above min_lr.
    from megatron_longsky.training.metrics import read_metrics

    lrs = {r["iteration"]: r["lr"] for r in read_metrics(result.metrics_path)}
    assert lrs[5] == pytest.approx(1e-3 + (1e-2 - 1e-3) * (1 - (4 - 1) / (8 - 1)))
