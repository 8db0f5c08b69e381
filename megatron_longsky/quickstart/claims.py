"""The claims table at the top of the quickstart report, computed from ``summary.json``.

Each row: the claim, what was expected (the rule the verdict applies), what was
measured, the verdict, and the seed(s). The rules are fixed here, before any run:
a verdict is never tuned to a number.
"""

from __future__ import annotations

import math

# The rules.
EXTRAPOLATION_GAP = 0.10  # base: loss beyond L at least this many nats above loss within L
NEEDLE_BASE_MAX = 0.10  # base needle accuracy at 4L at most this
NEEDLE_AFTER_MIN = 0.60  # after CPT on CIP (or after long SFT) at least this
NEEDLE_BASE_WITHIN_MIN = 0.60  # base retrieves within L
SYNL_SIMPLE_MIN = 0.50  # lookup and match after long SFT
SYNL_MARGIN = 0.25  # and this much above the SFT model
PPL_RATIO_MAX = 1.3  # long-SFT perplexity / SFT perplexity
SIGNIFICANCE = 0.05
SIMPLE_KINDS = ("retrieval/lookup", "retrieval/match")


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def claim_rows(summary: dict) -> list[list[str]]:
    L, L4 = summary["base_length"], summary["long_length"]
    within, beyond = summary["loss_within_base_length"], summary["loss_beyond_base_length"]
    needle = summary["needle"]
    seeds = f"seed {summary['seed']}"
    rows = []

    gap_base = beyond["base"] - within["base"]
    gap_cpt = beyond["cpt"] - within["cpt"]
    rows.append([
        f"1. Length extrapolation fails before CPT and CPT at {L4} (raised RoPE base) repairs it",
        f"base: held-out loss at positions >= {L} at least {EXTRAPOLATION_GAP} nats above < {L}; "
        f"CPT: not above",
        f"base {within['base']:.2f} -> {beyond['base']:.2f} ({gap_base:+.2f}); "
        f"CPT {within['cpt']:.2f} -> {beyond['cpt']:.2f} ({gap_cpt:+.2f})",
        _verdict(gap_base >= EXTRAPOLATION_GAP and gap_cpt <= 0.0), seeds])

    key = str(L4)
    after = max(needle["cpt"][key], needle.get("long_sft", {}).get(key, 0.0))
    base_within = needle["base"].get(str(L))
    n = summary["needle_samples_per_length"]
    rows.append([
        f"2. Retrieval beyond the base length (needle at {L4})",
        f"base <= {NEEDLE_BASE_MAX:.0%} at {L4} but >= {NEEDLE_BASE_WITHIN_MIN:.0%} at {L}; "
        f"CPT on CIP or long SFT >= {NEEDLE_AFTER_MIN:.0%} at {L4}",
        f"base {_pct(needle['base'][key])} at {L4}, {_pct(base_within)} at {L}; CPT {_pct(needle['cpt'][key])}, "
        f"long SFT {_pct(needle.get('long_sft', {}).get(key))} at {L4} ({n} needles per length)",
        _verdict(needle["base"][key] <= NEEDLE_BASE_MAX and after >= NEEDLE_AFTER_MIN
                 and base_within is not None and base_within >= NEEDLE_BASE_WITHIN_MIN), seeds])

    synl = summary.get("synl", {})
    if "long_sft" in synl and "sft" in synl:
        parts, ok = [], True
        for kind in SIMPLE_KINDS:
            a, b = synl["long_sft"].get(kind), synl["sft"].get(kind)
            count = summary.get("synl_questions", {}).get("long_sft", {}).get(kind, 0)
            parts.append(f"{kind}: SFT {_pct(b)} -> long SFT {_pct(a)} ({count} questions)")
            ok = ok and a is not None and b is not None and a >= SYNL_SIMPLE_MIN and a - b >= SYNL_MARGIN
        rows.append([
            "3. Long SFT on SynL teaches table QA (held-out tables)",
            f"lookup and match >= {SYNL_SIMPLE_MIN:.0%} exact match after long SFT and at least "
            f"{SYNL_MARGIN:.0%} points above SFT",
            "; ".join(parts), _verdict(ok), seeds])

    ppl = summary["perplexity"]
    if "long_sft" in ppl and "sft" in ppl:
        ratio = ppl["long_sft"] / ppl["sft"]
        rows.append([
            "4. No collapse: natural-text perplexity after long SFT",
            f"at most {PPL_RATIO_MAX}x that after SFT (held-out text at {L4})",
            f"SFT {ppl['sft']:.2f}, long SFT {ppl['long_sft']:.2f} ({ratio:.2f}x)",
            _verdict(ratio <= PPL_RATIO_MAX), seeds])

    cmp = summary.get("comparisons", {}).get("cip_vs_concat")
    if cmp:
        nd, ls = cmp["needle_at_long_length"], cmp["loss_beyond_base_length"]
        lo, hi = ls["ci95"]
        loss_sig = lo > 0 or hi < 0
        needle_sig = nd["p_value"] < SIGNIFICANCE
        direction = []
        if loss_sig:
            direction.append("CIP lower loss" if hi < 0 else "concatenation lower loss")
        if needle_sig:
            direction.append("CIP retrieves more" if nd["only_first"] > nd["only_second"]
                             else "concatenation retrieves more")
        rows.append([
            "5. CIP vs plain concatenation (same documents, same steps)",
            f"report whether the difference exceeds the noise: paired over the same {nd['cases']} needles at "
            f"{L4} (exact sign test, p < {SIGNIFICANCE}) and the same {ls['items']} held-out documents "
            f"beyond {L} (95% interval of the loss difference excludes 0)",
            f"needle at {L4}: CIP {_pct(needle['cpt'][key])} vs concat {_pct(needle['cpt_concat'][key])} "
            f"(only CIP {nd['only_first']}, only concat {nd['only_second']}, p={nd['p_value']:.2g}); "
            f"loss beyond {L}: CIP - concat = {ls['mean_difference']:+.3f} nats [{lo:+.3f}, {hi:+.3f}]",
            ("difference larger than the noise: " + ", ".join(direction)) if direction
            else "no difference larger than the noise", seeds])
    return rows
