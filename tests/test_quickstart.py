"""The quickstart end to end, shrunk: every stage runs for real, for a few steps."""

import json
from pathlib import Path

import pytest

from megatron_longsky.quickstart import run
from megatron_longsky.quickstart.config import QuickstartConfig

# Multi-process / end-to-end: run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow

SMALL = dict(
    corpus_bytes=400_000, heldout_bytes=120_000, workers=1,
    num_layers=2, hidden_size=64, ffn_hidden_size=176,
    base_seq_length=128, long_seq_length=512, base_iters=4, cpt_iters=3, sft_iters=3, long_sft_iters=3,
    global_batch_size=4, micro_batch_size=2, sft_samples=64, synl_samples=12, synl_eval_samples=3,
    synl_min_tokens=150, synl_max_tokens=400, needle_lengths=[256, 512], needle_depths=2, needle_samples=1,
)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart")
    report = run(QuickstartConfig(**SMALL), run_dir)
    return run_dir, report


def test_quickstart_report_has_every_stage(quickstart_run):
    run_dir, report = quickstart_run
    text = Path(report).read_text(encoding="utf-8")
    for heading in ("## Data", "### CIP data", "## Training", "## Held-out perplexity", "## Needle in a haystack",
                    "## SynL accuracy", "## The paper's claims", "## Hugging Face export"):
        assert heading in text, heading
    # The graded needle view: one fraction per stage and length, read from the sweep's cases.
    assert "Answer tokens predicted" in text
    needle_state = json.loads((run_dir / "state.json").read_text())["stages"]["needle_long_sft"]["results"]
    assert set(needle_state["token_accuracy_per_length"]) == {str(n) for n in SMALL["needle_lengths"]}
    assert all(0.0 <= v <= 1.0 for v in needle_state["token_accuracy_per_length"].values())
    # Every picture the report shows exists.
    for line in text.splitlines():
        if line.startswith("!["):
            assert (run_dir / line.split("](")[1].rstrip(")")).exists(), line
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    for stage in ("base", "cpt", "cpt_concat", "sft", "long_sft"):
        assert state[stage]["results"]["iterations"] == SMALL[
            {"base": "base_iters", "cpt": "cpt_iters", "cpt_concat": "cpt_iters", "sft": "sft_iters",
             "long_sft": "long_sft_iters"}[stage]]
    assert state["cpt"]["results"]["context_parallel"] == 2
    assert state["cpt"]["results"]["seq_length"] == 4 * SMALL["base_seq_length"]


def test_quickstart_exports_a_transformers_model(quickstart_run):
    import transformers

    run_dir, _ = quickstart_run
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    assert model.config.num_hidden_layers == SMALL["num_layers"]


def test_quickstart_rerun_resumes_without_recomputing(quickstart_run):
    run_dir, report = quickstart_run
    before = (run_dir / "state.json").read_text()
    run(QuickstartConfig(**SMALL), run_dir)
    assert (run_dir / "state.json").read_text() == before
