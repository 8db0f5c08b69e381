"""Assemble the quickstart's REPORT.md from the stages' recorded results."""

from __future__ import annotations

import platform
from pathlib import Path

from megatron_longsky.quickstart.context import Context
from megatron_longsky.quickstart.report import image, table, write_report

TITLES = {"base": "base (short)", "cpt": "CPT on CIP", "cpt_concat": "CPT on concatenation",
          "sft": "SFT", "long_sft": "long SFT (SynL)"}


def _needle_section(ctx: Context, models: list[str]) -> tuple[str, dict]:
    from megatron_longsky.eval.report import load_result, write_comparison

    results = {TITLES[m]: load_result(ctx.runner.results(f"needle_{m}")["json"]) for m in models}
    paths = write_comparison(results, ctx.path("figures"), name="needle_heatmaps")
    lengths = ctx.cfg.needle_lengths
    rows = []
    for m in models:
        r = ctx.runner.results(f"needle_{m}")
        rows.append([TITLES[m]] + [f"{r['per_length'].get(str(n), 0.0):.0%}" for n in lengths]
                    + [f"{r['accuracy']:.0%}", r["longest_length_all_passed"] or "none"])
    token_rows = [[TITLES[m]] + [_token_accuracy(ctx, m, [n]) for n in lengths] for m in models]
    text = "\n".join([
        "## Needle in a haystack (after each stage)", "",
        f"Teacher-forced exact match of the needle's value (base mode), {ctx.cfg.needle_depths} depths x "
        f"{ctx.cfg.needle_samples} needles per length, fixed seed {ctx.cfg.seed}. "
        f"Base training length: {ctx.cfg.base_seq_length} tokens.", "",
        image(paths["png"], ctx.run_dir, "needle heatmaps, one per stage"), "",
        table(["model"] + [f"{n} tokens" for n in lengths] + ["overall", "longest length all passed"], rows),
        "",
        "Answer tokens predicted (teacher-forced argmax, mean fraction of the value's tokens, a graded "
        "view of the same cases; the value's first token can be the space before its digits, which a "
        "model gets without retrieving anything):", "",
        table(["model"] + [f"{n} tokens" for n in lengths], token_rows),
    ])
    return text, results


def _token_accuracy(ctx: Context, model: str, lengths: list[int]) -> str:
    per = ctx.runner.results(f"needle_{model}").get("token_accuracy_per_length") or {}
    values = [per[str(n)] for n in lengths if str(n) in per]
    return f"{sum(values) / len(values):.1%}" if values else "n/a"


def _long_lengths(ctx: Context) -> list[int]:
    """The needle lengths beyond the base training length."""
    return [n for n in ctx.cfg.needle_lengths if n > ctx.cfg.base_seq_length]


def _beyond_base(ctx: Context, model: str) -> float:
    r = ctx.runner.results(f"needle_{model}")
    long = _long_lengths(ctx)
    return sum(r["per_length"].get(str(n), 0.0) for n in long) / max(1, len(long))


def _claims(ctx: Context) -> str:
    cfg = ctx.cfg
    lines = ["## The paper's claims, in miniature", ""]
    before, after = _beyond_base(ctx, "sft"), _beyond_base(ctx, "long_sft")
    long = _long_lengths(ctx)
    verdict = "lifted" if after > before else ("did not change" if after == before else "lowered")
    lines.append(
        f"- **Does long SFT lift needle accuracy beyond the base length?** Mean needle accuracy at lengths "
        f"> {cfg.base_seq_length} tokens: {before:.1%} after SFT, {after:.1%} after long SFT on SynL: "
        f"long SFT {verdict} it here. Answer tokens predicted at those lengths: "
        f"{_token_accuracy(ctx, 'sft', long)} after SFT, {_token_accuracy(ctx, 'long_sft', long)} after long SFT.")
    synl_before, synl_after = ctx.runner.results("synl_sft"), ctx.runner.results("synl_long_sft")
    lines.append(
        f"- **SynL accuracy (held-out, exact match):** {synl_before['correct']}/{synl_before['total']} after SFT, "
        f"{synl_after['correct']}/{synl_after['total']} after long SFT.")
    if cfg.ablation:
        cip, concat = ctx.runner.results("ppl_cpt"), ctx.runner.results("ppl_cpt_concat")
        n_cip, n_cat = _beyond_base(ctx, "cpt"), _beyond_base(ctx, "cpt_concat")
        better = "lower (better)" if cip["overall_ppl"] < concat["overall_ppl"] else "not lower"
        lines.append(
            f"- **Does CIP help compared with plain concatenation?** Same documents, same steps: held-out "
            f"perplexity at {cfg.long_seq_length} tokens is {cip['overall_ppl']:.3f} after CPT on CIP vs "
            f"{concat['overall_ppl']:.3f} on concatenation ({better} with CIP); needle accuracy beyond the base "
            f"length {n_cip:.1%} vs {n_cat:.1%}.")
    lines += ["", "These are a tiny model's numbers after minutes of CPU training: they show the pipeline "
              "works end to end and which way the effects point at this scale, not the paper's results."]
    return "\n".join(lines)


def build_report(ctx: Context, models: list[str], wall_seconds: float) -> Path:
    cfg, res = ctx.cfg, ctx.runner.results
    sections = [
        "# megatron_longsky quickstart report",
        f"The LongSkywork recipe end to end on a tiny model, on CPU ({platform.machine()}, "
        f"{__import__('os').cpu_count()} cores). Stages took {ctx.runner.total_seconds() / 60:.1f} minutes in "
        f"total ({wall_seconds / 60:.1f} in this invocation). Tokenizer: {res('tokenizer')['type']}.",
    ]
    prep = res("preprocess")
    sections.append("## Data\n\n" + table(
        ["dataset", "documents", "tokens", "tokens/s"],
        [[split, prep[split]["documents"], prep[split]["tokens"], prep[split]["tokens_per_second"]]
         for split in ("train", "heldout")]))
    cip_lines = []
    for mode, info in res("cip_data").items():
        stats = info["statistics"]
        cip_lines.append(f"- `{mode}` at {cfg.long_seq_length} tokens: " + ", ".join(
            f"{k}={v}" for k, v in stats.items()))
        if "chunk_distance" in info:
            cip_lines.append("  - distance between consecutive chunks of a document: " + ", ".join(
                f"{k}={v}" for k, v in info["chunk_distance"].items()))
    sections.append("### CIP data\n\n" + "\n".join(cip_lines))
    sections.append(f"### SFT data\n\n- standard SFT: {res('sft_data')['samples']} built-in instruction samples\n"
                    f"- long SFT: {res('synl_data')['samples']} SynL samples "
                    f"({cfg.synl_min_tokens}-{cfg.synl_max_tokens} table tokens), "
                    f"{res('synl_data')['heldout_samples']} held out for accuracy")
    train_stages = ["base", "cpt"] + (["cpt_concat"] if cfg.ablation else []) + ["sft", "long_sft"]
    rows = []
    for s in train_stages:
        r = res(s)
        rows.append([TITLES[s], r["seq_length"], r["rope_base"], r["context_parallel"], r["processes"],
                     r["iterations"], r["first_loss"], r["final_loss"],
                     f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"])
    sections.append("## Training\n\n" + table(
        ["stage", "seq length", "RoPE base", "CP", "processes", "iterations", "first loss", "final loss",
         "tokens/s"], rows) + "\n\n" + "\n".join(
        image(res(s)["loss_png"], ctx.run_dir, f"loss {s}") for s in train_stages))
    ppl_rows = [[TITLES[m], res(f"ppl_{m}")["documents"], res(f"ppl_{m}")["overall_ppl"]] for m in models]
    sections.append(f"## Held-out perplexity at {cfg.long_seq_length} tokens\n\n" + table(
        ["model", "documents", "perplexity"], ppl_rows))
    needle_text, _ = _needle_section(ctx, models)
    sections.append(needle_text)
    synl_rows = []
    for m in ("sft", "long_sft"):
        r = res(f"synl_{m}")
        synl_rows.append([TITLES[m], r["correct"], r["total"], f"{r['accuracy']:.1%}"])
    sections.append("## SynL accuracy (held-out questions, exact match)\n\n" + table(
        ["model", "correct", "total", "accuracy"], synl_rows))
    sections.append(_claims(ctx))
    exp = res("export")
    sections.append(f"## Hugging Face export\n\nThe long-SFT model was exported to `{exp['dir']}` "
                    f"({exp['architectures']}, rope_theta={exp['rope_theta']}); it loads with "
                    "`transformers.AutoModelForCausalLM.from_pretrained` and no custom code.")
    return write_report(ctx.run_dir, sections)
