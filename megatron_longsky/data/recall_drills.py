"""Recall drills: short documents of made-up key -> value facts, each asked about further on.

A drill states a few facts ("The shelf number of Kelvo-Tamsi is 48213."), between
lines of ordinary text (from a corpus document), then asks about them in another
order, and every answer repeats the fact's words up to the value: predicting the
value means finding the key earlier in the context and copying what followed it
(multi-query associative recall). Several facts share one attribute, so only the
key tells them apart. Dense in copy targets, this is the signal with which a tiny
attention model learns induction (retrieval) within a few hundred steps.

Keys are made-up syllable names and values have 3 to 6 digits; the wording has no
"magic number" and no "mentioned in the provided text": the needle test's template,
keys, 7-digit values and haystack never occur in a drill.
"""

from __future__ import annotations

import random
from typing import Sequence

_SYLLABLES = ("ka", "lo", "mi", "ter", "vos", "zu", "ben", "dra", "fel", "gor", "hin", "jas", "kel", "mar",
              "nov", "pil", "quo", "ras", "sel", "tam", "ul", "vek", "wen", "yor", "zan", "bri", "cor", "dun")
ATTRIBUTES = ("locker number", "access code", "serial number", "room number", "ticket number", "order code",
              "account number", "batch number", "reference code", "pin", "badge number", "shelf number",
              "gate number", "parcel code", "seat number", "line number", "voucher code", "permit number")
# (fact, query): the query ends with the fact's words up to the value, then the value;
# the key comes right before the value's verb, so "<key> is" is what points at the value.
TEMPLATES = (
    ("The {attr} of {key} is {value}.", "What is the {attr} of {key}? The {attr} of {key} is {value}."),
    ("The {attr} for {key} is {value}.", "Which {attr} was given for {key}? The {attr} for {key} is {value}."),
    ("Record: {attr} of {key} = {value}.", "Lookup: {attr} of {key} = {value}."),
    ("The {attr} assigned to {key} is {value}.", "As stated before, the {attr} assigned to {key} is {value}."),
    ("We set the {attr} of {key} to {value}.", "Recall the {attr} of {key}. We set the {attr} of {key} to {value}."),
)
MIN_DIGITS, MAX_DIGITS = 3, 6  # never 7: the needle test's value length


def made_up_key(rng: random.Random) -> str:
    def word():
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    return f"{word()}-{word()}" if rng.random() < 0.6 else word()


def number(rng: random.Random) -> str:
    digits = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def draw_facts(rng: random.Random, n: int, templates: Sequence) -> tuple:
    """A template from ``templates`` and ``n`` facts about distinct made-up keys (most share
    one attribute, so the key is what tells them apart): ``(template, facts)``."""
    template = rng.choice(templates)
    shared_attr = rng.choice(ATTRIBUTES) if rng.random() < 0.7 else None
    keys: list[str] = []
    while len(keys) < n:
        key = made_up_key(rng)
        if key not in keys:
            keys.append(key)
    return template, [{"attr": shared_attr or rng.choice(ATTRIBUTES), "key": k, "value": number(rng)} for k in keys]


def recall_drill(rng: random.Random, filler: list[str], min_facts: int = 2, max_facts: int = 4,
                 max_filler: int = 1) -> str:
    """One drill: facts between ``filler`` lines, then a query for every fact (another order)."""
    template, facts = draw_facts(rng, rng.randint(min_facts, max_facts), TEMPLATES)
    fill = iter(filler[rng.randrange(len(filler)):] + filler) if filler else iter(())

    def some_filler() -> list[str]:
        out = []
        for _ in range(rng.randint(0, max_filler)):
            line = next(fill, None)
            if line is not None:
                out.append(line)
        return out

    lines: list[str] = []
    for fact in facts:
        lines += some_filler()
        lines.append(template[0].format(**fact))
    order = facts[:]
    rng.shuffle(order)
    for fact in order:
        lines += some_filler()
        lines.append(template[1].format(**fact))
    return "\n".join(lines)


def repeat_drill(rng: random.Random, words: list[str] = ()) -> str:
    """A line of words (drawn at random from ``words``, the source document's, with some
    made-up names and numbers), then the same line again: every token of the repeat can
    be copied, and random words are hard to guess otherwise (the plainest induction signal)."""
    def item() -> str:
        r = rng.random()
        if words and r < 0.7:
            return rng.choice(words)
        return made_up_key(rng) if r < 0.85 else number(rng)
    line = " ".join(item() for _ in range(rng.randint(6, 16)))
    head = rng.choice(("Sequence", "Items", "Tokens", "List", "Words"))
    return f"{head}: {line}.\n{head} again: {line}."


def _words(text: str) -> list[str]:
    return sorted({w for w in text.split() if w.isalpha() and 3 <= len(w) <= 14})


def filler_lines(text: str, max_chars: int = 100) -> list[str]:
    """Non-empty lines of ``text`` (stripped, cut to ``max_chars``) to put between facts."""
    return [line.strip()[:max_chars] for line in text.split("\n") if len(line.strip()) >= 8]


def drill_document(rng: random.Random, source_text: str, target_chars: int, repeat_share: float = 0.3) -> str:
    """Drills back to back (blank line between) until about ``target_chars`` characters."""
    filler = filler_lines(source_text)
    words = _words(source_text)
    drills, size = [], 0
    while size < target_chars:
        drill = repeat_drill(rng, words) if rng.random() < repeat_share else recall_drill(rng, filler)
        drills.append(drill)
        size += len(drill) + 2
    return "\n\n".join(drills) + "\n"
