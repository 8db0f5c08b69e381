"""The quickstart end to end, shrunk: every stage runs for real, for a few steps (slow);
and the report's statistics and claims rules on hand-made numbers (fast)."""

import json
import math
import random
from pathlib import Path

import pytest

from megatron_longsky.quickstart import run
from megatron_longsky.quickstart.claims import claim_rows
from megatron_longsky.quickstart.config import QuickstartConfig
from megatron_longsky.quickstart.summary import loss_split, paired_mean_difference, sign_test

MODELS = ("base", "cpt", "cpt_concat", "sft", "long_sft")

# Multi-process / end-to-end: run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow

SMALL = dict(
    corpus_bytes=400_000, heldout_bytes=120_000, workers=1,
    num_layers=2, hidden_size=64, ffn_hidden_size=176,
    base_seq_length=128, long_seq_length=512, base_iters=4, cpt_iters=3, sft_iters=3, long_sft_iters=3,
    global_batch_size=4, micro_batch_size=2, long_global_batch_size=4, long_micro_batch_size=2, sft_samples=64, synl_samples=12, synl_eval_samples=3,
    synl_min_tokens=150, synl_max_tokens=400, needle_lengths=[128, 512], needle_depths=2, needle_samples=1,
    ppl_documents=4, retrieval_curriculum=True, copy_warmup_iters=2, warmup_induction=0.5,
    base_induction_share=0.25, embedding_init_std=1.0,
)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart")
    report = run(QuickstartConfig(**SMALL), run_dir)
    return run_dir, report


@pytest.mark.slow
def test_quickstart_report_has_every_stage(quickstart_run):
    run_dir, report = quickstart_run
    text = Path(report).read_text(encoding="utf-8")
    for heading in ("## The recipe's claims", "## Data", "### CIP data", "## Training", "## Held-out loss by position",
                    "## Needle in a haystack", "## SynL accuracy", "## Stage timings", "## Hugging Face export"):
        assert heading in text, heading
    # The claims table comes first, one row per claim.
    assert text.index("## The recipe's claims") < text.index("## Data")
    claims = text[text.index("| claim |"):].split("\n\n")[0].splitlines()
    assert len(claims) == 2 + 5, claims
    # The graded needle view: one fraction per stage and length, read from the sweep's cases.
    assert "Answer tokens predicted" in text
    assert "The same sweep with 1 distractor needle" in text
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
    # The retrieval curriculum: its warm-up ran first, from scratch, and the report names it.
    assert state["base"]["results"]["copy_warmup"]["iterations"] == SMALL["copy_warmup_iters"]
    curriculum = state["curriculum"]["results"]
    assert curriculum["warmup"]["samples"] == SMALL["copy_warmup_iters"] * SMALL["global_batch_size"]
    assert sum(curriculum["base"]["counts"].values()) == SMALL["base_iters"] * SMALL["global_batch_size"]
    assert "Retrieval curriculum (the stand-in for a pretrained model that already retrieves)" in text
    assert state["eval_unseen"]["results"]["needle_values_in_training"] == 0
    assert state["cpt"]["results"]["seq_length"] == 4 * SMALL["base_seq_length"]


@pytest.mark.slow
def test_quickstart_summary_json_schema(quickstart_run):
    run_dir, _ = quickstart_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["base_length"] == SMALL["base_seq_length"] and summary["long_length"] == SMALL["long_seq_length"]
    lengths = {str(n) for n in SMALL["needle_lengths"]}
    for key in ("needle", "perplexity", "loss_within_base_length", "loss_beyond_base_length"):
        assert set(summary[key]) == set(MODELS), key
    assert all(set(summary["needle"][m]) == lengths for m in MODELS)
    assert all(0.0 <= v <= 1.0 for m in MODELS for v in summary["needle"][m].values())
    # The second sweep, with a distractor needle per sample (the default needle_distractors=1).
    assert summary["needle_distractors"] == 1
    assert set(summary["needle_with_distractors"]) == set(MODELS)
    assert all(set(summary["needle_with_distractors"][m]) == lengths for m in MODELS)
    assert all(0.0 <= v <= 1.0 for m in MODELS for v in summary["needle_with_distractors"][m].values())
    assert set(summary["synl"]) == {"sft", "long_sft"}
    heldout = summary["synl_generation"]["heldout"]
    kinds = {k for k in heldout if not k.startswith("fallback/")}
    assert set(summary["synl"]["long_sft"]) == kinds and all("/" in k for k in kinds)
    assert all(math.isfinite(summary[k][m]) for k in ("perplexity", "loss_within_base_length",
                                                      "loss_beyond_base_length") for m in MODELS)
    assert summary["comparisons"]["cip_vs_concat"]["needle_at_long_length"]["cases"] == 2
    unseen = summary["evaluation_unseen"]
    assert unseen["needle_values"] > 0 and unseen["needle_values_in_training"] == 0
    assert unseen["haystack_sentences_in_training"] == 0


@pytest.mark.slow
def test_quickstart_exports_a_transformers_model(quickstart_run):
    import transformers

    run_dir, _ = quickstart_run
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    assert model.config.num_hidden_layers == SMALL["num_layers"]


@pytest.mark.slow
def test_quickstart_rerun_resumes_without_recomputing(quickstart_run):
    run_dir, report = quickstart_run
    before = (run_dir / "state.json").read_text()
    run(QuickstartConfig(**SMALL), run_dir)
    assert (run_dir / "state.json").read_text() == before


def test_a_needle_sweep_that_cannot_be_built_stops_the_run_before_training(tmp_path):
    """Three distractors and their question do not fit in 128 tokens: refused right after the
    tokenizer exists (it used to surface in the evaluation, after every training stage)."""
    from megatron_longsky.eval.errors import EvalInputError

    with pytest.raises(EvalInputError, match="length 128 is too short"):
        run(QuickstartConfig(**{**SMALL, "needle_distractors": 3}), tmp_path)
    stages = json.loads((tmp_path / "state.json").read_text())["stages"]
    assert "tokenizer" in stages and "base" not in stages and "curriculum" not in stages


def test_loss_split_at_the_base_length():
    buckets = [{"start": 1, "end": 2, "tokens": 2, "nll": 5.0}, {"start": 2, "end": 4, "tokens": 4, "nll": 2.0},
               {"start": 4, "end": 8, "tokens": 8, "nll": 9.0}, {"start": 8, "end": 16, "tokens": 0, "nll": float("nan")}]
    within, beyond = loss_split(buckets, 4)
    assert within == pytest.approx((2 * 5.0 + 4 * 2.0) / 6)
    assert beyond == pytest.approx(9.0)


def test_sign_test_and_paired_difference():
    same = sign_test([True, False] * 10, [True, False] * 10)
    assert (same["only_first"], same["only_second"], same["p_value"]) == (0, 0, 1.0)
    lopsided = sign_test([True] * 12, [False] * 12)
    assert lopsided["only_first"] == 12 and lopsided["p_value"] == pytest.approx(2 / 2 ** 12)
    balanced = sign_test([True] * 6 + [False] * 6, [False] * 6 + [True] * 6)
    assert balanced["p_value"] == 1.0
    rng = random.Random(0)
    noise = [rng.gauss(0, 1) for _ in range(12)]
    shifted = paired_mean_difference([x - 1.0 for x in noise], noise)
    assert shifted["mean_difference"] == pytest.approx(-1.0) and shifted["ci95"][1] < 0
    unshifted = paired_mean_difference(noise, [x + rng.gauss(0, 0.1) for x in noise])
    assert unshifted["ci95"][0] < 0 < unshifted["ci95"][1]


def _summary(**changes):
    summary = {
        "base_length": 256, "long_length": 1024, "seed": 1, "needle_samples_per_length": 20,
        "loss_within_base_length": {m: 3.0 for m in MODELS},
        "loss_beyond_base_length": {"base": 4.0, "cpt": 2.8, "cpt_concat": 2.9, "sft": 2.9, "long_sft": 2.9},
        "needle": {"base": {"256": 0.9, "1024": 0.0}, "cpt": {"256": 1.0, "1024": 0.8},
                   "cpt_concat": {"256": 1.0, "1024": 0.5}, "sft": {"256": 1.0, "1024": 0.7},
                   "long_sft": {"256": 1.0, "1024": 0.7}},
        "synl": {"sft": {"retrieval/lookup": 0.1, "retrieval/match": 0.0},
                 "long_sft": {"retrieval/lookup": 0.6, "retrieval/match": 0.5}},
        "synl_questions": {"long_sft": {"retrieval/lookup": 10, "retrieval/match": 10}},
        "perplexity": {"sft": 10.0, "long_sft": 12.0},
        "comparisons": {"cip_vs_concat": {
            "needle_at_long_length": {"cases": 20, "only_first": 6, "only_second": 0, "p_value": 0.03},
            "loss_beyond_base_length": {"items": 8, "mean_difference": -0.1, "ci95": [-0.2, -0.01]}}},
    }
    for key, value in changes.items():
        summary[key] = value
    return summary


def test_claims_table_verdicts_follow_the_fixed_rules():
    rows = claim_rows(_summary())
    assert len(rows) == 5 and all(len(r) == 5 for r in rows)
    assert [r[3] for r in rows[:4]] == ["met"] * 4
    assert "larger than the noise" in rows[4][3] and "CIP lower loss" in rows[4][3]
    assert "CIP retrieves more" in rows[4][3]
    # Each rule can fail.
    failing = claim_rows(_summary(
        loss_beyond_base_length={m: 3.0 for m in MODELS},
        needle={m: {"256": 0.2, "1024": 0.2} for m in MODELS},
        synl={"sft": {"retrieval/lookup": 0.4, "retrieval/match": 0.4},
              "long_sft": {"retrieval/lookup": 0.6, "retrieval/match": 0.5}},
        perplexity={"sft": 10.0, "long_sft": 14.0},
        comparisons={"cip_vs_concat": {
            "needle_at_long_length": {"cases": 20, "only_first": 2, "only_second": 1, "p_value": 1.0},
            "loss_beyond_base_length": {"items": 8, "mean_difference": 0.01, "ci95": [-0.05, 0.07]}}}))
    assert [r[3] for r in failing[:4]] == ["**not met**"] * 4
    assert failing[4][3] == "no difference larger than the noise"


def test_single_process_stages_get_a_free_port(tmp_path, monkeypatch):
    """A one-process eval stage must not take the default port 29500 (another job may hold it)."""
    import subprocess

    from megatron_longsky.quickstart import launch

    seen = {}

    def fake_run(cmd, stdout, stderr, env):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    launch.run_longsky(["needle", "--help"], tmp_path / "log.txt")
    assert seen["MASTER_ADDR"] == "127.0.0.1" and seen["MASTER_PORT"] != "29500" and int(seen["MASTER_PORT"]) > 0


def test_scale_multiplies_every_stage_iterations():
    from megatron_longsky.quickstart import ITERATION_FIELDS, scaled

    cfg = QuickstartConfig()
    big = scaled(cfg, 4)
    assert all(getattr(big, f) == 4 * getattr(cfg, f) for f in ITERATION_FIELDS)
    assert scaled(cfg, 0.0001).base_iters == 1
    with pytest.raises(ValueError):
        scaled(cfg, 0)
