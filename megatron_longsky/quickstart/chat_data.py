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


def build_continuation_data(corpus_jsonl: str | Path, out_path: str | Path, num_samples: int, seed: int = 0,
                            max_chars: int = 3000) -> int:
    """General-text chat records for mixing into long SFT: the user gives the start of a
    training document, the assistant continues it (up to ``max_chars`` in all), so SFT's
    assistant-only loss still covers ordinary text. Returns how many were written."""
    rng = random.Random(seed)
    texts = []
    with open(corpus_jsonl, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if len(text) >= 600:
                texts.append(text)
    if not texts:
        raise ValueError(f"{corpus_jsonl}: no document of 600 characters or more to build continuations from")
    written = 0
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        while written < num_samples:
            text = rng.choice(texts)
            start = rng.randrange(max(1, len(text) - max_chars))
            window = text[start:start + max_chars]
            cut = rng.randrange(len(window) // 8, len(window) // 3)
            record = {"messages": [{"role": "user", "content": "Continue the text:\n" + window[:cut]},
                                   {"role": "assistant", "content": window[cut:]}]}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return written
