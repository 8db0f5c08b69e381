"""Quickstart training stages: base pretraining, CIP continual pretraining, SFT, long SFT.

Each stage writes the job YAML a user would write (``<run>/configs/<stage>.yaml``)
and runs ``longsky train`` on it; a stage starts from the previous stage's weights
through ``checkpoint.init_from`` alone.
"""

from __future__ import annotations

from pathlib import Path

from megatron_longsky.quickstart.context import Context
from megatron_longsky.quickstart.launch import run_longsky, write_yaml


def _job(ctx: Context, name: str, *, seq_length: int, rope_base: float, data: dict, iters: int,
         lr: float, init_from: str | None, cp: int = 1, decay_style: str = "cosine",
         tokenizer_dir: str | None = None) -> dict:
    """``tokenizer_dir``: another HF tokenizer than the run's (the alphabet warm-up's); the
    model's vocabulary is then exactly that tokenizer's (no padding rows)."""
    cfg = ctx.cfg
    long = seq_length > cfg.base_seq_length
    tok = ctx.tokenizer_config()
    if tokenizer_dir is not None:
        from megatron_longsky.tokenizer import TokenizerConfig

        tok = TokenizerConfig(type="hf", model=tokenizer_dir)
    return {
        "model": {"preset": "tiny", "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                  "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups,
                  "ffn_hidden_size": cfg.ffn_hidden_size, "init_method_std": cfg.init_method_std,
                  "seq_length": seq_length, "rope": {"base": rope_base},
                  **({"embedding_init_std": cfg.embedding_init_std} if cfg.embedding_init_std else {}),
                  **({"make_vocab_size_divisible_by": 1} if tokenizer_dir is not None else {})},
        "parallel": {"context_parallel_size": cp},
        "tokenizer": {"type": tok.type, "model": tok.model},
        "data": data,
        "optimizer": {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.1, "clip_grad": 1.0},
        "schedule": {"warmup_iters": max(1, iters // 10), "decay_style": decay_style},
        "checkpoint": {"save": str(ctx.path(f"checkpoints/{name}")), "keep_last": 1, "init_from": init_from},
        "logging": {"log_interval": max(1, iters // 10), "tensorboard": True},
        "output_dir": str(ctx.path(f"train/{name}")),
        "seed": cfg.seed,
        "train_iters": iters,
        "micro_batch_size": cfg.long_micro_batch_size if long else cfg.micro_batch_size,
        "global_batch_size": cfg.long_global_batch_size if long else cfg.global_batch_size,
    }


def run_job(ctx: Context, name: str, job: dict, nproc: int = 2) -> dict:
    from megatron_longsky.training.metrics import read_metrics
    from megatron_longsky.training.plot import plot_loss

    config_path = write_yaml(ctx.path(f"configs/{name}.yaml"), job)
    run_longsky(["train", "--config", str(config_path)], ctx.path(f"logs/{name}.log"), nproc=nproc)
    metrics_path = Path(job["output_dir"]) / "metrics.jsonl"
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    png = plot_loss(metrics_path, ctx.path(f"figures/loss_{name}.png"), title=f"{name}: training loss")
    tail = records[-max(1, len(records) // 10):]
    throughput = [r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s")]
    return {
        "config": str(config_path),
        "checkpoint": job["checkpoint"]["save"],
        "iterations": len(records),
        "first_loss": records[0]["loss"],
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "tokens_per_s": sum(throughput) / len(throughput) if throughput else None,
        "seq_length": job["model"]["seq_length"],
        "rope_base": job["model"]["rope"]["base"],
        "context_parallel": job["parallel"]["context_parallel_size"],
        "processes": nproc,
        "loss_png": str(png),
    }


def pretrain_base(ctx: Context) -> dict:
    from megatron_longsky.quickstart.data_stages import dataset_prefix

    cfg = ctx.cfg
    curriculum = ctx.runner.results("curriculum")
    if not curriculum:  # the retrieval curriculum is off: the corpus through GPTDataset
        job = _job(ctx, "base", seq_length=cfg.base_seq_length, rope_base=cfg.base_rope_base,
                   data={"kind": "gpt", "prefixes": [dataset_prefix(ctx, "train")], "split": "100,0,0"},
                   iters=cfg.base_iters, lr=cfg.lr, init_from=None)
        return run_job(ctx, "base", job)
    warmup = init = None
    if cfg.copy_warmup_iters > 0:
        # The retrieval warm-up: loss on the copied tokens only, then the base mix from its weights.
        alphabet = curriculum["warmup"].get("tokenizer")
        job = _job(ctx, "base_copy", seq_length=cfg.base_seq_length, rope_base=cfg.base_rope_base,
                   data={"kind": "sft", "prefixes": [curriculum["warmup"]["prefix"]], "packed": False},
                   iters=cfg.copy_warmup_iters, lr=cfg.copy_warmup_lr, init_from=None,
                   decay_style=cfg.copy_warmup_decay, tokenizer_dir=alphabet)
        warmup = run_job(ctx, "base_copy", job)
        init = warmup["checkpoint"]
        if "keyed" in curriculum:  # the key match, once the copy has formed
            job = _job(ctx, "base_keyed", seq_length=cfg.base_seq_length, rope_base=cfg.base_rope_base,
                       data={"kind": "sft", "prefixes": [curriculum["keyed"]["prefix"]], "packed": False},
                       iters=cfg.keyed_warmup_iters, lr=cfg.copy_warmup_lr, init_from=init,
                       decay_style=cfg.copy_warmup_decay, tokenizer_dir=alphabet)
            warmup["keyed"] = run_job(ctx, "base_keyed", job)
            init = warmup["keyed"]["checkpoint"]
        if alphabet:
            init = grow_warmup_vocabulary(ctx, init)
            warmup["grown_checkpoint"] = init
    # Corpus text windows (loss on every token) with retrieval samples (loss on the copies).
    job = _job(ctx, "base", seq_length=cfg.base_seq_length, rope_base=cfg.base_rope_base,
               data={"kind": "sft", "prefixes": [curriculum["base"]["prefix"]], "packed": False},
               iters=cfg.base_iters, lr=cfg.lr, init_from=init)
    results = run_job(ctx, "base", job)
    if warmup:
        results["copy_warmup"] = warmup
    return results


def grow_warmup_vocabulary(ctx: Context, checkpoint: str) -> str:
    """The alphabet warm-up's checkpoint with the run tokenizer's vocabulary: exported to HF,
    grown row by row (convert/grow_vocab.py), imported back; returns the imported checkpoint."""
    from megatron_longsky.convert.grow_vocab import grow_vocabulary

    cfg = ctx.cfg
    small, grown = ctx.path("checkpoints/base_copy_hf"), ctx.path("checkpoints/base_copy_grown_hf")
    imported = ctx.path("checkpoints/base_copy_grown")
    log = ctx.path("logs/base_copy_grow.log")
    run_longsky(["convert", "export", "--checkpoint", checkpoint, "--output", str(small), "--overwrite"], log)
    grow_vocabulary(small, grown, ctx.tokenizer_config().model, seed=cfg.seed,
                    embedding_std=cfg.embedding_init_std or cfg.init_method_std, output_std=cfg.init_method_std,
                    overwrite=True)
    run_longsky(["convert", "import", "--hf-dir", str(grown), "--output", str(imported), "--overwrite"],
                ctx.path("logs/base_copy_import.log"))
    return str(imported)


def continual_pretrain(ctx: Context, name: str, mode: str) -> dict:
    """CPT at the long length with a raised RoPE base, context parallel, from the base model, on
    the ``mode`` (cip / concat) sequences, mixed with recall samples when ``cpt_recall_share``."""
    cfg = ctx.cfg
    mix = ctx.runner.results("cip_data")[mode].get("recall_mix")
    data = ({"kind": "sft", "prefixes": [mix["prefix"]], "packed": False} if mix else
            {"kind": "gpt", "prefixes": [ctx.runner.results("cip_data")[mode]["prefix"]], "split": "100,0,0"})
    job = _job(ctx, name, seq_length=cfg.long_seq_length, rope_base=cfg.long_rope_base, data=data,
               iters=cfg.cpt_iters, lr=cfg.lr / 3, init_from=ctx.runner.results("base")["checkpoint"],
               cp=cfg.context_parallel)
    return run_job(ctx, name, job, nproc=cfg.context_parallel)


def sft(ctx: Context) -> dict:
    cfg = ctx.cfg
    job = _job(ctx, "sft", seq_length=cfg.base_seq_length, rope_base=cfg.long_rope_base,
               data={"kind": "sft", "prefixes": [ctx.runner.results("sft_data")["prefix"]], "packed": True},
               iters=cfg.sft_iters, lr=cfg.lr / 3, init_from=ctx.runner.results("cpt")["checkpoint"])
    return run_job(ctx, "sft", job)


def long_sft(ctx: Context) -> dict:
    cfg = ctx.cfg
    job = _job(ctx, "long_sft", seq_length=cfg.long_seq_length, rope_base=cfg.long_rope_base,
               data={"kind": "sft", "prefixes": [ctx.runner.results("synl_data")["prefix"]], "packed": True},
               iters=cfg.long_sft_iters, lr=cfg.lr / 3, init_from=ctx.runner.results("sft")["checkpoint"],
               cp=cfg.context_parallel)
    return run_job(ctx, "long_sft", job, nproc=cfg.context_parallel)
