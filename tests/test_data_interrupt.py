"""Ctrl-C / SIGTERM to the process group of multi-process data commands: they stop, remove
their temporaries and leave no process behind; a killed build-cip's temporaries go on the
next run. (Timeouts below only guard against a hang; nothing is timed.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 120
pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _wait_for(predicate, proc, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _interrupt_group(proc, sig) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=HANG_GUARD_S)
    deadline = time.monotonic() + HANG_GUARD_S
    while not _group_gone(proc.pid):  # every worker has gone too
        assert time.monotonic() < deadline, "worker processes left behind"
        time.sleep(0.05)


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("command,sig", [("preprocess", signal.SIGINT), ("preprocess", signal.SIGTERM),
                                         ("preprocess-sft", signal.SIGTERM), ("preprocess-sft", signal.SIGINT)])
def test_interrupting_the_group_of_a_two_worker_command_stops_it_and_cleans_up(tmp_path, command, sig):
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    if command == "preprocess":
        record = lambda i: {"text": f"document {i} " * 20}  # noqa: E731
        argv = ["preprocess", "--batch-lines", "1"]
        temp_bin = tmp_path / ".out_text_document.bin.tmp-{pid}"
    else:
        record = lambda i: {"messages": [{"role": "user", "content": f"q{i}"},  # noqa: E731
                                         {"role": "assistant", "content": f"a{i}"}]}
        argv = ["preprocess-sft"]
        temp_bin = tmp_path / ".out_tokens_document.bin.tmp-{pid}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_longsky.cli", *argv, "--input", str(fifo), "--output-prefix", str(out),
         "--workers", "2", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    temp_bin = Path(str(temp_bin).format(pid=proc.pid))
    try:
        with open(fifo, "w") as writer:  # blocks until the command opens the pipe
            for i in range(4000):  # more than the read-ahead window of batches: results get written while the pipe stays open
                writer.write(json.dumps(record(i)) + "\n")
            writer.flush()
            _wait_for(lambda: temp_bin.exists() and temp_bin.stat().st_size > 0, proc, "mid-write")
            _interrupt_group(proc, sig)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = proc.stderr.read()
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr, stderr
    assert [p.name for p in tmp_path.iterdir() if p != fifo] == []  # no temporary, nothing finished-looking


CIP_SCRIPT = """
import sys, time
from megatron_longsky.data import cip

original = cip.write_sequences

def write_then_wait(*args, **kwargs):
    original(*args, **kwargs)  # the temporaries are written
    print("WRITTEN", flush=True)
    time.sleep(3600)

cip.write_sequences = write_then_wait
sys.exit(cip.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_build_cip_interrupted_removes_its_temporaries_now_or_on_the_next_run(tmp_path, sig):
    from megatron_longsky.data import cip
    from megatron_longsky.data.preprocess import main as preprocess_main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * (5 + i % 7)}) + "\n" for i in range(60)))
    assert preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "in"), "--append-eod",
                            "--no-progress"]) == 0
    argv = ["--input-prefix", str(tmp_path / "in_text_document"), "--output-prefix", str(tmp_path / "cip"),
            "--seq-length", "256", "--docs-per-seq", "2", "--chunks-per-doc", "2"]
    proc = subprocess.Popen([sys.executable, "-c", CIP_SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "WRITTEN", proc.stderr.read()
        assert _temporaries(tmp_path)  # .cip.bin.tmp-<pid> and friends exist now
        _interrupt_group(proc, sig)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "cip.idx").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + sig and "Traceback" not in proc.stderr.read()
        assert _temporaries(tmp_path) == []
    else:
        assert _temporaries(tmp_path)  # a SIGKILL cannot clean up ...
        assert cip.main(argv) == 0  # ... the next run removes what the killed one left
        assert _temporaries(tmp_path) == [] and (tmp_path / "cip.idx").exists()
