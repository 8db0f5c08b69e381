"""Assemble the quickstart's REPORT.md from the stages' recorded results."""

from __future__ import annotations

import math
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
    distracted = _distractor_table(ctx, models)
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
    ] + distracted)
    return text, results


def _distractor_table(ctx: Context, models: list[str]) -> list[str]:
    """The same sweep with distractor needles (other keys, never asked about)."""
    n = ctx.cfg.needle_distractors
    if not n or not all(ctx.runner.results(f"needle_distractors_{m}") for m in models):
        return []
    lengths = ctx.cfg.needle_lengths
    rows = [[TITLES[m]] + [f"{ctx.runner.results(f'needle_distractors_{m}')['per_length'].get(str(L), 0.0):.0%}"
                           for L in lengths] for m in models]
    return ["", f"The same sweep with {n} distractor needle{'s' if n > 1 else ''} (the same wording with "
            "other keys and values, never asked about): a model that copies whatever follows the needle's "
            f"wording, without matching the key, finds the asked value about {1 / (n + 1):.0%} as often as "
            "above. Matching the key is what a table lookup needs (SynL below): every row has the same "
            "wording.", "",
            table(["model"] + [f"{L} tokens" for L in lengths], rows)]


def _token_accuracy(ctx: Context, model: str, lengths: list[int]) -> str:
    per = ctx.runner.results(f"needle_{model}").get("token_accuracy_per_length") or {}
    values = [per[str(n)] for n in lengths if str(n) in per]
    return f"{sum(values) / len(values):.1%}" if values else "n/a"


def plot_loss_by_position(summary: dict, out_path: Path) -> Path:
    """Held-out loss per position bucket, one line per stage, the base length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_longsky.utils.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in summary["models"]:
        buckets = [b for b in summary["loss_by_position"][model] if b["end"] > b["start"]]
        centers = [math.sqrt(b["start"] * max(b["start"], b["end"] - 1)) for b in buckets]
        ax.plot(centers, [b["loss"] for b in buckets], "o-", label=TITLES.get(model, model))
    ax.axvline(summary["base_length"], color="gray", linestyle="--", label=f"base length {summary['base_length']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in a held-out window (tokens, bucketed)")
    ax.set_ylabel("loss (NLL per token)")
    ax.set_title("Held-out loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_path


def _claims_section(summary: dict) -> str:
    from megatron_longsky.quickstart.claims import claim_rows

    unseen = summary.get("evaluation_unseen") or {}
    return "\n".join([
        "## The recipe's claims, in miniature", "",
        table(["claim", "expected", "measured", "verdict", "seed(s)"], claim_rows(summary)), "",
        f"Evaluation data in the training corpus: {unseen.get('needle_values_in_training', 'n/a')} of "
        f"{unseen.get('needle_values', 'n/a')} needle values, {unseen.get('haystack_sentences_in_training', 'n/a')} "
        f"of {unseen.get('haystack_sentences_checked', 'n/a')} haystack sentences checked; held-out documents "
        "and SynL tables come from a separate split and seed.", "",
        "Numbers from this run's own evaluations (machine-readable in `summary.json`). A tiny model after "
        "minutes of CPU training: they show which way the effects point at this scale, not the paper's "
        "results."])


def _loss_section(ctx: Context, summary: dict) -> str:
    png = plot_loss_by_position(summary, ctx.path("figures/loss_by_position.png"))
    L = summary["base_length"]
    rows = [[TITLES[m], f"{summary['loss_within_base_length'][m]:.3f}", f"{summary['loss_beyond_base_length'][m]:.3f}",
             f"{summary['perplexity'][m]:.2f}", ctx.runner.results(f"ppl_{m}")["documents"]]
            for m in summary["models"]]
    return "\n".join([
        f"## Held-out loss by position (natural text, {summary['long_length']} tokens)", "",
        f"Each held-out document of at least {summary['long_length']} tokens gives one window at a seeded "
        "random offset (not its start: the built-in documents open with formulaic lines, such as "
        "\"The X class of module.\", licences and imports, which made early positions look easy for "
        "every model).", "",
        image(png, ctx.run_dir, "held-out loss by position, one line per stage"), "",
        table(["model", f"loss at positions < {L}", f"loss at positions >= {L}", "perplexity", "documents"], rows)])


def _synl_section(ctx: Context, summary: dict) -> str:
    res = ctx.runner.results
    kinds = sorted({k for m in summary["synl"] for k in summary["synl"][m]})
    models = [m for m in ("sft", "long_sft") if m in summary["synl"]]
    rows = []
    for kind in kinds:
        row = [kind, summary["synl_questions"][models[-1]].get(kind, 0)]
        for m in models:
            acc, credit = summary["synl"][m].get(kind), summary["synl_partial_credit"][m].get(kind)
            row += [f"{acc:.0%}" if acc is not None else "-", f"{credit:.2f}" if credit is not None else "-"]
        rows.append(row)
    overall = ["all", res(f"synl_{models[-1]}")["total"]]
    for m in models:
        r = res(f"synl_{m}")
        overall += [f"{r['accuracy']:.0%}", f"{r.get('partial_credit', 0.0):.2f}"]
    rows.append(overall)
    gen = summary.get("synl_generation", {})
    fallbacks = {split: {k: v for k, v in counts.items() if k.startswith("fallback")} for split, counts in gen.items()}
    fallback_text = "; ".join(f"{split}: " + (", ".join(f"{k[len('fallback/'):]}={v}" for k, v in sorted(f.items()))
                                               or "none") for split, f in fallbacks.items())
    headers = ["question kind", "questions"] + [h for m in models for h in (f"{TITLES[m]} exact", f"{TITLES[m]} partial")]
    return "\n".join([
        "## SynL accuracy (held-out tables, per question kind)", "",
        "Exact match of the final answer, and partial credit (1 for an exact match, otherwise the string "
        "similarity of the final answer to the reference, 0-1). Greedy decoding under the chat template.", "",
        table(headers, rows), "",
        f"Generator fallbacks (a drawn kind that could not be asked on its table, replaced by another): {fallback_text}."])


def build_report(ctx: Context, models: list[str], wall_seconds: float) -> Path:
    from megatron_longsky.quickstart.summary import build_summary, write_summary

    cfg, res = ctx.cfg, ctx.runner.results
    summary = build_summary(ctx, models)
    write_summary(ctx.run_dir, summary)
    sections = [
        "# megatron_longsky quickstart report",
        f"The LongSkywork recipe end to end on a tiny model, on CPU ({platform.machine()}, "
        f"{__import__('os').cpu_count()} cores). Stages took {ctx.runner.total_seconds() / 60:.1f} minutes in "
        f"total ({wall_seconds / 60:.1f} in this invocation; {ctx.runner.total_cpu_seconds() / 60:.1f} CPU "
        f"minutes). Tokenizer: {res('tokenizer')['type']}"
        + (f" ({cfg.bpe_vocab_size} tokens, trained on the training corpus)" if cfg.tokenizer == "bpe" else "")
        + f"; seed {cfg.seed}.",
        _claims_section(summary),
    ]
    prep = res("preprocess")
    sections.append("## Data\n\n" + table(
        ["dataset", "documents", "tokens", "tokens/s"],
        [[split, prep[split]["documents"], prep[split]["tokens"], prep[split]["tokens_per_second"]]
         for split in ("train", "heldout")]))
    by_source = res("corpus").get("train", {}).get("bytes_by_source")
    if by_source:
        total = sum(by_source.values()) or 1
        sections.append(
            "Training corpus by source (share of bytes): " + ", ".join(
                f"{k} {v / total:.0%}" for k, v in sorted(by_source.items()))
            + (". `drill`: recall drills, made-up key -> value facts each asked about further on, and lines "
               "repeated verbatim (dense copy targets)" if "drill" in by_source else "")
            + ("; `recall`: documents with made-up facts recalled further on" if "recall" in by_source else "")
            + ". Made-up keys, wording and 3-6 digit values differ from the needle test's"
            + ("; digits are single tokens" if cfg.tokenizer == "bpe" and cfg.bpe_split_digits else "") + ".")
    curriculum = _curriculum_section(ctx)
    if curriculum:
        sections.append(curriculum)
    cip_lines = []
    for mode, info in res("cip_data").items():
        stats = info["statistics"]
        cip_lines.append(f"- `{mode}` at {cfg.long_seq_length} tokens: " + ", ".join(
            f"{k}={v}" for k, v in stats.items()))
        if "chunk_distance" in info:
            cip_lines.append("  - distance between consecutive chunks of a document: " + ", ".join(
                f"{k}={v}" for k, v in info["chunk_distance"].items()))
        mix = info.get("recall_mix")
        if mix:
            counts = mix["counts"]
            cip_lines.append(f"  - CPT on `{mode}` trains on {mix['samples']} samples of {cfg.long_seq_length} tokens: "
                             f"{counts.get('text', 0)} whole `{mode}` sequences (loss on every token) and "
                             f"{counts.get('recall', 0)} recall samples (made-up key -> 3-6 digit value facts among "
                             "corpus lines, asked at the end; loss on the values; the same samples for both CPT runs)")
    sections.append("### CIP data\n\n" + "\n".join(cip_lines))
    sections.append(f"### SFT data\n\n- standard SFT: {res('sft_data')['samples']} built-in instruction samples\n"
                    f"- long SFT: {res('synl_data')['samples']} SynL samples "
                    f"({cfg.synl_min_tokens}-{cfg.synl_max_tokens} table tokens, "
                    f"{res('synl_data').get('format', 'mixed')} tables), mixed with "
                    f"{res('synl_data').get('general_samples', 0)} general-text continuations of training "
                    f"documents (so long SFT keeps the language model); "
                    f"{res('synl_data')['heldout_samples']} held-out SynL samples (another seed) for accuracy")
    train_stages = ["base", "cpt"] + (["cpt_concat"] if cfg.ablation else []) + ["sft", "long_sft"]
    rows = []
    warmup = res("base").get("copy_warmup")
    for s in train_stages:
        r = res(s)
        if s == "base" and warmup:
            for title, w in (("base: retrieval warm-up", warmup), ("base: keyed warm-up", warmup.get("keyed"))):
                if w:
                    rows.append([title, w["seq_length"], w["rope_base"], w["context_parallel"], w["processes"],
                                 w["iterations"], w["first_loss"], w["final_loss"],
                                 f"{w['tokens_per_s']:.0f}" if w.get("tokens_per_s") else "-"])
        rows.append([TITLES[s], r["seq_length"], r["rope_base"], r["context_parallel"], r["processes"],
                     r["iterations"], r["first_loss"], r["final_loss"],
                     f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"])
    sections.append("## Training\n\n" + table(
        ["stage", "seq length", "RoPE base", "CP", "processes", "iterations", "first loss", "final loss",
         "tokens/s"], rows) + "\n\n" + "\n".join(
        image(res(s)["loss_png"], ctx.run_dir, f"loss {s}") for s in train_stages))
    sections.append(_loss_section(ctx, summary))
    needle_text, _ = _needle_section(ctx, models)
    sections.append(needle_text)
    sections.append(_synl_section(ctx, summary))
    sections.append(_timings_section(ctx))
    exp = res("export")
    sections.append(f"## Hugging Face export\n\nThe long-SFT model was exported to `{exp['dir']}` "
                    f"({exp['architectures']}, rope_theta={exp['rope_theta']}); it loads with "
                    "`transformers.AutoModelForCausalLM.from_pretrained` and no custom code.")
    return write_report(ctx.run_dir, sections)


def _curriculum_section(ctx: Context) -> str:
    """The retrieval curriculum: the miniature's stand-in for a pretrained model that retrieves."""
    cfg, cur = ctx.cfg, ctx.runner.results("curriculum")
    if not cur:
        return ""
    warm, keyed, base = cur.get("warmup"), cur.get("keyed"), cur["base"]
    iters = (cfg.copy_warmup_iters if warm else 0) + (cfg.keyed_warmup_iters if keyed else 0) + cfg.base_iters
    total_tokens = sum(c["tokens"] for c in cur.values())
    retrieval_kinds = ("recall", "induction", "induction_text", "keyed")
    retrieval_tokens = (warm["tokens"] if warm else 0) + (keyed["tokens"] if keyed else 0) + base["tokens"] * sum(
        base["counts"].get(k, 0) for k in retrieval_kinds) / max(1, base["samples"])
    lines = [
        "### Retrieval curriculum (the stand-in for a pretrained model that already retrieves)",
        "",
        "The real recipe starts from a pretrained model that retrieves within its trained length; a tiny "
        "model trained on natural text alone for a few minutes never learns to copy from its context "
        "(benchmarks/RESULTS.md, \"Retrieval formation\"). The base stage therefore opens with a retrieval "
        "curriculum (`megatron_longsky/data/retrieval_curriculum.py`), samples of "
        f"{cfg.base_seq_length} tokens in SFT form with the loss on the copied tokens only:",
        "",
    ]
    if warm:
        lines.append(f"- warm-up, {cfg.copy_warmup_iters} of {iters} base iterations "
                     f"({cfg.copy_warmup_iters / iters:.0%}), retrieval samples alone: "
                     + ", ".join(f"{k} {v}" for k, v in warm["counts"].items())
                     + f" samples; {warm['target_tokens']} loss tokens of {warm['tokens']}"
                     + (f"; trained by a model whose vocabulary is the alphabet's {warm['vocab_size']} tokens "
                        "(specials included), then grown to the tokenizer's vocabulary row by row "
                        "(`megatron_longsky/convert/grow_vocab.py`) and imported" if warm.get("tokenizer") else ""))
    if keyed:
        lines.append(f"- then {cfg.keyed_warmup_iters} of {iters} base iterations ({cfg.keyed_warmup_iters / iters:.0%}) "
                     f"on keyed samples alone ({keyed['samples']} samples, {keyed['target_tokens']} loss tokens of "
                     f"{keyed['tokens']}), in the warm-up's vocabulary: the key match, once the copy has formed")
    mixed = ", ".join(f"{k} {base['counts'][k]}" for k in retrieval_kinds if base["counts"].get(k))
    skipped = f" after the first {cfg.induction_skip}" if cfg.induction_skip else ""
    lines.append(f"- then {cfg.base_iters} iterations on training-corpus text windows (loss on every token) "
                 f"mixed with retrieval samples ({mixed or 'none'} of {base['samples']} samples)")
    lines.append(f"- retrieval samples are {retrieval_tokens / max(1, total_tokens):.0%} of the base stage's "
                 "tokens. `induction`: chunks copied from a random source over "
                 f"{cfg.induction_alphabet} of the corpus's frequent tokens (the digits, then the most frequent"
                 f"{skipped}) "
                 "(`induction_text`: from a corpus-text window), loss on each chunk after its first token; "
                 "`repeat_small`: a line over a small alphabet repeated (loss on the repeat); "
                 "`repeat_words`: the same with corpus words; `keyed`: records `key sep value` over the same "
                 "alphabet, one separator for all, asked again (loss on the values: only the key tells them "
                 "apart); `recall`: made-up key -> 3-6 digit value facts "
                 "among corpus lines, then questions and answer prefixes (loss on the values). Keys, wording, "
                 "values and filler are never the needle test's (see the unseen check).")
    return "\n".join(lines)


def _timings_section(ctx: Context) -> str:
    rows = [[name, f"{r.seconds:.1f}", f"{r.cpu_seconds:.1f}"] for name, r in ctx.runner.records.items()]
    rows.append(["total", f"{ctx.runner.total_seconds():.1f}", f"{ctx.runner.total_cpu_seconds():.1f}"])
    return "## Stage timings\n\nWall seconds and CPU seconds (this process and its subprocesses); on a " \
           "shared machine CPU seconds / cores estimates the idle wall time.\n\n" + table(
               ["stage", "wall s", "CPU s"], rows)
