"""benchmarks/retrieval_formation.py: the variables run side by side and change what is trained."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval_formation.py"


def _module():
    spec = importlib.util.spec_from_file_location("retrieval_formation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_parse_into_typed_overrides():
    mod = _module()
    assert mod.parse_variants("loss=all;loss=copy,vocab=64,init_std=0,ffn=0") == [
        {"loss": "all"}, {"loss": "copy", "vocab": 64, "init_std": 0.0, "ffn": 0}]
    with pytest.raises(SystemExit):
        mod.parse_variants("heads=2")


def test_attention_only_blocks_and_default_init():
    mod = _module()
    plain = mod.Decoder(16, 32, 2, 2, 0, 0.0)
    assert not hasattr(plain.blocks[0], "gate_up")
    swiglu = mod.Decoder(16, 32, 2, 2, 48, 0.02)
    assert abs(swiglu.blocks[0].qkv.weight.std().item() - 0.02) < 0.005
    # PyTorch's default linear init: uniform, std 1/sqrt(3 * fan_in)
    assert abs(plain.blocks[0].qkv.weight.std().item() - (3 * 32) ** -0.5) < 0.02


@pytest.mark.slow  # a subprocess / megatron-core import: tens of seconds on a loaded machine
def test_side_by_side_table_one_column_per_variant():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--tasks", "random", "--steps", "2", "--every", "1", "--batch", "2",
         "--seq", "32", "--segment", "4", "--vocab", "16", "--layers", "1", "--hidden", "32", "--heads", "2",
         "--ffn", "32", "--variants", "loss=all;loss=copy,ffn=0"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    header = next(line for line in out.splitlines() if line.startswith("| step |"))
    assert header == "| step | random [loss=all] | random [loss=copy,ffn=0] |"
    assert sum(line.startswith("| 1 |") or line.startswith("| 2 |") for line in out.splitlines()) == 2


def test_chunks_targets_continue_a_run_of_the_source():
    import random

    mod = _module()
    rng = random.Random(0)
    for _ in range(20):
        ids, copy = mod.make_sample("chunks", rng, 128, 64, 8)
        assert len(ids) == len(copy) == 129 and not any(copy[:32]) and sum(copy) > 64
        source = ids[:32]
        for i, target in enumerate(copy):
            if target:  # the pair ending at a target occurs in the source: a content match predicts it
                assert any(source[j:j + 2] == ids[i - 1:i + 1] for j in range(31))


def test_output_rows_beyond_the_task_and_vocabulary_growth_keep_the_task_rows():
    import torch

    mod = _module()
    model = mod.Decoder(64, 32, 1, 2, 0, 0.02, embed_std=1.0, out_vocab=256)
    assert model.embed.weight.shape[0] == model.head.weight.shape[0] == 256
    small = mod.Decoder(64, 32, 1, 2, 0, 0.02, embed_std=1.0)
    embed, head = small.embed.weight.detach().clone(), small.head.weight.detach().clone()
    mod.expand_vocabulary(small, 256, 0.02, 1.0)
    assert small.head.weight.shape == (256, 32)
    assert torch.equal(small.embed.weight[:64], embed) and torch.equal(small.head.weight[:64], head)
    tied = mod.Decoder(64, 32, 1, 2, 0, 0.02, tie=1)
    assert tied.head.weight is tied.embed.weight
