"""Recall drills: deterministic, every query answerable from an earlier fact, never the
needle test's wording or value length."""

import json
import random
import re

from megatron_longsky.data.builtin_corpus import build_builtin_corpus
from megatron_longsky.data.recall_drills import drill_document, recall_drill, repeat_drill

FILLER = ["Return the sum of the arguments.", "The object is hashable if it defines __hash__().",
          "Raise ValueError when the string is empty."]


def test_drills_are_deterministic_for_a_seed():
    assert drill_document(random.Random(3), "\n".join(FILLER), 2000) == \
        drill_document(random.Random(3), "\n".join(FILLER), 2000)
    assert drill_document(random.Random(3), "\n".join(FILLER), 2000) != \
        drill_document(random.Random(4), "\n".join(FILLER), 2000)


def test_every_query_copies_the_value_of_an_earlier_fact_with_its_key():
    rng = random.Random(0)
    for _ in range(200):
        text = recall_drill(rng, FILLER)
        lines = [line for line in text.split("\n") if line not in FILLER]
        n = len(lines) // 2
        facts, queries = lines[:n], lines[n:]
        for query in queries:
            value = re.findall(r"\d+", query)[-1]
            # the fact whose value this is names the same key, and comes earlier
            fact = next(f for f in facts if re.findall(r"\d+", f)[-1] == value)
            before_value = fact[: fact.rindex(value)].split()
            assert " ".join(before_value[-2:]) in query


def test_drills_never_use_the_needle_template_or_seven_digit_values():
    text = drill_document(random.Random(1), "\n".join(FILLER), 200_000)
    assert "magic number" not in text and "provided text" not in text
    numbers = re.findall(r"\d+", text.replace("__hash__", ""))
    assert numbers and all(3 <= len(n) <= 6 for n in numbers)


def test_repeat_drill_repeats_its_line():
    first, second = repeat_drill(random.Random(2)).split("\n")
    assert first.split(": ", 1)[1] == second.split(": ", 1)[1]


def test_drill_fraction_sets_the_share_of_drill_bytes(tmp_path):
    stats = build_builtin_corpus(tmp_path / "train.jsonl", max_bytes=200_000, seed=0, drill_fraction=0.5)
    docs = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    drill_bytes = sum(len(d["text"].encode()) for d in docs if d["source"] == "drill")
    assert 0.4 < drill_bytes / stats["bytes"] < 0.6
    assert all(d["name"].startswith("drill:") for d in docs if d["source"] == "drill")
