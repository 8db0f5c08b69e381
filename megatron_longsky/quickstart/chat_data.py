"""A small built-in instruction set for the quickstart's standard SFT stage.

Derived from the quickstart corpus so it needs no download; every answer is exact
(copying, first/last word, the word that follows a given word), so SFT accuracy can
be measured by exact match, like the SynL stage after it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from megatron_longsky.utils.atomic import atomic_path

_WORD = re.compile(r"[A-Za-z]{3,}")


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if 30 <= len(p) <= 160]


def _task(sentence: str, rng: random.Random) -> tuple[str, str] | None:
    words = _WORD.findall(sentence)
    if len(words) < 4:
        return None
    kind = rng.randrange(4)
    if kind == 0:
        return f"Repeat exactly: {sentence}", sentence
    if kind == 1:
        return f"What is the first word of: {sentence}", words[0]
    if kind == 2:
        return f"What is the last word of: {sentence}", words[-1]
    i = rng.randrange(len(words) - 1)
    if words.count(words[i]) > 1:
        return None
    return f"Which word follows '{words[i]}' in: {sentence}", words[i + 1]


def build_chat_data(corpus_jsonl: str | Path, out_path: str | Path, num_samples: int, seed: int = 0) -> int:
    """Write ``num_samples`` chat records (``messages`` jsonl); returns how many were written."""
    rng = random.Random(seed)
    sentences: list[str] = []
    with open(corpus_jsonl, encoding="utf-8") as f:
        for line in f:
            sentences.extend(_sentences(json.loads(line)["text"]))
    if not sentences:
        raise ValueError(f"{corpus_jsonl}: no sentences of 30-160 characters to build chat data from")
    rng.shuffle(sentences)
    written = 0
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for sentence in sentences:
            task = _task(sentence, rng)
            if task is None:
                continue
            prompt, answer = task
            record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            out.write(json.dumps(record) + "\n")
            written += 1
            if written == num_samples:
                break
    return written
