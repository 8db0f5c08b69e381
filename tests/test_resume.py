"""Exact resume and preemption, through the real command line in subprocesses.

A run SIGKILLed at an arbitrary step and restarted with the same command reproduces
the uninterrupted run's losses bitwise (CPU); SIGTERM and SIGUSR1 save a checkpoint at
the end of the current step and exit 0, and resuming from it is exact too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_longsky.checkpoint.layout import list_iterations, read_latest
from megatron_longsky.training.metrics import read_metrics

from _training_fixtures import tiny_config_dict, write_token_dataset

# Multi-process / end-to-end: run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow

ITERS = 30


def _write_config(tmp: Path, name: str, prefix: str, **extra) -> Path:
    cfg = tiny_config_dict(tmp, prefix, train_iters=ITERS, output_dir=str(tmp / name), **extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "megatron_longsky.training.cli", "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _free_port() -> int:
    from megatron_longsky.testing.multiprocess import free_port

    return free_port()


def _last_iteration(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    records = read_metrics(metrics)
    return records[-1]["iteration"] if records else 0


def _interrupt_after(proc: subprocess.Popen, metrics: Path, iteration: int, sig: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _last_iteration(metrics) < iteration:
        if proc.poll() is not None:
            pytest.fail(f"run ended (status {proc.returncode}) before iteration {iteration}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("run did not reach the interruption point in time")
        time.sleep(0.01)
    # To the whole process group, as a node failure (SIGKILL) or Slurm (SIGTERM) would.
    os.killpg(proc.pid, sig)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


def _losses(metrics: Path) -> list[float]:
    records = read_metrics(metrics)
    assert [r["iteration"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return tmp, write_token_dataset(tmp / "ds")


def test_sigkill_then_resume_reproduces_losses_bitwise_and_sigterm_exits_cleanly(workspace):
    tmp, prefix = workspace
    # Three runs side by side: uninterrupted, SIGKILLed mid-run, SIGTERMed mid-run.
    reference = _launch(_write_config(tmp, "reference", prefix, checkpoint={"save_at_end": False}))
    killed_cfg = _write_config(tmp, "killed", prefix, checkpoint={"save_interval": 4, "keep_last": 2})
    term_cfg = _write_config(tmp, "term", prefix)
    killed, term = _launch(killed_cfg), _launch(term_cfg)

    _interrupt_after(term, tmp / "term" / "metrics.jsonl", 3, signal.SIGTERM)
    _interrupt_after(killed, tmp / "killed" / "metrics.jsonl", 11, signal.SIGKILL)
    status, out = _finish(term)
    # SIGTERM: a checkpoint after the current step, then a clean exit.
    assert status == 0, out
    assert "preempted" in out
    stopped_at = _last_iteration(tmp / "term" / "metrics.jsonl")
    assert 3 <= stopped_at < ITERS, out
    assert read_latest(tmp / "term" / "checkpoints").name == f"iter_{stopped_at:07d}"

    status, out = _finish(killed)
    assert status == -signal.SIGKILL, out
    ckpt_root = tmp / "killed" / "checkpoints"
    latest_before = read_latest(ckpt_root)
    assert latest_before is not None and latest_before.name >= "iter_0000008", out
    assert _last_iteration(tmp / "killed" / "metrics.jsonl") < ITERS, "the run finished before it was killed"

    status, out = _finish(reference)
    assert status == 0, out
    expected = _losses(tmp / "reference" / "metrics.jsonl")
    assert len(expected) == ITERS

    # Restart both with their original commands: they resume from 'latest'.
    resumed_kill, resumed_term = _launch(killed_cfg), _launch(term_cfg)
    for proc in (resumed_kill, resumed_term):
        status, out = _finish(proc)
        assert status == 0, out
        assert "resumed from" in out
    assert _losses(tmp / "killed" / "metrics.jsonl") == expected  # bitwise, step for step
    assert _losses(tmp / "term" / "metrics.jsonl") == expected
    # keep_last=2: older checkpoints were pruned; the newest is the final one.
    assert list_iterations(ckpt_root)[-1] == ITERS and len(list_iterations(ckpt_root)) == 2


def test_sigusr1_is_handled_like_sigterm():
    from megatron_longsky.training.signals import PreemptionHandler

    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
