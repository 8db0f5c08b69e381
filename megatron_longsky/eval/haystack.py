"""Haystack text for long-context tests: a list of sentences, tokenized lazily.

Sources: a built-in generated essay (needs no files and contains no digits, so a
numeric needle value can never collide with it), a plain-text or jsonl corpus file,
or a Megatron indexed dataset decoded with the tokenizer. Corpus text is split into
sentences with Punkt (:mod:`megatron_longsky.data.sentences`), so needles go in at
real sentence boundaries.

Every sentence is encoded on its own as ``" " + sentence`` (leading space, never
special tokens), so a context is a concatenation of whole-sentence token runs and
its length in tokens is known exactly.
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path
from typing import Iterator, Optional

from megatron_longsky.eval.errors import EvalInputError
from megatron_longsky.tokenizer.base import Tokenizer

# A small grammar for the built-in haystack: varied, digit-free, deterministic.
_SUBJECTS = (
    "The river", "An old map", "The northern valley", "A quiet village", "The library",
    "Every gardener", "The mountain path", "A patient teacher", "The harbor", "Most travelers",
    "The orchard", "A careful builder", "The evening market", "The forest", "A young painter",
    "The lighthouse keeper", "The committee", "A wandering poet", "The kitchen", "The old bridge",
)
_VERBS = (
    "remembers", "describes", "follows", "protects", "reflects", "celebrates", "carries",
    "questions", "welcomes", "outlasts", "shapes", "ignores", "reveals", "collects", "echoes",
)
_OBJECTS = (
    "the songs of the season", "a story about patience", "the colors of early autumn",
    "the habits of the local birds", "a forgotten recipe for bread", "the shape of the hills",
    "the sound of distant bells", "the rhythm of the tides", "an argument about the weather",
    "the slow work of the seasons", "the names of the stars", "a letter from a friend",
    "the smell of fresh rain", "the patterns in the old stones", "the history of the town",
)
_TAILS = (
    "", " without any hurry", " in the early morning", " as the years go by",
    " when nobody is watching", " with quiet care", " for reasons of its own",
    " long after the festival ends", " under a pale sky", " like it always has",
)


def default_sentences(count: int = 20000, seed: int = 1234) -> list[str]:
    """The built-in haystack: ``count`` generated sentences (fixed seed, no digits)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
        for _ in range(count)
    ]


def _read_documents(path: Path, json_key: str) -> Iterator[str]:
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalInputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                text = record.get(json_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise EvalInputError(f"{path}:{lineno}: no string field {json_key!r}")
                yield text
    else:
        yield path.read_text(encoding="utf-8")


def split_documents(documents: list[str]) -> list[str]:
    """Whitespace-normalised sentences of ``documents`` (Punkt, offline)."""
    from megatron_longsky.data.sentences import load_sentence_splitter

    splitter = load_sentence_splitter(documents)
    sentences = []
    for doc in documents:
        for piece in splitter.split(doc):
            piece = " ".join(piece.split())
            if piece:
                sentences.append(piece)
    return sentences


class Haystack:
    """An ordered list of sentences; a context is a window of it, wrapping around.

    The built-in one has 20000 sentences (1.4M characters, roughly 300K tokens of a
    Llama-style tokenizer) before it repeats.
    """

    def __init__(self, sentences: list[str], source: str):
        if not sentences:
            raise EvalInputError(f"haystack {source}: no sentences (an empty file?)")
        self.sentences = sentences
        self.source = source
        self._cache: dict[int, list[int]] = {}
        self._cache_owner: Optional[str] = None

    @classmethod
    def default(cls) -> "Haystack":
        return cls(default_sentences(), "built-in generated essay")

    @classmethod
    def from_file(cls, path: str | Path, json_key: str = "text") -> "Haystack":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "haystack file does not exist", str(path))
        try:
            documents = list(_read_documents(path, json_key))
        except UnicodeDecodeError as exc:
            raise EvalInputError(f"haystack file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        return cls(split_documents(documents), str(path))

    @classmethod
    def from_indexed(cls, prefix: str, tokenizer: Tokenizer, max_documents: int = 1000) -> "Haystack":
        from megatron_longsky.data.indexed import open_indexed

        dataset = open_indexed(prefix)
        bounds = dataset.document_indices
        docs = []
        for d in range(min(len(bounds) - 1, max_documents)):
            ids = [int(t) for s in range(bounds[d], bounds[d + 1]) for t in dataset[s]]
            docs.append(tokenizer.decode([t for t in ids if t != tokenizer.eod_id]))
        return cls(split_documents(docs), f"indexed dataset {prefix}")

    @classmethod
    def from_spec(cls, spec: str, tokenizer: Tokenizer, json_key: str = "text") -> "Haystack":
        """``default``, ``indexed:<prefix>`` or a ``.txt``/``.jsonl`` path."""
        if spec == "default":
            return cls.default()
        if spec.startswith("indexed:"):
            return cls.from_indexed(spec[len("indexed:"):], tokenizer)
        return cls.from_file(spec, json_key)

    def sentence_ids(self, tokenizer: Tokenizer, index: int) -> list[int]:
        """Tokens of sentence ``index`` (mod the haystack size), encoded as ``" " + text``."""
        if self._cache_owner != tokenizer.fingerprint:
            self._cache, self._cache_owner = {}, tokenizer.fingerprint
        index %= len(self.sentences)
        ids = self._cache.get(index)
        if ids is None:
            ids = self._cache[index] = tokenizer.encode(" " + self.sentences[index])
        return ids

    def window(self, tokenizer: Tokenizer, num_tokens: int, start: int) -> tuple[list[list[int]], bool]:
        """Sentences from ``start`` on, totalling exactly ``num_tokens`` tokens, and whether
        the first one is a fragment (the start of the window is then no sentence boundary).

        The window is cut from the left (inside its first sentence) to make the total
        exact, so it ends on a sentence end and every later boundary is a real one.
        """
        if num_tokens < 0:
            raise ValueError(f"haystack window of {num_tokens} tokens")
        pieces: list[list[int]] = []
        total = 0
        index = start
        empty_run = 0
        while total < num_tokens:
            ids = self.sentence_ids(tokenizer, index)
            if ids:
                pieces.append(ids)
                total += len(ids)
                empty_run = 0
            else:
                empty_run += 1
                if empty_run == len(self.sentences):
                    raise EvalInputError(f"haystack {self.source}: sentences encode to no tokens")
            index += 1
        # The window was filled front to back; take the tokens from the back.
        excess = total - num_tokens
        while pieces and excess >= len(pieces[0]):
            excess -= len(pieces.pop(0))
        if excess:
            pieces[0] = pieces[0][excess:]
        return pieces, excess > 0
