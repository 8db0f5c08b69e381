"""One clear line and exit 2 for a user's mistake, found before anything is built (issue 16
items 4, 5, 7-9; issue 14.11; issue 15.6)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from _training_fixtures import tiny_config_dict, write_token_dataset
from megatron_longsky.checkpoint.layout import (
    clean_checkpoint_root, list_iterations, prune_checkpoints, read_latest, write_latest,
)
from megatron_longsky.cli import main as longsky
from megatron_longsky.config import ConfigError
from megatron_longsky.data.indexed import IndexedDatasetWriter
from megatron_longsky.training.config import load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_token_dataset(tmp_path_factory.mktemp("data") / "ds", num_docs=16)


def _job(tmp_path: Path, prefix: str, **top) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, prefix, **top)))
    return str(path)


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test's command if it gets as far as initialising the process group."""
    import megatron_longsky.runtime.distributed as distributed

    def refuse(*args, **kwargs):
        raise AssertionError("the run was started although its inputs are wrong")

    monkeypatch.setattr(distributed, "initialize", refuse)
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LONGSKY_DEBUG"):
        monkeypatch.delenv(key, raising=False)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO] " not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- item 7 / 15.6: the shared wrapper ---------------------------------------------------------

def test_user_error_is_one_line_and_exit_2_and_debug_adds_the_traceback(capsys, nothing_built):
    assert longsky(["train", "model.seq_length=0"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("longsky train: error:") and "model.seq_length must be >= 1, got 0" in line
    assert longsky(["--debug", "train", "model.seq_length=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "model.seq_length must be >= 1" in err.splitlines()[-1]


def test_our_bugs_keep_their_traceback_and_exit_1(capsys, monkeypatch):
    import megatron_longsky.training.plot as plot

    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(plot, "main", broken)
    assert longsky(["plot-loss", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


def test_file_errors_name_the_path_and_only_rank_0_prints(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "none" / "metrics.jsonl"
    assert longsky(["plot-loss", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys)
    monkeypatch.setenv("RANK", "1")
    assert longsky(["plot-loss", str(missing)]) == 2
    assert capsys.readouterr().err == ""


def test_usage_errors_exit_2_everywhere(capsys):
    assert longsky(["no-such-command"]) == 2
    for command in ("preprocess", "merge-datasets", "build-cip", "preprocess-sft", "convert", "plan",
                    "needle", "eval", "synl-eval", "train"):
        assert longsky([command, "--no-such-flag"]) == 2, command
    capsys.readouterr()


# --- item 8, 9 and 14.11: train checks its inputs before building anything -----------------------

def _train_error(tmp_path, prefix, capsys, *overrides, **top) -> str:
    assert longsky(["train", "--config", _job(tmp_path, prefix, **top), *overrides]) == 2
    return _one_error_line(capsys)


def test_missing_dataset_is_named_before_anything_is_built(tmp_path, dataset, capsys, nothing_built):
    line = _train_error(tmp_path, str(tmp_path / "nope"), capsys)
    assert "data.prefixes[0]" in line and f"{tmp_path / 'nope'}.idx does not exist" in line


@pytest.mark.parametrize("override, expected", [
    ("data.split=abc", "data.split='abc'"),
    ("data.split=0,1,0", "non-zero training part"),
    ("optimizer.clip_grad=-1", "optimizer.clip_grad must be >= 0"),
    ("model.seq_length=0", "model.seq_length must be >= 1"),
    ("model.hidden_size=-64", "model.hidden_size must be >= 1"),
    ("micro_batch_size=0", "micro_batch_size and global_batch_size must be >= 1"),
    ("checkpoint.init_from=/does/not/exist", "checkpoint.init_from: checkpoint not found: /does/not/exist"),
    ("checkpoint.load=/does/not/exist", "checkpoint.load=/does/not/exist: no 'latest' checkpoint"),
    ("optimizer.lr=.nan", "optimizer.lr: expected a finite number"),
    ("eval_iters=0", "eval_iters >= 1"),
])
def test_bad_values_are_config_errors(tmp_path, dataset, capsys, nothing_built, override, expected):
    assert expected in _train_error(tmp_path, dataset, capsys, override)


def test_config_combination_refused_before_building(tmp_path, dataset, capsys, nothing_built):
    line = _train_error(tmp_path, dataset, capsys, "data.kind=sft", "data.packed=true", "micro_batch_size=2",
                        "parallel.pipeline_model_parallel_size=2")
    assert "data.packed=true with pipeline parallelism needs micro_batch_size=1" in line


def test_evaluation_without_a_validation_split(tmp_path, dataset, capsys, nothing_built):
    assert "eval_interval=2" in _train_error(tmp_path, dataset, capsys, "eval_interval=2", "data.split=100,0,0")


def test_resume_with_the_other_optimizer_kind_is_refused_before_building(tmp_path, dataset, capsys, nothing_built):
    ckpt = _fake_iteration(tmp_path / "run" / "checkpoints", 4)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": {"vocab_size": 384}}))
    (ckpt / "trainer" / "state.json").write_text('{"distributed_optimizer": true, "scheduler": {}}')
    write_latest(tmp_path / "run" / "checkpoints", 4)
    line = _train_error(tmp_path, dataset, capsys)
    assert "holds distributed optimizer state" in line and "use_distributed_optimizer=True" in line


def test_token_ids_beyond_the_model_vocabulary(tmp_path, capsys, nothing_built):
    writer = IndexedDatasetWriter(tmp_path / "wide", np.uint16)
    writer.add_document(np.array([5, 999, 3], dtype=np.uint16), [3])
    writer.finalize({})  # no tokenizer sidecar: the .bin is scanned
    writer.commit()
    line = _train_error(tmp_path, str(tmp_path / "wide"), capsys, "data.check_tokenizer=off")
    assert "holds token ids up to 999" in line and "vocabulary has 384" in line


def test_world_size_that_does_not_factor(tmp_path, dataset, capsys, nothing_built, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = _train_error(tmp_path, dataset, capsys, "parallel.tensor_model_parallel_size=2")
    assert "3 processes do not factor" in line
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _train_error(tmp_path, dataset, capsys, "global_batch_size=3", "micro_batch_size=1")
    assert "global_batch_size 3 is not divisible" in line
    monkeypatch.setenv("RANK", "1")  # the other ranks fail the same way, silently
    assert longsky(["train", "--config", _job(tmp_path, dataset), "global_batch_size=3"]) == 2
    assert capsys.readouterr().err == ""


def test_unwritable_output_dir(tmp_path, dataset, capsys, nothing_built):
    (tmp_path / "file").write_text("")
    line = _train_error(tmp_path, dataset, capsys, f"output_dir={tmp_path / 'file' / 'run'}")
    assert f"output_dir={tmp_path / 'file' / 'run'} cannot be written" in line and "not a directory" in line


def test_tp_beyond_kv_groups_refused_the_same_way_by_train_and_plan(tmp_path, dataset, capsys, nothing_built):
    job = _job(tmp_path, dataset)
    assert longsky(["train", "--config", job, "parallel.tensor_model_parallel_size=3"]) == 2
    train_line = _one_error_line(capsys)
    assert longsky(["plan", "--config", job, "--nodes", "1", "--gpus-per-node", "3", "--vocab-size", "384",
                    "parallel.tensor_model_parallel_size=3"]) == 2
    plan_line = _one_error_line(capsys)
    reason = "tensor_model_parallel_size: TP=3 does not divide the 4 attention heads"
    assert reason in train_line and reason in plan_line


@pytest.mark.parametrize("flag", ["--gpu-memory-gb", "--peak-tflops"])
@pytest.mark.parametrize("value", ["0", "-80", "nan"])
def test_plan_refuses_non_positive_device_numbers(tmp_path, dataset, capsys, flag, value):
    assert longsky(["plan", "--config", _job(tmp_path, dataset), "--nodes", "1", "--vocab-size", "384",
                    flag, value]) == 2
    assert f"{flag} must be > 0" in _one_error_line(capsys)


def test_check_tokenizer_off_as_documented_and_yes_no_booleans(tmp_path, dataset):
    job = tmp_path / "job.yaml"
    text = yaml.safe_dump(tiny_config_dict(tmp_path, dataset))
    job.write_text(text.replace("split:", "check_tokenizer: off\n  split:", 1))
    assert "check_tokenizer: off" in job.read_text()  # unquoted: YAML reads it as false
    cfg = load_train_config(job, ["logging.tensorboard='no'", "data.eod_mask_loss=yes"])
    assert cfg.data.check_tokenizer == "off" and cfg.logging.tensorboard is False and cfg.data.eod_mask_loss
    with pytest.raises(ConfigError, match="YAML reads unquoted on/off/yes/no as true/false"):
        load_train_config(job, ["data.check_tokenizer=on"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_train_config(job, ["logging.tensorboard=maybe"])


def test_convert_import_refuses_nan_weights(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from test_convert import make_hf_model

    hf = tmp_path / "hf"
    make_hf_model(hf, num_key_value_heads=2)
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert longsky(["convert", "import", "--hf-dir", str(hf), "--output", str(tmp_path / "out")]) == 2
    assert "NaN/Inf values in the weights of decoder.layers.1.mlp" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# --- item 4: what a killed save or prune leaves is cleaned up, never listed ---------------------

def _fake_iteration(root: Path, iteration: int) -> Path:
    d = root / f"iter_{iteration:07d}"
    for rel in ("config.yaml", "model/metadata.json", "model/__0_0.distcp", "optimizer/metadata.json",
                "trainer/state.json"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("{}")
    return d


def test_interrupted_save_and_prune_leftovers_are_cleaned_and_never_listed(tmp_path):
    root = tmp_path / "ckpt"
    for it in (2, 4, 6):
        _fake_iteration(root, it)
    write_latest(root, 6)
    (root / f".latest.tmp-{os.getpid() + 10**6}").write_text("iter_0000008\n")  # killed while writing latest
    (root / ".iter_0000008.partial" / "model").mkdir(parents=True)  # killed while saving
    shutil.rmtree(root / "iter_0000002" / "trainer")  # an old-style prune killed midway
    (root / "iter_0000002" / "config.yaml").unlink()
    (root / ".iter_0000001.deleting" / "model").mkdir(parents=True)  # a prune killed after its rename
    assert list_iterations(root) == [4, 6]
    removed = clean_checkpoint_root(root)
    assert sorted(removed) == sorted([".latest.tmp-" + str(os.getpid() + 10**6), ".iter_0000008.partial",
                                      "iter_0000002", ".iter_0000001.deleting"])
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000006", "latest"]
    assert read_latest(root) == root / "iter_0000006"


def test_prune_killed_midway_leaves_no_iteration_name(tmp_path, monkeypatch):
    import megatron_longsky.checkpoint.layout as layout

    root = tmp_path / "ckpt"
    for it in (2, 4, 6):
        _fake_iteration(root, it)
    write_latest(root, 6)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.endswith(".deleting") and Path(path).exists():
            (Path(path) / "config.yaml").unlink()  # part of it gone, then the process dies
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(layout.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(root, keep=2)
    assert not (root / "iter_0000002").exists() and (root / ".iter_0000002.deleting").exists()
    assert list_iterations(root) == [4, 6]
    monkeypatch.setattr(layout.shutil, "rmtree", real_rmtree)
    assert clean_checkpoint_root(root) == [".iter_0000002.deleting"]


def test_resave_killed_between_renames_gets_the_old_iteration_back(tmp_path):
    root = tmp_path / "ckpt"
    _fake_iteration(root, 4)
    write_latest(root, 4)
    os.replace(root / "iter_0000004", root / ".iter_0000004.old")
    clean_checkpoint_root(root)
    assert read_latest(root) == root / "iter_0000004" and list_iterations(root) == [4]


# --- item 5: the trainer's helpers die with it ---------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_trainer_leaves_no_helper_process_and_no_open_stdout(tmp_path, dataset):
    job = _job(tmp_path, dataset, train_iters=100000, checkpoint={"save_interval": 0})
    from megatron_longsky.testing.multiprocess import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_longsky.cli", "train", "--config", job],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (
                metrics.exists() and metrics.stat().st_size):  # training steps: every helper is up
            time.sleep(0.2)
        helpers = _children(proc.pid)  # the checkpoint writer's queue server, multiprocessing's tracker
        if proc.poll() is not None:
            pytest.fail(f"the trainer ended (status {proc.returncode}) before training:\n{proc.communicate()[0][-3000:]}")
        assert helpers, "the trainer started no helper process"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)  # reaches end-of-file only when no process holds the pipe
        deadline = time.monotonic() + 60
        while any(map(_alive, helpers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, helpers)), f"helpers {helpers} outlived the trainer"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("command", [["needle"], ["eval", "passkey"], ["synl-eval", "--data", "x.jsonl"]])
def test_eval_commands_check_their_output_before_loading_a_model(tmp_path, capsys, nothing_built, command):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "report"
    argv = [*command[:2], "--checkpoint", str(tmp_path / "ckpt"), "--output", str(out), *command[2:]]
    if command[0] == "synl-eval":
        record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                  "meta": {"answer": "a", "family": "f", "kind": "k", "id": "x"}}
        (tmp_path / "x.jsonl").write_text(json.dumps(record) + "\n")
        argv = [command[0], "--checkpoint", str(tmp_path / "ckpt"), "--output", str(out), "--data",
                str(tmp_path / "x.jsonl")]
    assert longsky(argv) == 2
    assert f"--output={out} cannot be written" in _one_error_line(capsys)
