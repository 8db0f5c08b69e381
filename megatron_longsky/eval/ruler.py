"""A RULER-style subset (Hsieh et al., 2024), generated here with exact-match scoring.

Tasks (all seeded from ``(seed, task, length, sample)``):

- ``niah_single``: one key-value needle in the haystack.
- ``niah_multikey``: the same with distractor needles of other keys.
- ``niah_multivalue``: one key inserted several times with different values; all
  values must be returned (in context order for teacher forcing).
- ``variable_tracking``: chains ``VAR A = 12345.``, ``VAR B = VAR A.``, ... spread
  through the haystack (plus a distractor chain); return every variable holding
  the queried value.
- ``common_words``: a numbered word list in which a few words are frequent; return
  the most frequent ones (in order of first appearance). Its prompt is the largest
  whole list that fits the length (so it can be a few tokens short of it).

Prompts other than ``common_words`` are exactly ``length`` tokens, built with the
needle test's machinery (sentence-boundary insertion, needle text without special
tokens, :mod:`megatron_longsky.eval.prompt` framing).
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megatron_longsky.eval.backends import LMBackend
from megatron_longsky.eval.haystack import Haystack
from megatron_longsky.eval.needle import (
    KEY_POOL, NeedleBuilder, NeedleConfig, assemble_context, sentence_boundaries,
)
from megatron_longsky.eval.prompt import load_chat_template, make_frame
from megatron_longsky.eval.scoring import Case, score_case
from megatron_longsky.tokenizer.base import Tokenizer
from megatron_longsky.utils.atomic import atomic_write_json, atomic_write_text

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")


@dataclass
class RulerConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=lambda: [1024])
    samples: int = 4
    seed: int = 0
    mode: Literal["base", "chat"] = "base"
    haystack: str = "default"
    haystack_key: str = "text"
    add_bos: bool = True
    max_new_tokens: int = 48
    chat_template: Optional[str] = None
    multikey_distractors: int = 3
    multivalue_values: int = 4
    vt_hops: int = 4
    cwe_common: int = 5
    cwe_common_freq: int = 6
    cwe_rare_freq: int = 2

    def __post_init__(self):
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown RULER task(s) {unknown}; known: {list(TASKS)}")
        if not self.lengths or self.samples < 1:
            raise ValueError("need at least one length and one sample")
        if self.cwe_common_freq <= self.cwe_rare_freq:
            raise ValueError("cwe_common_freq must exceed cwe_rare_freq")


def _rng(cfg: RulerConfig, task: str, length: int, sample: int) -> random.Random:
    return random.Random(f"ruler/{cfg.seed}/{task}/{length}/{sample}")


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def pseudo_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct pronounceable non-words (no dictionary file needed)."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class RulerBuilder:
    def __init__(self, cfg: RulerConfig, tokenizer: Tokenizer, haystack: Optional[Haystack] = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.haystack = haystack or Haystack.from_spec(cfg.haystack, tokenizer, cfg.haystack_key)
        self.template = load_chat_template(tokenizer, cfg.chat_template) if cfg.mode == "chat" else None

    def _frame(self, question: str, answer_prefix: str, instruction: str = ""):
        c = self.cfg
        return make_frame(self.tokenizer, question, answer_prefix, c.mode, self.template, c.add_bos, instruction)

    def _needle_case(self, task: str, length: int, sample: int, distractors: int) -> Case:
        c = self.cfg
        ncfg = NeedleConfig(lengths=[length], depths=[0.0], mode=c.mode, num_distractors=distractors,
                            seed=c.seed * 7919 + TASKS.index(task), add_bos=c.add_bos,
                            chat_template=c.chat_template)
        rng = _rng(c, task, length, sample)
        depth = round(rng.uniform(0, 100), 2)
        builder = NeedleBuilder(ncfg, self.tokenizer, self.haystack)
        built = builder.build(length, sample, depth, sample)
        case = built.cases[0]
        case.meta.update(depth_percent=depth, needles=built.needles)
        return case

    def _scatter_case(self, rng: random.Random, length: int, items: list[str], question: str,
                      answer_prefix: str, answers: list[str], meta: dict) -> Case:
        """``items`` (sentences) at distinct random sentence boundaries, in the given order."""
        tok = self.tokenizer
        frame = self._frame(question, answer_prefix)
        inserts = [{"text": text, "ids": tok.encode(" " + text)} for text in items]
        budget = length - frame.overhead - sum(len(i["ids"]) for i in inserts)
        if budget < 0:
            raise ValueError(f"length {length} is too short for this task ({length - budget} tokens needed)")
        pieces, fragment_first = self.haystack.window(tok, budget, rng.randrange(len(self.haystack.sentences)))
        boundaries, usable = sentence_boundaries(pieces, fragment_first)
        chosen = sorted(rng.sample(usable, len(inserts)) if len(usable) >= len(inserts)
                        else [rng.choice(usable) for _ in inserts])
        slots: dict[int, list[dict]] = {}
        for b, item in zip(chosen, inserts):
            slots.setdefault(b, []).append(item)
        prompt = frame.assemble(assemble_context(pieces, boundaries, slots))
        assert len(prompt) == length
        placed = [{"text": i["text"], "offset": i["offset"], "depth": i["depth"]} for i in inserts]
        return Case(prompt, answers, meta | {"inserted": placed})

    def _multivalue(self, length: int, sample: int) -> Case:
        rng = _rng(self.cfg, "niah_multivalue", length, sample)
        key = rng.choice(KEY_POOL)
        values: list[str] = []
        while len(values) < self.cfg.multivalue_values:
            v = _number(rng)
            if v not in values:
                values.append(v)
        items = [f"One of the special magic numbers for {key} is: {v}." for v in values]
        return self._scatter_case(
            rng, length, items,
            f"What are all the special magic numbers for {key} mentioned in the provided text?",
            f"The special magic numbers for {key} mentioned in the provided text are", values, {"key": key})

    def _variable_tracking(self, length: int, sample: int) -> Case:
        rng = _rng(self.cfg, "variable_tracking", length, sample)
        names: list[str] = []
        while len(names) < 2 * (self.cfg.vt_hops + 1):
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value, other = _number(rng, 5), _number(rng, 5)
        while other == value:
            other = _number(rng, 5)
        chains = []
        for names_, v in ((names[: self.cfg.vt_hops + 1], value), (names[self.cfg.vt_hops + 1:], other)):
            chain = [f"VAR {names_[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names_, names_[1:])]
            chains.append(chain)
        # Interleave the two chains, each in order (a variable is defined before it is used).
        items, i, j = [], 0, 0
        while i < len(chains[0]) or j < len(chains[1]):
            if j >= len(chains[1]) or (i < len(chains[0]) and rng.random() < 0.5):
                items.append(chains[0][i])
                i += 1
            else:
                items.append(chains[1][j])
                j += 1
        answers = names[: self.cfg.vt_hops + 1]
        return self._scatter_case(
            rng, length, items,
            f"Find all variables that are assigned the value {value} in the text above.",
            f"Answer: According to the chain(s) of variables assigned in the text above, {len(answers)} "
            f"variables are assigned the value {value}, they are:", answers, {"value": value})

    def _common_words(self, length: int, sample: int) -> Case:
        c, tok = self.cfg, self.tokenizer
        rng = _rng(c, "common_words", length, sample)
        # Every list entry takes a few tokens: length // 2 rare words are always enough.
        vocab = pseudo_words(rng, c.cwe_common + length // 2 + 16)
        common, rare = vocab[: c.cwe_common], vocab[c.cwe_common:]
        order_seed = rng.randrange(2**31)
        question = f"What are the {c.cwe_common} most common words in the above list?"
        prefix = f"Answer: The top {c.cwe_common} words that appear most often in the list are:"
        frame = self._frame(question, prefix,
                            "Below is a numbered list of words. In these words, some appear more often than "
                            "others. Memorize the ones that appear most often.")

        def build(n_rare: int) -> tuple[list[int], list[str]]:
            words = common * c.cwe_common_freq + rare[:n_rare] * c.cwe_rare_freq
            random.Random(order_seed).shuffle(words)
            text = "".join(f"\n{i + 1}. {w}" for i, w in enumerate(words))
            return tok.encode(text), words

        lo, hi = 0, len(rare)
        if len(frame.assemble(build(0)[0])) > length:
            raise ValueError(f"length {length} is too short for common_words with {c.cwe_common} words "
                             f"x {c.cwe_common_freq}")
        while lo < hi:  # the largest number of rare words whose prompt fits
            mid = (lo + hi + 1) // 2
            if len(frame.assemble(build(mid)[0])) <= length:
                lo = mid
            else:
                hi = mid - 1
        context, words = build(lo)
        answers = sorted(common, key=words.index)
        return Case(frame.assemble(context), answers, {"list_entries": len(words), "rare_words": lo})

    def build(self, task: str, length: int, sample: int) -> Case:
        if task == "niah_single":
            return self._needle_case(task, length, sample, 0)
        if task == "niah_multikey":
            return self._needle_case(task, length, sample, self.cfg.multikey_distractors)
        if task == "niah_multivalue":
            return self._multivalue(length, sample)
        if task == "variable_tracking":
            return self._variable_tracking(length, sample)
        if task == "common_words":
            return self._common_words(length, sample)
        raise ValueError(f"unknown RULER task {task!r}")


@dataclass
class RulerResult:
    config: dict
    rows: list[dict]
    model: str = ""

    def accuracy(self, task: Optional[str] = None, length: Optional[int] = None) -> float:
        rows = [r for r in self.rows if (task is None or r["task"] == task) and (length is None or r["length"] == length)]
        return sum(r["passed"] for r in rows) / len(rows) if rows else 0.0

    def to_dict(self) -> dict:
        tasks = list(dict.fromkeys(r["task"] for r in self.rows))
        lengths = sorted({r["length"] for r in self.rows})
        return {"model": self.model, "config": self.config, "accuracy": self.accuracy(),
                "per_task": {t: {str(n): self.accuracy(t, n) for n in lengths} for t in tasks},
                "rows": self.rows}

    def markdown(self) -> str:
        tasks = list(dict.fromkeys(r["task"] for r in self.rows))
        lengths = sorted({r["length"] for r in self.rows})
        lines = [f"# RULER-style tasks{': ' + self.model if self.model else ''}", "",
                 f"- mode: {self.config.get('mode')}; samples per task and length: {self.config.get('samples')}; "
                 f"seed: {self.config.get('seed')}",
                 f"- overall accuracy: **{self.accuracy():.1%}**", "",
                 "| task | " + " | ".join(str(n) for n in lengths) + " |",
                 "|---|" + "---:|" * len(lengths)]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(f"{self.accuracy(t, n):.1%}" for n in lengths) + " |")
        return "\n".join(lines) + "\n"


def run_ruler(cfg: RulerConfig, backend: LMBackend, tokenizer: Tokenizer, model_name: str = "",
              haystack: Optional[Haystack] = None, progress: bool = True, journal_dir: Optional[str] = None,
              model_source: str = "") -> RulerResult:
    """``journal_dir``: resumable, as :func:`megatron_longsky.eval.needle.run_needle`."""
    from megatron_longsky.eval.distribute import sharded_map, sweep_journal
    from megatron_longsky.utils.progress import progress_bar

    builder = RulerBuilder(cfg, tokenizer, haystack)
    grid = [(t, n, s) for t in cfg.tasks for n in cfg.lengths for s in range(cfg.samples)]

    def evaluate(point) -> dict:
        task, length, sample = point
        case = builder.build(task, length, sample)
        result = score_case(backend, tokenizer, case, cfg.mode, cfg.max_new_tokens)
        return {"task": task, "length": length, "sample": sample, "prompt_tokens": len(case.prompt_ids),
                **result.to_dict(), "meta": case.meta}

    journal = None
    if journal_dir is not None:
        journal = sweep_journal(journal_dir, "ruler", asdict(cfg), model_source or model_name, tokenizer,
                                key=lambda p: f"{p[0]}/{p[1]}/{p[2]}")
    with progress_bar(total=len(grid), desc="ruler", unit="sample", enabled=progress, leave=False) as bar:
        rows = sharded_map(grid, evaluate, bar, journal)
    return RulerResult(asdict(cfg) | {"haystack_source": builder.haystack.source}, rows, model_name)


def write_ruler_report(result: RulerResult, out_dir: str | Path, name: str = "ruler") -> dict:
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_write_json(paths["json"], result.to_dict())
    atomic_write_text(paths["md"], result.markdown())
    return {k: str(v) for k, v in paths.items()}
