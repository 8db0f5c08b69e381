"""``longsky synl-eval``: exact-match accuracy on held-out SynL questions.

    longsky synl-eval --checkpoint runs/x/checkpoints/long_sft --data synl_heldout.jsonl --output out/synl

The model answers each question greedily under the same chat template the SFT data
used; the answer is scored by exact match (``synl.verify.score_answer``) against the
value computed from the table. Works on our checkpoints (any TP/PP/CP, launched with
torchrun for several processes) and on Hugging Face models (``--hf-model``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Optional

from megatron_longsky.utils.atomic import atomic_write_json, atomic_write_text
from megatron_longsky.utils.paths import ensure_report_dir


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def record_problem(record) -> Optional[str]:
    """What keeps ``record`` from being a SynL question to score (None: nothing)."""
    if not isinstance(record, dict) or "messages" not in record or "meta" not in record:
        return "not a SynL record (needs 'messages' and 'meta')"
    messages, meta = record["messages"], record["meta"]
    if not isinstance(messages, list) or len(messages) < 2 or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return "'messages' must be a list of at least two {role, content} turns (the question, then the answer)"
    if not isinstance(meta, dict):
        return "'meta' must be a mapping"
    missing = [k for k in ("answer", "family", "kind", "id") if k not in meta]
    if missing:
        return f"'meta' has no {', '.join(repr(k) for k in missing)} (not written by `longsky build-synl`?)"
    if not isinstance(meta["answer"], str):
        return f"'meta.answer' must be a string, got {meta['answer']!r}"
    return None


def build_parser() -> argparse.ArgumentParser:
    from megatron_longsky.eval.loading import add_model_args

    p = argparse.ArgumentParser(prog="longsky synl-eval", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--data", required=True, help="SynL chat jsonl written by `longsky build-synl`")
    p.add_argument("--output", required=True, help="directory for synl_eval.json / synl_eval.md")
    p.add_argument("--max-samples", type=positive_int, default=None, help="score only the first N records")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="generation budget (default: each reference answer's length + 16)")
    p.add_argument("--examples", type=_examples_count, default=5,
                   help="questions whose generated text the JSON keeps (default 5; -1: all)")
    return p


def _examples_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (-1 for all), got {text!r}") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be >= 0, or -1 for all; got {value}")
    return value


def read_records(path: str | Path, limit: Optional[int] = None) -> list[dict]:
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SystemExit(f"error: {path}:{number}: invalid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"error: {path}:{number}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise SystemExit(f"error: {path}:{number}: JSON nested too deeply") from None
            problem = record_problem(record)
            if problem:
                raise SystemExit(f"error: {path}:{number}: {problem}")
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise SystemExit(f"error: {path} holds no SynL records")
    return records


def markdown(result: dict, name: str) -> str:
    lines = [f"# SynL accuracy: {name}", "",
             f"Exact match: **{result['correct']}/{result['total']} = {result['accuracy']:.1%}**", "",
             "| family | correct | total | accuracy |", "|---|---|---|---|"]
    for family, r in result["by_family"].items():
        lines.append(f"| {family} | {r['correct']} | {r['total']} | {r['accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_longsky.eval.loading import finish, load_model
    from megatron_longsky.sft.template import template_from_record
    from megatron_longsky.synl.evaluate import synl_accuracy
    from megatron_longsky.utils.logging import setup_logging
    from megatron_longsky.utils.progress import progress_bar

    args = build_parser().parse_args(argv)
    setup_logging()
    records = read_records(args.data, args.max_samples)
    ensure_report_dir(args)  # before the model is loaded: writable, and no input
    model = load_model(args)
    try:
        # Generation never picks ids beyond the tokenizer's vocabulary (padded model vocabularies).
        greedy = functools.partial(model.backend.generate_greedy, vocab_size=model.tokenizer.vocab_size)
        with progress_bar(total=len(records), desc="synl-eval", unit="question", enabled=model.is_writer) as bar:
            def generate(*args_, **kwargs):  # one call per question
                bar.update(1)
                return greedy(*args_, **kwargs)

            # Prompts in the chat template the model was trained with, when its checkpoint records one.
            template = template_from_record(model.tokenizer, model.chat_template)
            result = synl_accuracy(records, generate, model.tokenizer, template=template,
                                   max_new_tokens=args.max_new_tokens,
                                   keep_outputs=len(records) if args.examples < 0 else args.examples)
    finally:
        finish(model)
    if model.is_writer:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        result["model"] = model.name
        atomic_write_json(out / "synl_eval.json", result)
        atomic_write_text(out / "synl_eval.md", markdown(result, model.name))
        print(f"SynL exact match: {result['correct']}/{result['total']} = {result['accuracy']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
