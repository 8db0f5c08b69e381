"""Issue 22: an overwrite of datasets leaves the old ones or the new ones whole at every kill point.

A subprocess overwrites an SFT pair (tokens + loss mask, as preprocess-sft / build-synl write
them) and is SIGKILLed at its k-th rename or unlink, for every k of the switch. Every reader
then sees both datasets old, or both new: never a mix, never neither."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from megatron_longsky.data.indexed import IndexedDatasetWriter, commit_datasets

    prefix, value, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tokens = IndexedDatasetWriter(prefix + "_tokens_document", np.uint16, overwrite=True)
    masks = IndexedDatasetWriter(prefix + "_loss_mask_document", np.uint8, overwrite=True)
    n = 3 + value  # the versions differ in length too
    tokens.add_document(np.full(n, value, np.uint16), [n])
    masks.add_document(np.full(n, value % 2, np.uint8), [n])
    tokens.finalize({"version": value})
    masks.finalize({"version": value})

    calls = [0]
    def killing(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call
    os.replace, os.rename, os.unlink = killing(os.replace), killing(os.rename), killing(os.unlink)
    commit_datasets([tokens, masks])
    tokens.abort(), masks.abort()
    print(calls[0])
""")


def _write(prefix: Path, value: int, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(prefix), str(value), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=120)


def _write_here(prefix: Path, value: int) -> None:
    """The same writes in this process (no kill): the old pair before each killed run."""
    from megatron_longsky.data.indexed import IndexedDatasetWriter, commit_datasets

    tokens = IndexedDatasetWriter(f"{prefix}_tokens_document", np.uint16, overwrite=True)
    masks = IndexedDatasetWriter(f"{prefix}_loss_mask_document", np.uint8, overwrite=True)
    n = 3 + value
    tokens.add_document(np.full(n, value, np.uint16), [n])
    masks.add_document(np.full(n, value % 2, np.uint8), [n])
    tokens.finalize({"version": value})
    masks.finalize({"version": value})
    commit_datasets([tokens, masks])


def _version(prefix: Path) -> tuple:
    """(tokens version, mask version, both sidecars' versions) as a reader sees them."""
    from megatron_longsky.data.index_format import read_index
    from megatron_longsky.data.metadata import read_meta

    found = []
    for name, dtype in (("tokens", np.uint16), ("loss_mask", np.uint8)):
        p = f"{prefix}_{name}_document"
        index = read_index(p)
        data = np.fromfile(p + ".bin", dtype=dtype)
        found.append((len(index.sequence_lengths), int(index.sequence_lengths[0]), data.tolist(),
                      read_meta(p)["version"]))
    (t_n, t_len, t_data, t_meta), (m_n, m_len, m_data, m_meta) = found
    version = t_meta
    assert t_len == m_len == 3 + version and t_data == [version] * t_len and m_data == [version % 2] * m_len
    return t_meta, m_meta


def test_a_kill_at_any_rename_leaves_the_old_or_the_new_pair(tmp_path):
    prefix = tmp_path / "sft"
    _write_here(prefix, 1)
    steps = int(_write(prefix, 2).stdout)
    assert steps >= 6  # at least the six renames of the two datasets
    seen = set()
    for kill_at in range(1, steps + 1):
        _write_here(prefix, 1)
        killed = _write(prefix, 2, kill_at)
        assert killed.returncode == -9, (kill_at, killed.stderr)
        versions = _version(prefix)
        assert versions in ((1, 1), (2, 2)), (kill_at, versions)
        seen.add(versions[0])
        visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
        assert visible == sorted(f"sft_{n}_document.{s}" for n in ("tokens", "loss_mask")
                                 for s in ("bin", "idx", "meta.json")), (kill_at, visible)
    assert seen == {1, 2}  # early kills keep the old pair, late ones give the new
    _write_here(prefix, 3)  # the next writer cleans whatever the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"sft_{n}_document.{s}" for n in ("tokens", "loss_mask") for s in ("bin", "idx", "meta.json"))
    assert _version(prefix) == (3, 3)
