"""``longsky eval {passkey,ruler,ppl}``: the other long-context evaluations.

    longsky eval passkey --checkpoint ckpt/ --lengths 1024,4096 --depths 5 --output out/passkey
    longsky eval ruler --hf-model ./model --lengths 4096 --samples 8 --output out/ruler
    longsky eval ppl --checkpoint ckpt/ --data indexed:data/heldout_text_document \\
        --length 8192 --output out/ppl

Same model, tokenizer and parallelism flags as ``longsky needle``; ``key=value``
overrides set any field of the task's config (PasskeyConfig = NeedleConfig,
RulerConfig, PerplexityConfig).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_longsky.config import ConfigError, load_config
from megatron_longsky.eval.loading import (
    add_model_args, default_tokenizer_config, finish, load_model, parse_depths, parse_int_list,
)
from megatron_longsky.utils.logging import setup_logging
from megatron_longsky.utils.paths import ensure_report_dir

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longsky eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    for name, help_ in (("passkey", "passkey retrieval (length x depth grid)"),
                        ("ruler", "RULER-style tasks with exact match"),
                        ("ppl", "perplexity by position bucket on long held-out documents")):
        t = sub.add_parser(name, help=help_)
        add_model_args(t)
        t.add_argument("--config", help="YAML file of the task config's fields")
        t.add_argument("--output", required=True, help="report directory")
        if name in ("passkey", "ruler"):
            t.add_argument("--seed", type=int)
            t.add_argument("--lengths", help="prompt lengths in tokens, e.g. 1024,4096")
            t.add_argument("--samples", type=int)
            t.add_argument("--mode", choices=["base", "chat"])
            t.add_argument("--chat-template", help="Jinja file replacing the tokenizer's chat template")
        if name == "passkey":
            t.add_argument("--depths", help="a count (5) or percentages (0,50,100)")
        if name == "ruler":
            t.add_argument("--tasks", help="comma-separated subset of the tasks")
            t.add_argument("--haystack", help="'default', a .txt/.jsonl file or indexed:<prefix>")
        if name == "ppl":
            t.add_argument("--data", help="indexed:<prefix> or a .jsonl/.txt file of held-out documents")
            t.add_argument("--length", type=int, help="tokens per document evaluated")
            t.add_argument("--max-documents", type=int)
            t.add_argument("--buckets", choices=["log2", "linear"])
            t.add_argument("--num-buckets", type=int)
        t.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p


def task_config(args: argparse.Namespace):
    from megatron_longsky.eval.needle import NeedleConfig
    from megatron_longsky.eval.perplexity import PerplexityConfig
    from megatron_longsky.eval.ruler import RulerConfig

    cls = {"passkey": NeedleConfig, "ruler": RulerConfig, "ppl": PerplexityConfig}[args.task]
    flags: dict = {}
    if args.task in ("passkey", "ruler"):
        flags.update(seed=args.seed, samples=args.samples, mode=args.mode, chat_template=args.chat_template)
        if args.lengths:
            flags["lengths"] = parse_int_list(args.lengths, "--lengths")
    if args.task == "passkey" and args.depths:
        depths, count = parse_depths(args.depths)
        flags.update({"depths": depths} if count is None else {"num_depths": count})
    if args.task == "ruler":
        flags.update(haystack=args.haystack, tasks=args.tasks.split(",") if args.tasks else None)
    if args.task == "ppl":
        flags = {"data": args.data, "length": args.length, "max_documents": args.max_documents,
                 "buckets": args.buckets, "num_buckets": args.num_buckets}
    return load_config(cls, args.config, args.overrides, flags=flags, where=f"{args.task} config")


def main(argv: list[str] | None = None) -> int:
    from megatron_longsky.eval.distribute import finish_sweep
    from megatron_longsky.eval.passkey import run_passkey
    from megatron_longsky.eval.prompt import use_trained_chat_template
    from megatron_longsky.eval.perplexity import perplexity_by_position, select_documents, write_perplexity_report
    from megatron_longsky.tokenizer import build_tokenizer
    from megatron_longsky.eval.report import write_report
    from megatron_longsky.eval.ruler import run_ruler, write_ruler_report

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        cfg = task_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.task == "ppl" and not cfg.data:
        print("error: ppl needs --data (indexed:<prefix> or a .jsonl/.txt file)", file=sys.stderr)
        return 2
    ensure_report_dir(args)  # before the model is loaded: writable, and no input
    tokenizer = build_tokenizer(default_tokenizer_config(args))
    # The documents are read (and a missing or too short one refused) before the model is loaded.
    windows = select_documents(cfg, tokenizer) if args.task == "ppl" else None
    model = load_model(args, tokenizer)
    if getattr(cfg, "mode", None) == "chat" and not cfg.chat_template:
        use_trained_chat_template(model.tokenizer, model.chat_template)
    try:
        quiet = not model.is_writer
        # Finished items are kept in the output directory as they go; a rerun resumes from them.
        resumable = {"progress": not quiet, "journal_dir": args.output, "model_source": model.source}
        if args.task == "passkey":
            result = run_passkey(cfg, model.backend, model.tokenizer, model.name, **resumable)
            paths = write_report(result, args.output, name="passkey", title="Passkey retrieval") if model.is_writer else {}
        elif args.task == "ruler":
            result = run_ruler(cfg, model.backend, model.tokenizer, model.name, **resumable)
            paths = write_ruler_report(result, args.output) if model.is_writer else {}
        else:
            result = perplexity_by_position(cfg, model.backend, model.tokenizer, model.name, windows=windows,
                                            **resumable)
            paths = write_perplexity_report(result, args.output) if model.is_writer else {}
        finish_sweep(args.output, {"ppl": "perplexity"}.get(args.task, args.task))
        if paths:
            print(open(paths["md"], encoding="utf-8").read())
    finally:
        finish(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
