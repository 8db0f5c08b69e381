"""``longsky quickstart``: the whole LongSkywork recipe in miniature, on CPU.

corpus -> tokenizer -> preprocess -> base pretraining (short) -> CIP data (and plain
concatenation for the ablation) -> continual pretraining at 4x length with a raised
RoPE base and context parallelism -> SFT -> long SFT on SynL -> needle sweep, held-out
perplexity and SynL accuracy after each stage -> Hugging Face export -> REPORT.md.

    longsky quickstart --output runs/quickstart [key=value ...]

Keys are the fields of :class:`QuickstartConfig` (e.g. ``base_iters=50 ablation=false``).
A rerun with the same settings resumes after the last finished stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_longsky.config import ConfigError, load_config
from megatron_longsky.quickstart.config import QuickstartConfig

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longsky quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/quickstart", help="run directory (REPORT.md goes here)")
    p.add_argument("--config", help="YAML of QuickstartConfig fields")
    p.add_argument("--fresh", action="store_true", help="ignore results of an earlier run in --output")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's iterations by this (e.g. 4: a longer, stronger run)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="QuickstartConfig overrides")
    return p


def run(cfg: QuickstartConfig, run_dir: Path, fresh: bool = False) -> Path:
    from megatron_longsky.quickstart import data_stages as data
    from megatron_longsky.quickstart import eval_stages as evals
    from megatron_longsky.quickstart import train_stages as train
    from megatron_longsky.quickstart.context import Context
    from megatron_longsky.quickstart.report_builder import build_report
    from megatron_longsky.quickstart.runner import StageRunner

    run_dir = Path(run_dir)
    if fresh and (run_dir / "state.json").exists():
        (run_dir / "state.json").unlink()
    runner = StageRunner(run_dir, fingerprint=dataclasses.asdict(cfg))
    ctx = Context(cfg, run_dir, runner)
    start = time.perf_counter()

    runner.run("corpus", lambda: data.build_corpus(ctx))
    runner.run("tokenizer", lambda: data.build_tokenizer_stage(ctx))
    runner.run("needle_sweeps", lambda: data.check_needle_sweeps(ctx))
    runner.run("preprocess", lambda: data.preprocess_corpus(ctx))
    runner.run("curriculum", lambda: data.build_curriculum(ctx))
    runner.run("base", lambda: train.pretrain_base(ctx))
    runner.run("cip_data", lambda: data.build_cip_data(ctx))
    # after every data stage that writes training text (the curriculum's, CPT's recall samples)
    runner.run("eval_unseen", lambda: data.check_evaluation_unseen(ctx))
    runner.run("cpt", lambda: train.continual_pretrain(ctx, "cpt", "cip"))
    if cfg.ablation:
        runner.run("cpt_concat", lambda: train.continual_pretrain(ctx, "cpt_concat", "concat"))
    runner.run("sft_data", lambda: data.build_sft_data(ctx))
    runner.run("sft", lambda: train.sft(ctx))
    runner.run("synl_data", lambda: data.build_synl_data(ctx))
    runner.run("long_sft", lambda: train.long_sft(ctx))

    models = ["base", "cpt"] + (["cpt_concat"] if cfg.ablation else []) + ["sft", "long_sft"]
    for model in models:
        runner.run(f"needle_{model}", lambda m=model: evals.needle(ctx, m))
        if cfg.needle_distractors:
            runner.run(f"needle_distractors_{model}", lambda m=model: evals.needle(ctx, m, cfg.needle_distractors))
        runner.run(f"ppl_{model}", lambda m=model: evals.perplexity(ctx, m, cfg.long_seq_length))
    for model in ("sft", "long_sft"):
        runner.run(f"synl_{model}", lambda m=model: evals.synl_accuracy(ctx, m))
    runner.run("export", lambda: evals.export_hf(ctx))

    report = build_report(ctx, models, wall_seconds=time.perf_counter() - start)
    log.info("quickstart finished: %s", report)
    return report


ITERATION_FIELDS = ("copy_warmup_iters", "keyed_warmup_iters", "base_iters", "cpt_iters", "sft_iters", "long_sft_iters")


def scaled(cfg: QuickstartConfig, scale: float) -> QuickstartConfig:
    """``cfg`` with every stage's iterations multiplied by ``scale`` (at least 1 each)."""
    if scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    return dataclasses.replace(cfg, **{f: max(1, round(getattr(cfg, f) * scale)) if getattr(cfg, f) > 0 else 0
                                     for f in ITERATION_FIELDS})


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_longsky.utils.logging import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = scaled(load_config(QuickstartConfig, args.config, args.overrides), args.scale)
    except (ConfigError, ValueError) as exc:
        print(f"longsky quickstart: {exc}", file=sys.stderr)
        return 2
    from megatron_longsky.utils.output_paths import OutputLock, check_outputs
    from megatron_longsky.utils.paths import ensure_writable_dir

    # the run directory: never the config file, a device or a file; writable; one run at a time
    check_outputs([], inputs=[args.config] if args.config else [], report_dirs=[args.output])
    ensure_writable_dir("--output", args.output)
    with OutputLock(args.output):
        report = run(cfg, Path(args.output), fresh=args.fresh)
    print(f"report: {report}")
    return 0
