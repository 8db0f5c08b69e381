"""Synthetic Lengthy Tables (SynL): long tables with exactly answered questions, as chat jsonl.

``build_synl(cfg, tokenizer)`` returns records; ``longsky build-synl`` writes them as jsonl
(and, with ``--sft-output-prefix``, straight into the SFT indexed format). Each record::

    {"messages": [{"role": "user", "content": <instruction, tables, question>},
                  {"role": "assistant", "content": <worked steps>\\nAnswer: <answer>}],
     "meta": {"id", "family", "kind", "format", "answer", "query", "table_tokens",
              "prompt_tokens", "answer_tokens", "target_tokens", "rows", "seed", "index",
              "tokenizer"}}

Length targeting: each sample draws a target from the length distribution over
``[min_tokens, max_tokens]`` and grows its table(s) row by row until the serialised
tables (``table_tokens``, measured in the given tokenizer's tokens) reach it; the
result always lies in ``[min_tokens, max_tokens]``. The prompt adds the instruction
and question (``prompt_tokens``), typically under 100 tokens more.
Sample ``i`` depends only on (seed, i, config, tokenizer): reproducible and order-free.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

from megatron_longsky.synl import questions as Q
from megatron_longsky.synl.tables import (
    ENTITIES,
    FORMATS,
    Column,
    Table,
    header_text,
    make_rows,
    make_schema,
    row_line,
    serialise,
    title_line,
)


MIN_ROWS = 3
# asked when a family's drawn kind has no unambiguous question on the table (e.g. all ties)
ALWAYS_POSSIBLE = {"retrieval": "lookup", "reasoning": "sum_rows", "global": "count"}


@dataclass
class SynLConfig:
    num_samples: int = 100
    min_tokens: int = 2000
    max_tokens: int = 8000
    format: Literal["markdown", "csv", "jsonl", "mixed"] = "markdown"
    seed: int = 0
    # uniform | log-uniform | weighted ranges "2000-4000:0.7,4000-8000:0.3" (inside [min, max])
    length_distribution: str = "uniform"
    families: list[str] = field(default_factory=lambda: list(Q.FAMILIES))
    system_prompt: Optional[str] = None
    # Retrieval answers first quote, verbatim, the table row(s) they read (a worked step):
    # the row is then copied from the table rather than recalled in one step.
    quote_rows: bool = False

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= min_tokens ({self.min_tokens}) <= max_tokens ({self.max_tokens})")
        unknown = [f for f in self.families if f not in Q.FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"families {unknown or self.families} not in {list(Q.FAMILIES)}")
        parse_length_distribution(self.length_distribution, self.min_tokens, self.max_tokens)


def parse_length_distribution(spec: str, low: int, high: int):
    """A function ``rng -> target tokens`` for ``spec`` (see :class:`SynLConfig`)."""
    if spec == "uniform":
        return lambda rng: rng.randint(low, high)
    if spec in ("log-uniform", "loguniform"):
        return lambda rng: min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))
    ranges, weights = [], []
    for part in spec.split(","):
        try:
            span, weight = part.split(":")
            a, b = (int(x) for x in span.split("-"))
            w = float(weight)
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: {part!r} is not of the form MIN-MAX:WEIGHT "
                             "(or use uniform / log-uniform)") from None
        if not low <= a <= b <= high or w < 0:
            raise ValueError(f"length distribution {spec!r}: range {a}-{b} must lie inside "
                             f"[min_tokens={low}, max_tokens={high}] with a weight >= 0")
        ranges.append((a, b))
        weights.append(w)
    if sum(weights) <= 0:
        raise ValueError(f"length distribution {spec!r}: weights sum to 0")
    return lambda rng: rng.randint(*rng.choices(ranges, weights)[0])


class _DoesNotFit(Exception):
    pass


class SynLBuilder:
    def __init__(self, cfg: SynLConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.draw_target = parse_length_distribution(cfg.length_distribution, cfg.min_tokens, cfg.max_tokens)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    # -- tables sized in tokens -------------------------------------------------------

    def _grow(self, rng, table: Table, fmt: str, budget: int, taken: set, refs=()) -> None:
        """Add rows while they fit ``budget`` tokens (at least MIN_ROWS), counting each row's tokens."""
        used = self.count(title_line(table, fmt) + header_text(table, fmt))
        per_row = None
        while True:
            room = budget - used
            chunk = 8 if per_row is None else max(4, min(4096, int(room / per_row) + 2))
            batch = make_rows(rng, table, chunk, taken, refs)
            lines = [row_line(table, r, fmt) for r in batch]
            costs = [len(ids) for ids in self.tokenizer.encode_batch(lines)]
            per_row = max(1.0, sum(costs) / len(costs))
            for row, cost in zip(batch, costs):
                if len(table.rows) >= MIN_ROWS and used + cost > budget:
                    return
                table.rows.append(row)
                used += cost

    def _fit(self, rng, tables: list[Table], fmt: str, taken: set, refs=()) -> tuple[str, int]:
        """Measure the exact token count and trim/extend the last table into [min, max]."""
        low, high = self.cfg.min_tokens, self.cfg.max_tokens
        last = tables[-1]
        for _ in range(8):
            text = "\n".join(serialise(t, fmt) for t in tables)
            n = self.count(text)
            if low <= n <= high:
                return text, n
            per_row = max(1, n // max(1, sum(len(t.rows) for t in tables)))
            if n > high:
                if len(last.rows) <= MIN_ROWS:
                    raise _DoesNotFit(f"{MIN_ROWS} rows already take {n} tokens; raise --max-tokens")
                drop = min(len(last.rows) - MIN_ROWS, -(-(n - high) // per_row))
                del last.rows[len(last.rows) - drop:]
            else:
                last.rows.extend(make_rows(rng, last, -(-(low - n) // per_row), taken, refs))
        raise _DoesNotFit(f"rows take about {per_row} tokens each, more than the range allows; "
                          "widen it (max-tokens - min-tokens of at least a few rows)")

    def _single(self, rng, target: int, fmt: str):
        entity = rng.choice(ENTITIES)
        table = make_schema(rng, entity[0], f"{entity[1]} ID", entity[2], target)
        taken: set = set()
        self._grow(rng, table, fmt, target, taken)
        return [table], taken, ()

    def _pair(self, rng, target: int, fmt: str):
        names_a, single_a, prefix_a, names_b, single_b, prefix_b = rng.choice(ENTITIES)
        key_a = f"{single_a} ID"
        a = make_schema(rng, names_a, key_a, prefix_a, target // 2)
        b = make_schema(rng, names_b, f"{single_b} ID", prefix_b, target // 2, extra=[Column(key_a, "ref")])
        taken: set = set()
        self._grow(rng, a, fmt, int(target * 0.4), taken)
        refs = [row[0] for row in a.rows]
        budget_b = target - self.count(serialise(a, fmt)) - 1
        self._grow(rng, b, fmt, max(1, budget_b), taken, refs)
        return [a, b], taken, refs

    # -- samples ------------------------------------------------------------------------

    def sample(self, index: int) -> dict:
        cfg = self.cfg
        rng = random.Random(f"synl/{cfg.seed}/{index}")
        family = cfg.families[index % len(cfg.families)]
        kind = rng.choice(Q.FAMILIES[family])
        fmt = rng.choice(FORMATS) if cfg.format == "mixed" else cfg.format
        target = self.draw_target(rng)
        drawn = kind
        question = None
        for _ in range(3):
            try:
                if kind == "multi_hop":
                    tables, taken, refs = self._pair(rng, target, fmt)
                else:
                    tables, taken, refs = self._single(rng, target, fmt)
                text, table_tokens = self._fit(rng, tables, fmt, taken, refs)
            except _DoesNotFit as exc:
                if kind == "multi_hop":  # two tables do not fit this budget: ask within one
                    kind = "lookup"
                    continue
                raise ValueError(f"SynL sample {index}: cannot fit a {fmt} table into "
                                 f"[{cfg.min_tokens}, {cfg.max_tokens}] tokens: {exc}") from None
            if kind == "multi_hop":
                question = Q.multi_hop(rng, tables[0], tables[1], tables[0].key)
            else:
                question = Q.SINGLE_TABLE[kind](rng, tables[0])
            if question is not None:
                break
            kind = ALWAYS_POSSIBLE[family]
        fallback = None if question.kind == drawn else f"{drawn}->{question.kind}"
        return self._record(index, question, tables, fmt, text, table_tokens, target, fallback)

    def _record(self, index, q: Q.Question, tables, fmt, tables_text, table_tokens, target,
                fallback: Optional[str] = None) -> dict:
        several = len(tables) > 1
        steps = q.steps
        if q.family == "reasoning":
            how = "Work it out step by step, then give the final answer"
        elif q.family == "retrieval" and self.cfg.quote_rows:
            how = f"Quote the row{'s' if q.kind == 'multi_hop' else ''} you use, then give the final answer"
            steps = [row_line(t, row, fmt).rstrip("\n") for t, row in evidence_rows(q, tables)]
        else:
            how = "Give the final answer"
        user = (f"Answer the question using the table{'s' if several else ''} below. {how} on the last line, "
                f"in the form 'Answer: <answer>'.\n\n{tables_text}\nQuestion: {q.text}")
        assistant = "\n".join(steps + [f"Answer: {q.answer}"])
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if self.cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        meta = {
            "id": f"synl-{self.cfg.seed}-{index}", "family": q.family, "kind": q.kind, "format": fmt,
            "answer": q.answer, "query": q.query, "table_tokens": table_tokens,
            "prompt_tokens": self.count(user), "answer_tokens": self.count(assistant),
            "target_tokens": target, "rows": {t.name: len(t.rows) for t in tables},
            "seed": self.cfg.seed, "index": index, "tokenizer": self.tokenizer.fingerprint,
            # "<drawn kind>-><asked kind>" when the drawn kind could not be asked on this table
            "fallback": fallback,
        }
        return {"messages": messages, "meta": meta}


def evidence_rows(q: Q.Question, tables: list[Table]) -> list[tuple[Table, list]]:
    """The (table, row) pairs a retrieval question reads, in reading order."""
    by_name = {t.name: t for t in tables}

    def row(table_name: str, key: str):
        table = by_name[table_name]
        return table, next(r for r in table.rows if r[0] == key)

    query = q.query
    if q.kind == "lookup":
        return [row(query["table"], query["key"])]
    if q.kind == "match":
        return [row(query["table"], q.answer)]
    if q.kind == "multi_hop":
        first = row(query["table"], query["key"])
        link = first[0].index(query["link_column"])
        return [first, row(query["target_table"], first[1][link])]
    raise ValueError(f"no evidence rows for a {q.family}/{q.kind} question")


def prompt_turns(record: dict):
    """The record's conversation without its final assistant answer (what a model is
    asked at evaluation time: pass it to ``ChatTemplate.encode_prompt``)."""
    from megatron_longsky.sft.formats import Turn

    return [Turn(m["role"], m["content"]) for m in record["messages"][:-1]]


def iter_synl(cfg: SynLConfig, tokenizer, start: int = 0) -> Iterator[dict]:
    builder = SynLBuilder(cfg, tokenizer)
    for i in range(start, cfg.num_samples):
        yield builder.sample(i)


def build_synl(cfg: SynLConfig, tokenizer) -> list[dict]:
    """All ``cfg.num_samples`` records in memory (use :func:`write_synl_jsonl` for big sets)."""
    return list(iter_synl(cfg, tokenizer))


def write_synl_jsonl(cfg: SynLConfig, tokenizer, path, progress: bool = False) -> Counter:
    """Write the records to ``path`` atomically; returns counts per family/kind."""
    from megatron_longsky.utils.atomic import atomic_path
    from megatron_longsky.utils.progress import progress_bar

    counts: Counter = Counter()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        bar = progress_bar(total=cfg.num_samples, desc="build-synl", unit="sample", enabled=progress, file=sys.stderr)
        for record in iter_synl(cfg, tokenizer):
            bar.update(1)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            meta = record["meta"]
            counts[f"{meta['family']}/{meta['kind']}"] += 1
            if meta.get("fallback"):
                counts[f"fallback/{meta['fallback']}"] += 1
            counts["table_tokens"] += meta["table_tokens"]
        bar.close()
    return counts


def build_parser() -> argparse.ArgumentParser:
    from megatron_longsky.tokenizer import add_tokenizer_args

    p = argparse.ArgumentParser(prog="longsky build-synl",
                                description="Synthetic Lengthy Tables: long tables with exactly answered questions")
    p.add_argument("--output", required=True, help="chat jsonl to write")
    p.add_argument("--config", help="YAML with SynLConfig fields; flags and key=value overrides win")
    p.add_argument("--num-samples", type=int, help="default 100")
    p.add_argument("--min-tokens", type=int, help="least table tokens per sample, in tokenizer tokens (default 2000)")
    p.add_argument("--max-tokens", type=int, help="most table tokens per sample (default 8000)")
    p.add_argument("--format", choices=FORMATS + ("mixed",), help="default markdown")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--length-distribution",
                   help="uniform (default), log-uniform, or weighted ranges like 2000-4000:0.7,4000-8000:0.3")
    p.add_argument("--families", nargs="+", action="extend", choices=list(Q.FAMILIES),
                   help="default: all three (several per flag; repeatable)")
    p.add_argument("--system-prompt")
    p.add_argument("--sft-output-prefix", default=None,
                   help="also write the SFT indexed datasets (as longsky preprocess-sft would)")
    p.add_argument("--sft-max-length", type=int, default=None,
                   help="drop SFT samples longer than this many tokens (a cut sample would lose its question)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (jsonl and SFT datasets)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="SynLConfig field overrides")
    add_tokenizer_args(p)
    return p


CONFIG_FLAGS = ("num_samples", "min_tokens", "max_tokens", "format", "seed", "length_distribution", "families",
                "system_prompt")


def config_from_args(args: argparse.Namespace) -> SynLConfig:
    from megatron_longsky.config import load_config

    flags = {k: getattr(args, k) for k in CONFIG_FLAGS}
    return load_config(SynLConfig, args.config, args.overrides, flags=flags, where="command line")


def _build(cfg: SynLConfig, args: argparse.Namespace, build_tokenizer, tokenizer_config_from_args) -> Counter:
    """The jsonl and, with ``--sft-output-prefix``, the SFT datasets: the jsonl appears under its
    name only once the datasets are in place too (a failed SFT step leaves no finished jsonl)."""
    from megatron_longsky.utils.atomic import atomic_path
    from megatron_longsky.utils.output_paths import OutputLock, check_outputs, check_prefix

    outputs = [args.output]
    if args.sft_output_prefix is not None:
        from megatron_longsky.data.indexed import dataset_files
        from megatron_longsky.sft.preprocess import sft_prefixes

        check_prefix(args.sft_output_prefix, "--sft-output-prefix")
        outputs += [f for prefix in sft_prefixes(args.sft_output_prefix) for f in dataset_files(prefix)]
    if args.sft_max_length is not None and args.sft_max_length < 1:
        raise ValueError(f"--sft-max-length={args.sft_max_length}: must be >= 1")
    check_outputs(outputs, [args.config] if args.config else [], args.overwrite)  # before any work
    with OutputLock(args.output):
        check_outputs(outputs, [args.config] if args.config else [], args.overwrite)  # again, under the lock
        tokenizer = build_tokenizer(tokenizer_config_from_args(args))
        with atomic_path(args.output) as jsonl:
            counts = write_synl_jsonl(cfg, tokenizer, jsonl, progress=not args.no_progress)
            if args.sft_output_prefix is not None:
                from megatron_longsky.sft.preprocess import SFTPreprocessConfig, preprocess_records

                sft_cfg = SFTPreprocessConfig(output_prefix=args.sft_output_prefix, format="messages",
                                              max_length=args.sft_max_length, overlong="drop",
                                              overwrite=args.overwrite)
                with open(jsonl, encoding="utf-8") as f:
                    records = ((f"{args.output}:{n}", json.loads(line)) for n, line in enumerate(f, start=1))
                    summary = preprocess_records(records, tokenizer, sft_cfg, {"synl": {"source": args.output}})
                print(f"wrote SFT datasets {args.sft_output_prefix}_*: {summary.text()}", file=sys.stderr)
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_longsky.data.workers import stop_on_signals
    from megatron_longsky.tokenizer import build_tokenizer, tokenizer_config_from_args
    from megatron_longsky.utils.logging import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        with stop_on_signals():  # SIGTERM / Ctrl-C unwind like an exception: no temporary file is left
            counts = _build(cfg, args, build_tokenizer, tokenizer_config_from_args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table_tokens = counts.pop("table_tokens", 0)
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    print(f"wrote {args.output}: {cfg.num_samples} samples, {table_tokens} table tokens ({kinds}; "
          "fallback/A->B: kind A drawn but not askable on its table, B asked instead)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
