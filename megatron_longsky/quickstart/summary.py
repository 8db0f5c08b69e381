"""The quickstart's numbers, machine-readable (``summary.json``), and the statistics
behind the claims table: loss within and beyond the base length, needle accuracy per
length, SynL accuracy per question kind, and paired CIP-vs-concatenation tests.

Models are named ``base``, ``cpt``, ``cpt_concat``, ``sft``, ``long_sft``; lengths are
strings (JSON keys). Every number here is read from the stages' recorded results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_longsky.quickstart.context import Context


def loss_split(buckets: list[dict], base_length: int) -> tuple[float, float]:
    """Mean held-out loss (NLL per token) at positions < and >= ``base_length``, from
    position buckets (``start``/``end``/``tokens``/``nll``); buckets straddling the
    base length are counted by their start."""
    sums = {True: [0.0, 0], False: [0.0, 0]}
    for b in buckets:
        if b["tokens"]:
            s = sums[b["start"] < base_length]
            s[0] += b["nll"] * b["tokens"]
            s[1] += b["tokens"]
    within, beyond = sums[True], sums[False]
    return (within[0] / within[1] if within[1] else math.nan, beyond[0] / beyond[1] if beyond[1] else math.nan)


def document_losses_beyond(ppl: dict, base_length: int) -> list[float]:
    """Per held-out document, the mean loss at positions >= ``base_length``."""
    edges = [(b["start"], b["end"]) for b in ppl["buckets"]]
    out = []
    for sums in ppl.get("per_document_nll_sum") or []:
        nll = sum(s for s, (lo, _hi) in zip(sums, edges) if lo >= base_length)
        tokens = sum(hi - lo for lo, hi in edges if lo >= base_length)
        out.append(nll / tokens if tokens else math.nan)
    return out


def needle_passes(needle_json: str | Path, length: int) -> list[bool]:
    """Pass/fail of every needle sample at ``length``, in grid order (depth, sample)."""
    data = json.loads(Path(needle_json).read_text(encoding="utf-8"))
    cells = sorted((c for c in data["cells"] if c["length"] == length), key=lambda c: c["depth_percent"])
    return [bool(s["passed"]) for c in cells for s in sorted(c["samples"], key=lambda s: s["sample"])]


def sign_test(a: list[bool], b: list[bool]) -> dict:
    """Paired comparison of two models on the same cases (exact two-sided sign test on
    the discordant pairs, McNemar's exact form)."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal case lists ({len(a)} vs {len(b)})")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"cases": len(a), "only_first": only_a, "only_second": only_b, "p_value": p}


def paired_mean_difference(a: list[float], b: list[float]) -> dict:
    """Mean of ``a - b`` over paired items, its standard error and an approximate 95%
    interval (t quantile for the sample size)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs equal, non-empty lists ({len(a)} vs {len(b)})")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.inf
    se = sd / math.sqrt(n)
    # two-sided 97.5% t quantiles for small samples; 1.96 beyond 30
    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
         12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09}
    half = t.get(n - 1, 2.05 if n <= 30 else 1.96) * se
    return {"items": n, "mean_difference": mean, "standard_error": se, "ci95": [mean - half, mean + half],
            "first_lower": sum(d < 0 for d in diffs)}


def build_summary(ctx: Context, models: list[str]) -> dict:
    cfg, res = ctx.cfg, ctx.runner.results
    summary: dict = {
        "base_length": cfg.base_seq_length,
        "long_length": cfg.long_seq_length,
        "seed": cfg.seed,
        "models": models,
        "needle": {}, "needle_samples_per_length": cfg.needle_depths * cfg.needle_samples,
        "synl": {}, "synl_partial_credit": {}, "synl_questions": {},
        "perplexity": {}, "loss_within_base_length": {}, "loss_beyond_base_length": {},
        "loss_by_position": {},
    }
    for m in models:
        needle = res(f"needle_{m}")
        summary["needle"][m] = {str(n): needle["per_length"].get(str(n), 0.0) for n in cfg.needle_lengths}
        distracted = res(f"needle_distractors_{m}")
        if distracted:
            summary["needle_distractors"] = cfg.needle_distractors
            summary.setdefault("needle_with_distractors", {})[m] = {
                str(n): distracted["per_length"].get(str(n), 0.0) for n in cfg.needle_lengths}
        ppl = res(f"ppl_{m}")
        summary["perplexity"][m] = ppl["overall_ppl"]
        within, beyond = loss_split(ppl["buckets"], cfg.base_seq_length)
        summary["loss_within_base_length"][m] = within
        summary["loss_beyond_base_length"][m] = beyond
        summary["loss_by_position"][m] = [{"start": b["start"], "end": b["end"], "loss": b["nll"]}
                                          for b in ppl["buckets"]]
    for m in ("sft", "long_sft"):
        if m in models:
            synl = res(f"synl_{m}")
            kinds = synl.get("by_kind", {})
            summary["synl"][m] = {k: v["accuracy"] for k, v in kinds.items()}
            summary["synl_partial_credit"][m] = {k: v["partial_credit"] for k, v in kinds.items()}
            summary["synl_questions"][m] = {k: v["total"] for k, v in kinds.items()}
    synl_data = res("synl_data")
    summary["synl_generation"] = {"train": synl_data.get("train_counts", {}),
                                  "heldout": synl_data.get("heldout_counts", {})}
    summary["evaluation_unseen"] = res("eval_unseen")
    curriculum = res("curriculum")
    if curriculum:
        warm = curriculum.get("warmup")
        summary["retrieval_curriculum"] = {
            "warmup_iters": cfg.copy_warmup_iters if warm else 0, "base_iters": cfg.base_iters,
            "warmup_samples": warm["counts"] if warm else {}, "base_samples": curriculum["base"]["counts"],
            "warmup_share_of_base_iters": round(
                (cfg.copy_warmup_iters if warm else 0) / ((cfg.copy_warmup_iters if warm else 0) + cfg.base_iters), 4)}
    summary["stage_seconds"] = {n: round(r.seconds, 1) for n, r in ctx.runner.records.items()}
    summary["stage_cpu_seconds"] = {n: round(r.cpu_seconds, 1) for n, r in ctx.runner.records.items()}
    summary["comparisons"] = comparisons(ctx, models)
    return summary


def comparisons(ctx: Context, models: list[str]) -> dict:
    """CIP vs concatenation on the same documents and steps: paired over the same needle
    cases at the long length, and over the same held-out documents beyond the base length."""
    if "cpt_concat" not in models:
        return {}
    cfg, res = ctx.cfg, ctx.runner.results
    long = cfg.long_seq_length
    needle = sign_test(needle_passes(res("needle_cpt")["json"], long), needle_passes(res("needle_cpt_concat")["json"], long))
    loss = paired_mean_difference(document_losses_beyond(res("ppl_cpt"), cfg.base_seq_length),
                                  document_losses_beyond(res("ppl_cpt_concat"), cfg.base_seq_length))
    return {"cip_vs_concat": {"needle_at_long_length": needle, "loss_beyond_base_length": loss}}


def write_summary(run_dir: Path, summary: dict) -> Path:
    from megatron_longsky.utils.atomic import atomic_write_json

    path = Path(run_dir) / "summary.json"
    atomic_write_json(path, summary)
    return path
