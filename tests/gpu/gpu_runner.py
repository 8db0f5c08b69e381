"""Runs one tests/gpu/scenarios.py scenario in a process of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run_scenario(name: str, work: Path, args: dict | None = None, cpu: bool = False, timeout: int = 300,
                 extra_env: dict | None = None) -> dict:
    """Run ``scenarios.py NAME`` in a fresh process (``extra_env`` added to its environment);
    its result, or a pytest skip."""
    from megatron_longsky.testing.multiprocess import free_port

    env = {k: v for k, v in os.environ.items() if k != "LONGSKY_DEVICE"}
    if cpu:
        env["LONGSKY_DEVICE"] = "cpu"
    env.update(MASTER_PORT=str(free_port()), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    proc = subprocess.run([sys.executable, str(HERE / "scenarios.py"), name, str(work), json.dumps(args or {})],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise AssertionError(f"scenario {name} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result
