"""Quickstart data stages: corpus, tokenizer, preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_longsky.quickstart.context import Context


def build_corpus(ctx: Context) -> dict:
    from megatron_longsky.data.builtin_corpus import build_builtin_corpus

    train = build_builtin_corpus(ctx.path("corpus/train.jsonl"), max_bytes=ctx.cfg.corpus_bytes,
                                 seed=ctx.cfg.seed, split="train", recall_fraction=ctx.cfg.recall_fraction,
                                 drill_fraction=ctx.cfg.drill_fraction,
                                 drill_repeat_share=ctx.cfg.drill_repeat_share)
    heldout = build_builtin_corpus(ctx.path("corpus/heldout.jsonl"), max_bytes=ctx.cfg.heldout_bytes,
                                   seed=ctx.cfg.seed, split="heldout")
    return {"train": _summary(train), "heldout": _summary(heldout)}


def _summary(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
    if isinstance(stats.get("bytes_by_source"), dict):
        out["bytes_by_source"] = dict(stats["bytes_by_source"])
    return out


def build_tokenizer_stage(ctx: Context) -> dict:
    if ctx.cfg.tokenizer == "byte":
        return {"type": "byte", "model": None}
    from megatron_longsky.tokenizer import train_bpe_tokenizer

    def texts():
        with open(ctx.path("corpus/train.jsonl"), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    out = train_bpe_tokenizer(texts(), ctx.cfg.bpe_vocab_size, ctx.path("tokenizer"),
                              split_digits=ctx.cfg.bpe_split_digits)
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
            workers=ctx.cfg.workers if split != "heldout" else 1,
            progress=False,
            overwrite=True,  # the quickstart owns its output directory: a re-run stage replaces its data
        ))
        results[split] = {
            "prefix": stats.outputs["text"],
            "documents": stats.documents,
            "tokens": stats.total_tokens,
            "seconds": round(stats.seconds, 2),
            "tokens_per_second": round(stats.total_tokens / max(stats.seconds, 1e-9)),
        }
    return results


def build_curriculum(ctx: Context) -> dict:
    """The retrieval curriculum's two SFT datasets (tokens + loss masks) at the base length:
    the warm-up (retrieval samples alone) and the base mix (corpus text windows with recall
    samples). Their non-text samples go to ``corpus/retrieval_*.jsonl`` for the unseen check;
    off (``{}``) unless ``retrieval_curriculum``."""
    import numpy as np

    from megatron_longsky.data.indexed import bin_path, index_dtype
    from megatron_longsky.data.retrieval_curriculum import Mix, SampleMaker, read_documents, write_curriculum

    cfg = ctx.cfg
    if not cfg.retrieval_curriculum:
        return {}
    train = dataset_prefix(ctx, "train")  # the preprocessed corpus: its tokens, EOD after each document
    maker = SampleMaker(ctx.tokenizer(), read_documents(ctx.path("corpus/train.jsonl")), cfg.base_seq_length,
                        seed=cfg.seed + 17, alphabet=cfg.curriculum_alphabet,
                        induction_alphabet=cfg.induction_alphabet, induction_segment=cfg.induction_segment,
                        induction_skip=cfg.induction_skip,
                        stream=np.fromfile(bin_path(train), dtype=index_dtype(train)))
    out = {}
    if cfg.copy_warmup_iters > 0:
        warmup = Mix(induction=cfg.warmup_induction, repeat_small=cfg.warmup_repeat_small,
                     repeat_words=cfg.warmup_repeat_words, recall=cfg.warmup_recall)
        vocabulary = {}
        if cfg.copy_warmup_alphabet_vocab:  # the warm-up model's vocabulary is the alphabet alone
            from megatron_longsky.data.retrieval_curriculum import write_alphabet_tokenizer
            from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer

            alphabet = write_alphabet_tokenizer(ctx.tokenizer_config().model, maker.induction_ids,
                                                ctx.path("tokenizer_alphabet"))
            vocabulary = {"tokenizer": build_tokenizer(TokenizerConfig(type="hf", model=alphabet["dir"])),
                          "remap": alphabet["remap"]}
        out["warmup"] = write_curriculum(maker, warmup, cfg.copy_warmup_iters * cfg.global_batch_size,
                                         ctx.path("data/curriculum_warmup"),
                                         ctx.path("corpus/retrieval_warmup.jsonl"), **vocabulary)
        if vocabulary:
            out["warmup"].update(tokenizer=alphabet["dir"], vocab_size=alphabet["vocab_size"])
        if cfg.keyed_warmup_iters > 0:  # after the copy, in the same vocabulary
            out["keyed"] = write_curriculum(maker, Mix(keyed=1.0), cfg.keyed_warmup_iters * cfg.global_batch_size,
                                            ctx.path("data/curriculum_keyed"),
                                            ctx.path("corpus/retrieval_keyed.jsonl"), **vocabulary)
            if vocabulary:
                out["keyed"].update(tokenizer=alphabet["dir"], vocab_size=alphabet["vocab_size"])
    base = Mix(recall=cfg.base_recall_share, induction=cfg.base_induction_share, keyed=cfg.base_keyed_share,
               text=1.0 - cfg.base_recall_share - cfg.base_induction_share - cfg.base_keyed_share)
    out["base"] = write_curriculum(maker, base, cfg.base_iters * cfg.global_batch_size,
                                   ctx.path("data/curriculum_base"), ctx.path("corpus/retrieval_base.jsonl"))
    for name in out:
        out[name]["share_of_base_samples"] = round(
            out[name]["samples"] / sum(o["samples"] for o in out.values()), 4)
    return out


def dataset_prefix(ctx: Context, split: str) -> str:
    return ctx.runner.results("preprocess")[split]["prefix"]


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def _tokenizer_flags(ctx: Context) -> list[str]:
    tok = ctx.tokenizer_config()
    flags = ["--tokenizer-type", tok.type]
    if tok.model:
        flags += ["--tokenizer-model", tok.model]
    return flags


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} exited with status {code}")


def build_cip_data(ctx: Context) -> dict:
    """CIP sequences at the long length, and plain concatenation of the same documents."""
    from megatron_longsky.data.cip import CIPConfig, build_cip

    cfg = ctx.cfg
    out = {}
    for mode in ("cip", "concat") if cfg.ablation else ("cip",):
        manifest = build_cip(CIPConfig(
            input_prefixes=[dataset_prefix(ctx, "train")],
            output_prefix=str(ctx.path(f"data/{mode}_{cfg.long_seq_length}")),
            seq_length=cfg.long_seq_length,
            docs_per_seq=cfg.cip_docs_per_seq,
            chunks_per_doc=cfg.cip_chunks_per_doc,
            mode=mode,
            seed=cfg.seed,
        ), overwrite=True)
        stats = manifest.get("statistics", {})
        detail = stats.get(mode) or {}
        summary = {k: v for k, v in detail.items() if isinstance(v, (int, float, str))}
        summary.update({k: v for k, v in stats.items() if isinstance(v, (int, float, str))})
        out[mode] = {"prefix": str(ctx.path(f"data/{mode}_{cfg.long_seq_length}")), "statistics": summary}
        if cfg.cpt_recall_share > 0:
            out[mode]["recall_mix"] = _cpt_recall_mix(ctx, mode, out[mode]["prefix"])
        distance = detail.get("chunk_distance")
        if isinstance(distance, dict):
            out[mode]["chunk_distance"] = {
                "mean": distance.get("mean"), "min": distance.get("min"), "max": distance.get("max"),
                **{f"p{k}": v for k, v in (distance.get("percentiles") or {}).items()}}
    return out


def _cpt_recall_mix(ctx: Context, mode: str, prefix: str) -> dict:
    """CPT samples: whole ``prefix`` sequences (loss on every token) and ``cpt_recall_share``
    recall samples at the long length (loss on the values), the same recall samples for CIP
    and concatenation (same seed), so the ablation stays paired."""
    import numpy as np

    from megatron_longsky.data.indexed import bin_path, index_dtype
    from megatron_longsky.data.retrieval_curriculum import Mix, SampleMaker, read_documents, write_curriculum

    cfg = ctx.cfg
    maker = SampleMaker(ctx.tokenizer(), read_documents(ctx.path("corpus/train.jsonl")), cfg.long_seq_length,
                        seed=cfg.seed + 29, stream=np.fromfile(bin_path(prefix), dtype=index_dtype(prefix)),
                        aligned_text=True)
    mix = Mix(text=1.0 - cfg.cpt_recall_share, recall=cfg.cpt_recall_share)
    return write_curriculum(maker, mix, cfg.cpt_iters * cfg.long_global_batch_size,
                            ctx.path(f"data/cpt_{mode}_mix"), ctx.path(f"corpus/retrieval_cpt_{mode}.jsonl"))


def build_sft_data(ctx: Context) -> dict:
    from megatron_longsky.quickstart.chat_data import build_chat_data
    from megatron_longsky.sft.preprocess import main as preprocess_sft

    chat = ctx.path("sft/chat.jsonl")
    written = build_chat_data(ctx.path("corpus/train.jsonl"), chat, ctx.cfg.sft_samples, seed=ctx.cfg.seed)
    prefix = ctx.path("data/sft_chat")
    _check(preprocess_sft(["--input", str(chat), "--output-prefix", str(prefix), "--max-length",
                           str(ctx.cfg.base_seq_length), "--overlong", "drop", "--no-progress", "--overwrite",
                           *_tokenizer_flags(ctx)]), "preprocess-sft")
    return {"samples": written, "prefix": str(prefix), "jsonl": str(chat)}


def build_synl_data(ctx: Context) -> dict:
    """SynL tables for long SFT (mixed with general-text continuations, ``long_sft_general``
    of the records), and a held-out SynL set (another seed) for accuracy."""
    from megatron_longsky.quickstart.chat_data import build_continuation_data
    from megatron_longsky.sft.preprocess import main as preprocess_sft
    from megatron_longsky.synl.generate import main as build_synl

    cfg = ctx.cfg
    train_jsonl, heldout_jsonl = ctx.path("synl/train.jsonl"), ctx.path("synl/heldout.jsonl")
    general_jsonl = ctx.path("synl/general.jsonl")
    prefix = ctx.path("data/synl")
    common = ["--min-tokens", str(cfg.synl_min_tokens), "--max-tokens", str(cfg.synl_max_tokens),
              "--format", cfg.synl_format, "--no-progress", "--overwrite", *_tokenizer_flags(ctx)]
    _check(build_synl(["--output", str(train_jsonl), "--num-samples", str(cfg.synl_samples),
                       "--seed", str(cfg.seed), *common]), "build-synl")
    _check(build_synl(["--output", str(heldout_jsonl), "--num-samples", str(cfg.synl_eval_samples),
                       "--seed", str(cfg.seed + 1_000_003), *common]), "build-synl (held out)")
    inputs = [str(train_jsonl)]
    general = round(cfg.synl_samples * cfg.long_sft_general / (1.0 - cfg.long_sft_general))
    if general:
        build_continuation_data(ctx.path("corpus/train.jsonl"), general_jsonl, general, seed=cfg.seed + 7)
        inputs.append(str(general_jsonl))
    _check(preprocess_sft(["--input", *inputs, "--output-prefix", str(prefix), "--max-length",
                           str(cfg.long_seq_length), "--overlong", "drop", "--no-progress", "--overwrite",
                           *_tokenizer_flags(ctx)]), "preprocess-sft (long SFT)")
    return {"prefix": str(prefix), "jsonl": str(train_jsonl), "heldout_jsonl": str(heldout_jsonl),
            "samples": cfg.synl_samples, "heldout_samples": cfg.synl_eval_samples, "general_samples": general,
            "format": cfg.synl_format,
            "train_counts": synl_counts(train_jsonl), "heldout_counts": synl_counts(heldout_jsonl)}


def synl_counts(path: Path) -> dict:
    """Questions per ``family/kind`` and generator fallbacks (``fallback/<drawn>-><asked>``)."""
    from collections import Counter

    counts: Counter = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            meta = json.loads(line)["meta"]
            counts[f"{meta['family']}/{meta['kind']}"] += 1
            if meta.get("fallback"):
                counts[f"fallback/{meta['fallback']}"] += 1
    return dict(sorted(counts.items()))


def _needle_samples(ctx: Context) -> tuple[list, object]:
    """Every prompt of the needle sweeps the evaluation runs (alone, and with distractors)."""
    from megatron_longsky.eval.needle import NeedleBuilder, NeedleConfig

    cfg = ctx.cfg
    samples, builder = [], None
    for distractors in sorted({0, cfg.needle_distractors}):
        builder = NeedleBuilder(NeedleConfig(lengths=cfg.needle_lengths, num_depths=cfg.needle_depths,
                                             samples=cfg.needle_samples, seed=cfg.seed, mode="base",
                                             num_distractors=distractors), ctx.tokenizer())
        samples += [builder.build(*point) for point in builder.grid()]
    return samples, builder.haystack


def check_needle_sweeps(ctx: Context) -> dict:
    """Build every needle prompt once the tokenizer exists: a sweep that cannot be built (e.g.
    too many distractors for the shortest length) is refused before any training, not after it."""
    samples, _ = _needle_samples(ctx)
    return {"prompts": len(samples), "needles": sum(len(s.needles) for s in samples)}


def check_evaluation_unseen(ctx: Context) -> dict:
    """Count the needle sweep's values and haystack sentences that occur in the training
    corpus (they should not: the evaluation must measure retrieval, not memory)."""
    samples, haystack = _needle_samples(ctx)
    values = sorted({n["value"] for sample in samples for n in sample.needles})
    texts = []
    for split in ("train", "retrieval_warmup", "retrieval_keyed", "retrieval_base", "retrieval_cpt_cip",
                  "retrieval_cpt_concat"):
        if ctx.path(f"corpus/{split}.jsonl").exists():
            with open(ctx.path(f"corpus/{split}.jsonl"), encoding="utf-8") as f:
                texts += [json.loads(line)["text"] for line in f]
    text = "\n".join(texts)
    sentences = haystack.sentences[:500]
    return {"needle_values": len(values), "needle_values_in_training": sum(v in text for v in values),
            "haystack_sentences_checked": len(sentences),
            "haystack_sentences_in_training": sum(s in text for s in sentences)}
