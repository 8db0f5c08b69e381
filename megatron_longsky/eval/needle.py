"""The needle-in-a-haystack sweep: a fixed grid of lengths x depths, exact prompts.

For each cell (length L, depth d) and sample s, a generator seeded from
``(seed, L, depth index, s)`` picks a haystack window, needle keys and values. The
needle sentence is encoded alone (no special tokens) and inserted at the sentence
boundary nearest to ``d`` of the haystack; the haystack is sized so the whole
prompt (BOS/template + context + question + answer prefix) is exactly L tokens.

- ``num_needles > 1``: that many needles with different keys, the first at depth d
  and the rest spread evenly after it; the sample passes only if every one is
  retrieved (one question each, over the same context).
- ``num_distractors``: extra needles with other keys at random boundaries; they are
  never asked about, they only make retrieving the right key harder.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_longsky.eval.backends import LMBackend
from megatron_longsky.eval.errors import EvalInputError
from megatron_longsky.eval.haystack import Haystack
from megatron_longsky.eval.prompt import PromptFrame, load_chat_template, make_frame
from megatron_longsky.eval.scoring import Case, CaseResult, score_case
from megatron_longsky.tokenizer.base import Tokenizer

log = logging.getLogger(__name__)

_KEY_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "misty", "noble", "odd", "proud", "quiet", "rusty", "silent", "tidy",
    "upbeat", "vivid", "witty", "young", "zesty",
)
_KEY_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "ember", "falcon", "glacier", "harbor", "island",
    "jaguar", "kettle", "lantern", "meadow", "nectar", "otter", "pepper", "quartz", "raven",
    "saddle", "tundra", "umbrella", "violin", "walrus", "yarrow", "zephyr",
)
KEY_POOL = tuple(f"{a}-{n}" for a in _KEY_ADJECTIVES for n in _KEY_NOUNS)


@dataclass
class NeedleConfig:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    # Depths in percent (0 = start of the context, 100 = end); None: num_depths of them.
    depths: Optional[list[float]] = None
    num_depths: int = 11
    depth_spacing: Literal["linear", "sigmoid"] = "linear"
    samples: int = 1
    seed: int = 0
    mode: Literal["base", "chat"] = "base"
    num_needles: int = 1
    num_distractors: int = 0
    needle: str = "The special magic number for {key} is {value}."
    question: str = "What is the special magic number for {key} mentioned in the provided text?"
    answer_prefix: str = "The special magic number for {key} is"
    value_digits: int = 7
    # "default" (built in), a .txt / .jsonl file, or "indexed:<prefix>".
    haystack: str = "default"
    haystack_key: str = "text"
    add_bos: bool = True
    max_new_tokens: int = 16
    # A Jinja file overriding the tokenizer's chat template (chat mode).
    chat_template: Optional[str] = None
    # Text placed before the context (e.g. the passkey task's instruction).
    instruction: str = ""

    def __post_init__(self):
        if not self.lengths or any(length < 1 for length in self.lengths):
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if self.depths is not None and any(not 0 <= d <= 100 for d in self.depths):
            raise ValueError(f"depths are percentages in [0, 100], got {self.depths}")
        if self.num_depths < 1 or self.samples < 1 or self.num_needles < 1 or self.num_distractors < 0:
            raise ValueError("num_depths, samples and num_needles must be >= 1, num_distractors >= 0")
        if self.value_digits < 1:
            raise ValueError("value_digits must be >= 1")
        if self.num_needles > 1 or self.num_distractors:
            # Several needles are told apart by their keys.
            for name in ("needle", "question", "answer_prefix"):
                if "{key}" not in getattr(self, name):
                    raise ValueError(f"{name} template must contain {{key}} with several needles: "
                                     f"{getattr(self, name)!r}")
        if "{value}" not in self.needle:
            raise ValueError(f"needle template must contain {{value}}: {self.needle!r}")

    def depth_percents(self) -> list[float]:
        if self.depths is not None:
            return [float(d) for d in self.depths]
        return depth_grid(self.num_depths, self.depth_spacing)


def depth_grid(n: int, spacing: str = "linear") -> list[float]:
    """``n`` depths in percent from 0 to 100; sigmoid spacing puts more near both ends."""
    if n == 1:
        return [50.0]
    ts = [i / (n - 1) for i in range(n)]
    if spacing == "linear":
        return [round(100 * t, 4) for t in ts]
    if spacing == "sigmoid":
        k = 10.0
        lo, hi = 1 / (1 + math.exp(k / 2)), 1 / (1 + math.exp(-k / 2))
        return [round(100 * ((1 / (1 + math.exp(-k * (t - 0.5)))) - lo) / (hi - lo), 4) for t in ts]
    raise ValueError(f"depth spacing must be 'linear' or 'sigmoid', got {spacing!r}")


@dataclass
class NeedleSample:
    """One prompt context with its needles; ``cases`` holds one question per target needle."""

    length: int
    depth_percent: float
    sample: int
    context: list[int]
    cases: list[Case]
    # Per inserted needle: key, value, role (target/distractor), token offset in the
    # context, and the depth actually used (fraction of the haystack before it).
    needles: list[dict]


def _sample_rng(seed: int, length: int, depth_index: int, sample: int) -> random.Random:
    return random.Random(f"needle/{seed}/{length}/{depth_index}/{sample}")


def _draw_value(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def sentence_boundaries(pieces: list[list[int]], fragment_first: bool) -> tuple[list[int], list[int]]:
    """Token offsets of the boundaries between ``pieces`` (start and end included), and
    the indices usable for insertion (not the start when the window opens mid-sentence)."""
    boundaries = [0]
    for p in pieces:
        boundaries.append(boundaries[-1] + len(p))
    usable = list(range(1 if fragment_first and len(pieces) > 1 else 0, len(boundaries)))
    return boundaries, usable


def assemble_context(pieces: list[list[int]], boundaries: list[int], slots: dict[int, list[dict]]) -> list[int]:
    """Haystack pieces with each slot's items (dicts with ``ids``) inserted at their boundary;
    records each item's ``offset`` in the context and ``depth`` (haystack fraction before it)."""
    total = boundaries[-1]
    context: list[int] = []
    for i in range(len(boundaries)):
        for item in slots.get(i, []):
            item["offset"] = len(context)
            item["depth"] = boundaries[i] / total if total else 0.0
            context.extend(item["ids"])
        if i < len(pieces):
            context.extend(pieces[i])
    return context


def _nearest_boundary(boundaries: list[int], usable: list[int], target: float, taken: set[int]) -> int:
    free = [i for i in usable if i not in taken] or usable
    return min(free, key=lambda i: (abs(boundaries[i] - target), i))


class NeedleBuilder:
    """Builds the exact prompts of the grid for one tokenizer."""

    def __init__(self, cfg: NeedleConfig, tokenizer: Tokenizer, haystack: Optional[Haystack] = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.haystack = haystack or Haystack.from_spec(cfg.haystack, tokenizer, cfg.haystack_key)
        self.template = load_chat_template(tokenizer, cfg.chat_template) if cfg.mode == "chat" else None

    def frame(self, key: str) -> PromptFrame:
        c = self.cfg
        return make_frame(self.tokenizer, c.question.format(key=key), c.answer_prefix.format(key=key),
                          c.mode, self.template, c.add_bos, c.instruction)

    def _pick_keys(self, rng: random.Random) -> tuple[list[str], list[str]]:
        """Target keys whose question frames have equal length (so every prompt is exactly L),
        and distractor keys; all distinct."""
        pool = list(KEY_POOL)
        rng.shuffle(pool)
        first = pool[0]
        overhead = self.frame(first).overhead
        targets = [first]
        rest = []
        for key in pool[1:]:
            if len(targets) < self.cfg.num_needles and self.frame(key).overhead == overhead:
                targets.append(key)
            else:
                rest.append(key)
        if len(targets) < self.cfg.num_needles:
            raise EvalInputError(f"cannot find {self.cfg.num_needles} needle keys whose questions have the same "
                             "token length; use fewer needles")
        if len(rest) < self.cfg.num_distractors:
            raise EvalInputError(f"at most {len(rest)} distractors are available")
        return targets, rest[: self.cfg.num_distractors]

    def _draw_needles(self, rng: random.Random, targets: list[str], distractors: list[str]) -> list[dict]:
        values: set[str] = set()
        needles = []
        for role, keys in (("target", targets), ("distractor", distractors)):
            for key in keys:
                value = _draw_value(rng, self.cfg.value_digits)
                while value in values:
                    value = _draw_value(rng, self.cfg.value_digits)
                values.add(value)
                ids = self.tokenizer.encode(" " + self.cfg.needle.format(key=key, value=value))
                needles.append({"key": key, "value": value, "role": role, "ids": ids})
        return needles

    def build(self, length: int, depth_index: int, depth_percent: float, sample: int) -> NeedleSample:
        cfg, tok = self.cfg, self.tokenizer
        rng = _sample_rng(cfg.seed, length, depth_index, sample)
        targets, distractors = self._pick_keys(rng)
        frames = [self.frame(key) for key in targets]
        start = rng.randrange(len(self.haystack.sentences))
        for _attempt in range(10):
            needles = self._draw_needles(rng, targets, distractors)
            budget = length - frames[0].overhead - sum(len(n["ids"]) for n in needles)
            if budget < 0:
                raise EvalInputError(f"--lengths: length {length} is too short for this tokenizer: the question, "
                                     f"template and needles alone take {length - budget} tokens")
            pieces, fragment_first = self.haystack.window(tok, budget, start)
            # A value must occur only in its needle: redraw if the haystack contains one.
            text = tok.decode([t for p in pieces for t in p])
            if not any(n["value"] in text for n in needles):
                break
        else:
            raise EvalInputError(f"haystack {self.haystack.source} keeps containing the drawn needle values; "
                                 "use more value_digits")
        boundaries, usable = sentence_boundaries(pieces, fragment_first)

        # Target depths: d, then evenly spread over the rest of the context.
        d = depth_percent / 100.0
        k = len(targets)
        slots: dict[int, list[dict]] = {}
        taken: set[int] = set()
        for i, needle in enumerate(n for n in needles if n["role"] == "target"):
            want = (d + i * (1.0 - d) / k) * budget
            b = _nearest_boundary(boundaries, usable, want, taken if k > 1 else set())
            taken.add(b)
            slots.setdefault(b, []).append(needle)
        for needle in (n for n in needles if n["role"] == "distractor"):
            b = rng.choice([i for i in usable if i not in taken] or usable)
            slots.setdefault(b, []).append(needle)

        context = assemble_context(pieces, boundaries, slots)

        cases = []
        for frame, needle in zip(frames, (n for n in needles if n["role"] == "target")):
            prompt = frame.assemble(context)
            assert len(prompt) == length, (len(prompt), length)
            cases.append(Case(prompt_ids=prompt, answers=[needle["value"]],
                              meta={"key": needle["key"], "context_offset": len(frame.prefix)}))
        info = [{k: v for k, v in n.items() if k != "ids"} | {"tokens": len(n["ids"])} for n in needles]
        return NeedleSample(length, depth_percent, sample, context, cases, info)

    def grid(self):
        """Every (length, depth index, depth percent, sample) of the sweep, in order."""
        for length in self.cfg.lengths:
            for j, depth in enumerate(self.cfg.depth_percents()):
                for s in range(self.cfg.samples):
                    yield length, j, depth, s


def check_needle_inputs(cfg: NeedleConfig, tokenizer: Tokenizer) -> NeedleBuilder:
    """What the sweep needs besides the model, checked before the model is loaded: the
    haystack, the chat template (chat mode) and that the shortest length holds the question,
    template and needles. Returns the builder (pass its ``haystack`` to :func:`run_needle`)."""
    builder = NeedleBuilder(cfg, tokenizer)
    builder.build(*min(builder.grid(), key=lambda point: point[0]))
    return builder


@dataclass
class SampleResult:
    sample: int
    passed: bool
    needles: list[dict]
    cases: list[CaseResult]

    def to_dict(self) -> dict:
        return {"sample": self.sample, "passed": self.passed, "needles": self.needles,
                "cases": [c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, data: dict) -> "SampleResult":
        return cls(data["sample"], data["passed"], data["needles"], [CaseResult(**c) for c in data["cases"]])


@dataclass
class CellResult:
    length: int
    depth_percent: float
    samples: list[SampleResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(s.passed for s in self.samples) / len(self.samples) if self.samples else 0.0

    def to_dict(self) -> dict:
        return {"length": self.length, "depth_percent": self.depth_percent, "accuracy": self.accuracy,
                "samples": [s.to_dict() for s in self.samples]}


@dataclass
class NeedleResult:
    config: dict
    cells: list[CellResult]
    model: str = ""

    @property
    def lengths(self) -> list[int]:
        return sorted({c.length for c in self.cells})

    @property
    def depths(self) -> list[float]:
        return sorted({c.depth_percent for c in self.cells})

    @property
    def accuracy(self) -> float:
        total = [s.passed for c in self.cells for s in c.samples]
        return sum(total) / len(total) if total else 0.0

    def length_accuracy(self, length: int) -> float:
        total = [s.passed for c in self.cells if c.length == length for s in c.samples]
        return sum(total) / len(total) if total else 0.0

    def longest_length_all_passed(self) -> Optional[int]:
        """The longest length at which every cell's every sample passed (None if none)."""
        ok = [n for n in self.lengths if all(c.accuracy == 1.0 for c in self.cells if c.length == n)]
        return max(ok) if ok else None

    def cell(self, length: int, depth_percent: float) -> CellResult:
        for c in self.cells:
            if c.length == length and c.depth_percent == depth_percent:
                return c
        raise KeyError((length, depth_percent))

    def to_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "accuracy": self.accuracy,
                "per_length": {str(n): self.length_accuracy(n) for n in self.lengths},
                "longest_length_all_passed": self.longest_length_all_passed(),
                "cells": [c.to_dict() for c in self.cells]}


def run_needle(cfg: NeedleConfig, backend: LMBackend, tokenizer: Tokenizer, model_name: str = "",
               haystack: Optional[Haystack] = None, progress: bool = True,
               journal_dir: Optional[str] = None, model_source: str = "",
               journal_name: str = "") -> NeedleResult:
    """Run the whole sweep; deterministic for a given config, tokenizer and model.

    In a Megatron job with several data-parallel replicas the samples are spread over
    them (:mod:`megatron_longsky.eval.distribute`); every rank returns the full result.
    ``journal_dir``: keep finished samples in ``<journal_dir>/<name>.partial.jsonl`` and
    resume from it (a requeued job); ``model_source`` names the model for that journal.
    """
    from dataclasses import asdict

    from megatron_longsky.eval.distribute import sharded_map, sweep_journal
    from megatron_longsky.utils.progress import progress_bar

    builder = NeedleBuilder(cfg, tokenizer, haystack)
    grid = list(builder.grid())

    def evaluate(point) -> SampleResult:
        length, j, depth, s = point
        sample = builder.build(length, j, depth, s)
        results = [score_case(backend, tokenizer, case, cfg.mode, cfg.max_new_tokens) for case in sample.cases]
        return SampleResult(s, all(r.passed for r in results), sample.needles, results)

    journal = None
    if journal_dir is not None:
        journal = sweep_journal(journal_dir, journal_name or "needle", asdict(cfg), model_source or model_name,
                                tokenizer, key=lambda p: f"{p[0]}/{p[1]}/{p[3]}",
                                encode=SampleResult.to_dict, decode=SampleResult.from_dict)
    with progress_bar(total=len(grid), desc="needle", unit="sample", enabled=progress, leave=False) as bar:
        samples = sharded_map(grid, evaluate, bar, journal)
    cells: dict[tuple[int, float], CellResult] = {}
    for (length, _, depth, _), sample_result in zip(grid, samples):
        cells.setdefault((length, depth), CellResult(length, depth)).samples.append(sample_result)
    result = NeedleResult(config=asdict(cfg) | {"haystack_source": builder.haystack.source},
                          cells=list(cells.values()), model=model_name)
    log.info("needle: accuracy %.3f over %d cells", result.accuracy, len(result.cells))
    return result
