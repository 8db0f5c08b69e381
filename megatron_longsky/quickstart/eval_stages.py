"""Quickstart evaluation: needle sweep, held-out perplexity, SynL accuracy, HF export."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_longsky.quickstart.context import Context
from megatron_longsky.quickstart.launch import run_longsky


def needle(ctx: Context, model: str, distractors: int = 0) -> dict:
    cfg = ctx.cfg
    ckpt = ctx.runner.results(model)["checkpoint"]
    name = f"needle_distractors_{distractors}" if distractors else "needle"
    out = ctx.path(f"eval/{model}/{name}")
    run_longsky(["needle", "--checkpoint", ckpt, "--lengths", ",".join(map(str, cfg.needle_lengths)),
                 "--depths", str(cfg.needle_depths), "--samples", str(cfg.needle_samples),
                 "--seed", str(cfg.seed), "--mode", "base", "--distractors", str(distractors), "--output", str(out)],
                ctx.path(f"logs/{name}_{model}.log"))
    data = json.loads((out / "needle.json").read_text(encoding="utf-8"))
    return {"dir": str(out), "json": str(out / "needle.json"), "accuracy": data["accuracy"],
            "per_length": data["per_length"], "longest_length_all_passed": data["longest_length_all_passed"],
            "token_accuracy_per_length": _token_accuracy_per_length(data)}


def _token_accuracy_per_length(data: dict) -> dict:
    """Mean fraction of the answer's tokens that are the argmax (teacher-forced), per
    length: a graded signal where a tiny model's exact matches are all zero."""
    per: dict = {}
    for cell in data["cells"]:
        fractions = per.setdefault(str(cell["length"]), [])
        for sample in cell["samples"]:
            fractions += [case["correct_tokens"] / case["answer_tokens"] for case in sample["cases"]]
    return {length: sum(f) / len(f) for length, f in per.items() if f}


def perplexity(ctx: Context, model: str, length: int) -> dict:
    from megatron_longsky.quickstart.data_stages import dataset_prefix

    ckpt = ctx.runner.results(model)["checkpoint"]
    out = ctx.path(f"eval/{model}/ppl_{length}")
    run_longsky(["eval", "ppl", "--checkpoint", ckpt, "--data", f"indexed:{dataset_prefix(ctx, 'heldout')}",
                 "--length", str(length), "--max-documents", str(ctx.cfg.ppl_documents), "--output", str(out),
                 # Windows at random offsets: the built-in documents open with formulaic lines
                 # ("The X class of module.", licences, imports) that made early positions easy.
                 "window=random", f"seed={ctx.cfg.seed}"],
                ctx.path(f"logs/ppl_{model}_{length}.log"))
    files = sorted(out.glob("*.json"))
    if not files:
        raise RuntimeError(f"longsky eval ppl wrote no JSON into {out}")
    data = json.loads(files[0].read_text(encoding="utf-8"))
    return {"dir": str(out), "documents": data["documents"], "overall_nll": data["overall_nll"],
            "overall_ppl": data["overall_ppl"], "buckets": data["buckets"],
            "per_document_nll_sum": data.get("per_document_nll_sum", [])}


def synl_accuracy(ctx: Context, model: str) -> dict:
    ckpt = ctx.runner.results(model)["checkpoint"]
    out = ctx.path(f"eval/{model}/synl")
    run_longsky(["synl-eval", "--checkpoint", ckpt, "--data", ctx.runner.results("synl_data")["heldout_jsonl"],
                 "--output", str(out)], ctx.path(f"logs/synl_{model}.log"))
    data = json.loads((out / "synl_eval.json").read_text(encoding="utf-8"))
    return {k: data[k] for k in ("accuracy", "correct", "total", "partial_credit", "by_kind", "by_family",
                                 "examples")}


def export_hf(ctx: Context) -> dict:
    path = ctx.path("hf_model")
    run_longsky(["convert", "export", "--checkpoint", ctx.runner.results("long_sft")["checkpoint"],
                 "--output", str(path), "--overwrite"], ctx.path("logs/export.log"))
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return {"dir": str(path), "rope_theta": config.get("rope_theta"), "architectures": config.get("architectures"),
            "max_position_embeddings": config.get("max_position_embeddings")}
