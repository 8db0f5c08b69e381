"""``longsky needle`` / ``tools/needle_test.py``: the needle-in-a-haystack sweep.

    longsky needle --checkpoint ckpt/ --lengths 1024,2048,4096 --depths 11 --samples 2 \\
        --output out/needle
    torchrun --nproc-per-node 8 tools/needle_test.py --checkpoint ckpt/ --tp 4 --cp 2 ...
    longsky needle --hf-model ./Llama-3-8B --mode chat --lengths 8192 --output out/hf

Writes ``needle.png`` (heatmap), ``needle.json`` (every cell and sample) and
``needle.md`` (summary). NeedleConfig fields can also come from ``--config YAML``
and ``key=value`` overrides (e.g. ``needle="The code is {value}."``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_longsky.config import load_config
from megatron_longsky.eval.loading import (
    add_model_args, default_tokenizer_config, finish, load_model, parse_depths, parse_int_list,
    recorded_chat_template,
)
from megatron_longsky.utils.logging import setup_logging
from megatron_longsky.utils.paths import ensure_report_dir

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longsky needle", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--lengths", help="context lengths in tokens, e.g. 1024,2048 (whole prompt)")
    g.add_argument("--depths", help="a count of evenly spaced depths (11) or percentages (0,50,100; one: 50,)")
    g.add_argument("--depth-spacing", choices=["linear", "sigmoid"])
    g.add_argument("--samples", type=int, help="needles (prompts) per cell")
    g.add_argument("--seed", type=int)
    g.add_argument("--mode", choices=["base", "chat"],
                   help="base: teacher-forced argmax; chat: greedy generation with the chat template")
    g.add_argument("--needles", type=int, help="needles per prompt (all must be retrieved)")
    g.add_argument("--distractors", type=int, help="distractor needles with other keys")
    g.add_argument("--haystack", help="'default' (built in), a .txt/.jsonl file, or indexed:<prefix>")
    g.add_argument("--haystack-key", help="jsonl field holding the text (default: text)")
    g.add_argument("--chat-template", help="Jinja file replacing the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--no-bos", action="store_true", help="base mode: do not start prompts with BOS")
    p.add_argument("--config", help="YAML file of NeedleConfig fields")
    p.add_argument("--output", required=True, help="directory for needle.png / .json / .md")
    p.add_argument("overrides", nargs="*", help="NeedleConfig key=value overrides")
    return p


def needle_config_from_args(args: argparse.Namespace):
    from megatron_longsky.eval.needle import NeedleConfig

    flags = {
        "lengths": parse_int_list(args.lengths, "--lengths") if args.lengths else None,
        "depth_spacing": args.depth_spacing, "samples": args.samples, "seed": args.seed, "mode": args.mode,
        "num_needles": args.needles, "num_distractors": args.distractors, "haystack": args.haystack,
        "haystack_key": args.haystack_key, "chat_template": args.chat_template,
        "max_new_tokens": args.max_new_tokens, "add_bos": False if args.no_bos else None,
    }
    if args.depths:
        depths, count = parse_depths(args.depths)
        if count is None:
            flags["depths"] = depths
        else:
            flags["num_depths"] = count
    return load_config(NeedleConfig, args.config, args.overrides, flags=flags, where="needle config")


def main(argv: list[str] | None = None) -> int:
    from megatron_longsky.eval.distribute import finish_sweep
    from megatron_longsky.eval.needle import check_needle_inputs, run_needle
    from megatron_longsky.tokenizer import build_tokenizer
    from megatron_longsky.eval.prompt import use_trained_chat_template
    from megatron_longsky.eval.report import write_report

    setup_logging()
    args = build_parser().parse_args(argv)
    cfg = needle_config_from_args(args)  # a ConfigError is one line and exit 2 (cli.py)
    ensure_report_dir(args)  # before the model is loaded: writable, and no input
    tokenizer = build_tokenizer(default_tokenizer_config(args))
    if cfg.mode == "chat" and not cfg.chat_template:
        use_trained_chat_template(tokenizer, recorded_chat_template(args))
    # The haystack, template and lengths are checked before the model is loaded.
    haystack = check_needle_inputs(cfg, tokenizer).haystack
    model = load_model(args, tokenizer)
    try:
        # Finished samples are kept in the output directory as they go: a rerun (a requeued
        # job) resumes the sweep from them.
        result = run_needle(cfg, model.backend, model.tokenizer, model_name=model.name, haystack=haystack,
                            progress=model.is_writer, journal_dir=args.output, model_source=model.source)
        if model.is_writer:
            paths = write_report(result, args.output)
            finish_sweep(args.output, "needle")
            log.info("needle: accuracy %.1f%%; longest length with all cells passed: %s; report: %s",
                     100 * result.accuracy, result.longest_length_all_passed(), paths["md"])
            print(open(paths["md"], encoding="utf-8").read())
    finally:
        finish(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
