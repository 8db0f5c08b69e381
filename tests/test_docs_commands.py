"""The commands in the docs run as written: every `longsky` command line in README.md and
docs/*.md names a real subcommand with options it accepts, and the Python example of
docs/training.md runs as a script at tiny scale."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longsky.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S)


def _longsky_commands(path: Path) -> list[list[str]]:
    """Each `longsky ...` command of the file's shell blocks, as words (continuations joined,
    comments, environment assignments and `srun ...` prefixes dropped)."""
    found = []
    for block in _shell_blocks(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or "longsky " not in line:
                continue
            words = shlex.split(line.replace("$", "X"), comments=True)
            if "longsky" not in words:
                continue
            found.append(words[words.index("longsky") + 1:])
    return found


def _help(argv: list[str]) -> str:
    module = importlib.import_module(COMMANDS[argv[0]][0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(argv[1:] + ["--help"])
    return out.getvalue()


def test_every_documented_longsky_command_and_option_exists():
    helps: dict[tuple, str] = {}
    checked = 0
    for path in DOCS:
        for words in _longsky_commands(path):
            assert words and words[0] in COMMANDS, f"{path.name}: unknown command `longsky {' '.join(words)}`"
            key = tuple(words[:2]) if words[0] in ("convert", "eval") and len(words) > 1 else (words[0],)
            if key not in helps:
                helps[key] = _help(list(key))
            for word in words[1:]:
                if word.startswith("--"):
                    flag = word.split("=", 1)[0]
                    assert flag in helps[key], f"{path.name}: `longsky {' '.join(key)}` has no option {flag}"
            checked += 1
    assert checked > 30


@pytest.mark.slow
def test_training_python_example_runs_as_a_script(tmp_path):
    from _training_fixtures import write_token_dataset

    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    example = re.search(r"In Python.*?```python\n(.*?)```", text, flags=re.S).group(1)
    assert 'if __name__ == "__main__":' in example
    (tmp_path / "examples" / "configs").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "configs" / "tiny_pretrain.yaml", tmp_path / "examples" / "configs")
    (tmp_path / "runs" / "data").mkdir(parents=True)
    write_token_dataset(tmp_path / "runs" / "data" / "corpus_text_document", num_docs=200)
    # Tiny scale: fewer iterations than the example's 50.
    script = tmp_path / "example.py"
    script.write_text(example.replace('"train_iters=50"', '"train_iters=3", "eval_interval=0", '
                                      '"logging.tensorboard=false"'))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    iteration, loss = result.stdout.split()[-2:]
    assert iteration == "3" and float(loss) > 0
