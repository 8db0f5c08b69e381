"""Quickstart data stages: corpus, tokenizer, preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_longsky.quickstart.context import Context


def build_corpus(ctx: Context) -> dict:
    from megatron_longsky.data.builtin_corpus import build_builtin_corpus

    train = build_builtin_corpus(ctx.path("corpus/train.jsonl"), max_bytes=ctx.cfg.corpus_bytes,
                                 seed=ctx.cfg.seed, split="train")
    heldout = build_builtin_corpus(ctx.path("corpus/heldout.jsonl"), max_bytes=ctx.cfg.heldout_bytes,
                                   seed=ctx.cfg.seed, split="heldout")
    return {"train": _summary(train), "heldout": _summary(heldout)}


def _summary(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}


def build_tokenizer_stage(ctx: Context) -> dict:
    if ctx.cfg.tokenizer == "byte":
        return {"type": "byte", "model": None}
    from megatron_longsky.tokenizer import train_bpe_tokenizer

    def texts():
        with open(ctx.path("corpus/train.jsonl"), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    out = train_bpe_tokenizer(texts(), ctx.cfg.bpe_vocab_size, ctx.path("tokenizer"))
    return {"type": "hf", "model": str(out)}


def preprocess_corpus(ctx: Context) -> dict:
    from megatron_longsky.data.preprocess import PreprocessConfig, preprocess

    results = {}
    for split in ("train", "heldout"):
        stats = preprocess(PreprocessConfig(
            inputs=[str(ctx.path(f"corpus/{split}.jsonl"))],
            output_prefix=str(ctx.path(f"data/{split}")),
            tokenizer=ctx.tokenizer_config(),
            append_eod=True,
            workers=ctx.cfg.workers if split == "train" else 1,
            progress=False,
        ))
        results[split] = {
            "prefix": stats.outputs["text"],
            "documents": stats.documents,
            "tokens": stats.total_tokens,
            "seconds": round(stats.seconds, 2),
            "tokens_per_second": round(stats.total_tokens / max(stats.seconds, 1e-9)),
        }
    return results


def dataset_prefix(ctx: Context, split: str) -> str:
    return ctx.runner.results("preprocess")[split]["prefix"]


def exists(path: str | Path) -> bool:
    return Path(path).exists()
