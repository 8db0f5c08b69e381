"""Retrieval curriculum: fixed-length samples with loss masks that teach "find the key, copy its value".

The quickstart's stand-in for "a pretrained model that already retrieves": a tiny model
trained on natural text alone never learns to copy from its context within a CPU budget
(benchmarks/RESULTS.md, "Retrieval formation"), because the loss on every token is
dominated by tokens no copy can predict. These samples put the loss only where copying
pays, and are written as an SFT dataset (tokens + loss mask, ``longsky preprocess-sft``'s
format) that the ordinary training path reads (``data.kind: sft``).

Sample kinds, each exactly ``seq_length`` tokens:

- ``repeat``: a line of items repeated; the loss is on the repeat only. Items come from a
  small alphabet (``alphabet`` single-letter tokens: the induction signal forms fastest
  with few symbols to match) or from the corpus's words (the real vocabulary).
- ``induction``: a quarter of the sample is random tokens drawn from the corpus's
  ``induction_alphabet`` most frequent tokens (digits always among them); the rest is chunks
  of ``induction_segment`` tokens copied from random offsets of that source. The loss is on
  each chunk after its first token: only a content match (an induction head: find the earlier
  occurrence of the current token, copy what followed it) predicts them, and they are most of
  the sample, so nearly every unit of loss teaches retrieval. (In benchmarks/retrieval_formation.py
  this ``chunks`` task formed the copy at step 200-250, a single repeated segment at 600+.)
- ``recall``: made-up facts ("The locker number of Kelvo-Tamsi is 48213.") put at
  sentence boundaries among corpus lines, then one to three questions, each followed
  by an answer prefix and the value; the loss is on the value tokens only. Several facts
  share one attribute, so only the key tells them apart (the general skill: match a
  key, copy what followed it).
- ``keyed``: records ``key sep value`` over the induction alphabet (one ``sep`` for every
  record of a sample, single-token keys, values of ``KEYED_VALUE_TOKENS`` tokens) among random
  tokens, then the records asked again in another order, ``key sep`` followed by the value; the
  loss is on the values. The token before every value is the same ``sep``, so matching it
  finds all the records' values and only the key one token further back tells them apart: the
  skill that finds one fact among others of the same wording ("... of amber falcon is 4821937"
  beside "... of quiet raven is 7302215", or one row of a table), which the ``induction``
  copy alone does not give (benchmarks/RESULTS.md, "Needle with distractors").
- ``text``: a window of corpus text with the loss on every token (the language model).

Nothing here is the needle test's: keys are made-up syllable names (not its
adjective-noun keys), values have 3 to 6 digits (its have 7), the wording has no
"magic number", and the filler is training-corpus text (not its generated haystack).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from megatron_longsky.config import ConfigError
from megatron_longsky.data.recall_drills import draw_facts, filler_lines

# (fact, question, answer prefix); the value follows the prefix after a space.
TEMPLATES = (
    ("The {attr} of {key} is {value}.", "What is the {attr} of {key}?", "The {attr} of {key} is"),
    ("The {attr} for {key} is {value}.", "Which {attr} was given for {key}?", "The {attr} for {key} is"),
    ("{key} has the {attr} {value}.", "Which {attr} does {key} have?", "{key} has the {attr}"),
    ("Record {key}: {attr} {value}.", "Look up record {key} above. What is its {attr}?", "Record {key}: {attr}"),
    ("We set the {attr} of {key} to {value}.", "To what did we set the {attr} of {key}?",
     "We set the {attr} of {key} to"),
)
SMALL_ALPHABET = tuple("bcdfghjklmnpqrstvwxz")
KEYED_RECORDS = (3, 6)  # records per keyed sample
KEYED_VALUE_TOKENS = 4
KEYED_GAP = 6  # at most this many random tokens before each record
ALPHABET_KINDS = {"induction", "keyed"}  # the kinds made of induction-alphabet tokens only
REPEAT_HEADS = ("Sequence", "Items", "Tokens", "List", "Words")


@dataclass
class Mix:
    """Shares of the sample kinds (normalised)."""

    induction: float = 0.0
    induction_text: float = 0.0
    repeat_small: float = 0.0
    repeat_words: float = 0.0
    recall: float = 0.0
    keyed: float = 0.0
    text: float = 0.0

    def kinds(self) -> tuple[list[str], list[float]]:
        pairs = [(k, v) for k, v in vars(self).items() if v > 0]
        if not pairs:
            raise ValueError("a curriculum mix needs at least one kind with a positive share")
        return [k for k, _ in pairs], [v for _, v in pairs]


class SampleMaker:
    """Builds samples of exactly ``seq_length`` tokens: ``(tokens, loss_mask, text)``."""

    def __init__(self, tokenizer, documents: Sequence[str], seq_length: int, seed: int = 0, alphabet: int = 12,
                 stream: np.ndarray | None = None, max_lines: int = 20000, induction_alphabet: int = 64,
                 induction_segment: int = 24, aligned_text: bool = False, induction_skip: int = 0):
        """``stream``: the documents' tokens back to back, EOD between (e.g. the ``.bin`` of
        their preprocessed dataset); encoded here when not given. ``max_lines``: filler lines kept.
        ``induction_alphabet`` / ``induction_segment``: the ``induction`` kind's symbols and the
        length of its repeated segment; ``induction_skip``: that many of the most frequent
        tokens (digits apart) are left out of the alphabet. ``aligned_text``: ``text`` samples are whole
        ``seq_length`` sequences of the stream (e.g. CIP's, which are built back to back at that
        length), not windows at random offsets."""
        self.tok = tokenizer
        self.seq_length = seq_length
        self.rng = random.Random(seed)
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        lines = [line for doc in documents for line in filler_lines(doc)]
        if not lines:
            raise ValueError("the curriculum needs corpus text (no usable lines)")
        if len(lines) > max_lines:
            lines = random.Random(seed).sample(lines, max_lines)
        self.line_ids = tokenizer.encode_batch([" " + line for line in lines])
        self.words = sorted({w for doc in documents for w in doc.split() if w.isalpha() and 3 <= len(w) <= 12})
        self.alphabet = SMALL_ALPHABET[:max(2, min(alphabet, len(SMALL_ALPHABET)))]
        self._item_ids: dict[str, list[int]] = {}
        if stream is None:
            parts = [np.append(np.asarray(ids, dtype=np.int64), tokenizer.eod_id)
                     for ids in tokenizer.encode_batch(list(documents))]
            stream = np.concatenate(parts)
        self.stream = np.asarray(stream, dtype=np.int64)
        self.induction_ids = self._frequent_tokens(induction_alphabet, induction_skip)
        self.induction_segment = induction_segment
        self.aligned_text = aligned_text
        if aligned_text and len(self.stream) < seq_length:
            raise ValueError(f"aligned text samples need at least one {seq_length}-token sequence in the stream")

    def _frequent_tokens(self, count: int, skip: int = 0) -> list[int]:
        """The ``count`` most frequent tokens of the stream (specials excluded) after the
        ``skip`` most frequent, with the digits' tokens among them: the needle's and the recall
        samples' values are digits."""
        if count < 2:
            raise ConfigError(f"induction_alphabet must be >= 2, got {count}")
        if skip < 0:
            raise ConfigError(f"induction_skip must be >= 0, got {skip}")
        specials = {t for t in (self.tok.eod_id, self.tok.bos_id, getattr(self.tok, "pad_id", None)) if t is not None}
        digits = []
        for d in "0123456789":
            ids = self.tok.encode(d)
            if len(ids) == 1 and ids[0] not in digits:
                digits.append(ids[0])
        counts = np.bincount(self.stream, minlength=1)
        chosen = list(digits[:count])
        ranked = [t for t in np.argsort(-counts, kind="stable").tolist()
                  if counts[t] > 0 and t not in specials and t not in chosen]
        extra = ranked[skip:skip + count - len(chosen)]
        if len(chosen) + len(extra) < 2 or (len(chosen) < count and skip and not extra):
            raise ConfigError(f"the corpus has {len(ranked)} distinct tokens besides the digits: too few for "
                              f"induction_alphabet {count} after induction_skip {skip}")
        return sorted(chosen + extra)

    # -- kinds ----------------------------------------------------------------------------

    def text(self) -> tuple[list[int], list[int]]:
        n = self.seq_length
        if self.aligned_text:
            start = self.rng.randrange(len(self.stream) // n) * n
        else:
            start = self.rng.randrange(max(1, len(self.stream) - n))
        ids = self.stream[start:start + n].tolist()
        return ids, [1] * len(ids)

    def induction(self, text: bool = False) -> tuple[list[int], list[int]]:
        rng = self.rng
        body = self.seq_length - len(self.bos)
        source = body // 4
        segment = min(self.induction_segment, source)
        if segment < 2:
            raise ValueError(f"seq_length {self.seq_length} is too short for an induction sample")
        if text:  # the source is a window of corpus text (the targets' marginal is the corpus's)
            start = rng.randrange(max(1, len(self.stream) - source))
            ids = self.stream[start:start + source].tolist()
        else:
            ids = [rng.choice(self.induction_ids) for _ in range(source)]
        mask = [0] * source
        while len(ids) < body:
            # A chunk of the source from a random offset: its first token is not predictable
            # (the offset is random), the rest follow from finding that token in the source.
            at = rng.randrange(source - segment + 1)
            n = min(segment, body - len(ids))
            ids += ids[at:at + n]
            mask += [0] + [1] * (n - 1)
        return self.bos + ids, [0] * len(self.bos) + mask

    def keyed(self) -> tuple[list[int], list[int]]:
        rng = self.rng
        body = self.seq_length - len(self.bos)
        sep = rng.choice(self.induction_ids)
        others = [t for t in self.induction_ids if t != sep]
        # Checked for the most records a sample can have (each stated with its gap, then asked),
        # so that no seed can fail later.
        most = KEYED_RECORDS[1]
        need = len(self.bos) + most * (KEYED_GAP + 2 * (2 + KEYED_VALUE_TOKENS))
        if len(others) < most or self.seq_length < need:
            raise ConfigError(f"seq_length {self.seq_length} and induction_alphabet {len(self.induction_ids)} are "
                              f"too small for a keyed sample of up to {most} records (it needs seq_length >= "
                              f"{need} and induction_alphabet >= {most + 1})")
        records = rng.randint(*KEYED_RECORDS)
        keys = rng.sample(others, records)
        # Nothing but the records has the separator, so "key sep" occurs once per record.
        values = [[rng.choice(others) for _ in range(KEYED_VALUE_TOKENS)] for _ in keys]
        ids: list[int] = []
        for key, value in zip(keys, values):
            ids += [rng.choice(others) for _ in range(rng.randint(0, KEYED_GAP))] + [key, sep] + value
        mask = [0] * len(ids)
        order = list(range(records))
        rng.shuffle(order)
        for i in order:
            ids += [keys[i], sep] + values[i]
            mask += [0, 0] + [1] * KEYED_VALUE_TOKENS
        front = [rng.choice(others) for _ in range(body - len(ids))]
        return self.bos + front + ids, [0] * (len(self.bos) + len(front)) + mask

    def repeat(self, small: bool) -> tuple[list[int], list[int]]:
        rng = self.rng
        head = rng.choice(REPEAT_HEADS)
        first = self.tok.encode(f"{head}:")
        again = self.tok.encode(f"\n{head} again:")
        budget = (self.seq_length - len(self.bos) - len(first) - len(again)) // 2
        items: list[int] = []
        while True:
            word = rng.choice(self.alphabet) if small else rng.choice(self.words)
            ids = self._item_ids.get(word)
            if ids is None:
                ids = self._item_ids[word] = self.tok.encode(" " + word)
            if len(items) + len(ids) > budget:
                break
            items += ids
        items = items[:max(1, rng.randint(budget // 3, budget) if budget > 3 else budget)]
        ids = self.bos + first + items + again + items
        mask = [0] * (len(ids) - len(items)) + [1] * len(items)
        return self._pad_front(ids, mask)

    def recall_spec(self) -> tuple[int, list[str]]:
        """Draw a recall sample's facts and questions: ``(n, texts to encode)``."""
        rng = self.rng
        n = rng.randint(1, 3)
        (fact_t, question_t, prefix_t), facts = draw_facts(rng, n, TEMPLATES)
        order = list(range(n))
        rng.shuffle(order)  # every fact is asked, in another order
        asked = [facts[i] for i in order]
        texts = ([" " + fact_t.format(**f) for f in facts]
                 + [f"\n\n{question_t.format(**f)}\n{prefix_t.format(**f)}" for f in asked]
                 + [" " + f["value"] for f in asked])
        return n, texts, order

    def recall(self, spec=None, encoded=None) -> tuple[list[int], list[int]]:
        rng = self.rng
        n, texts, order = spec or self.recall_spec()
        if encoded is None:
            encoded = self.tok.encode_batch(texts)
        encoded = [list(ids) for ids in encoded]
        fact_ids = encoded[:n]
        qa = list(zip(encoded[n:2 * n], encoded[2 * n:]))
        while True:  # drop questions, then facts, until the sample fits
            budget = (self.seq_length - len(self.bos) - sum(map(len, fact_ids))
                      - sum(len(a) + len(b) for a, b in qa))
            if budget >= 0:
                break
            if len(qa) > 1:
                qa.pop()
            elif len(fact_ids) > 1:
                drop = next(i for i in range(len(fact_ids)) if i != order[0])
                fact_ids.pop(drop)
                order = [i - (i > drop) for i in order]
            else:
                raise ValueError(f"seq_length {self.seq_length} is too short for a recall sample")
        pieces = self._filler(budget)
        # Facts at sentence boundaries (random, in order of appearance).
        slots = sorted(rng.randrange(len(pieces) + 1) for _ in fact_ids)
        context: list[int] = []
        for i in range(len(pieces) + 1):
            for j, slot in enumerate(slots):
                if slot == i:
                    context += fact_ids[j]
            if i < len(pieces):
                context += pieces[i]
        ids, mask = self.bos + context, [0] * (len(self.bos) + len(context))
        for frame, answer in qa:
            ids += frame + answer
            mask += [0] * len(frame) + [1] * len(answer)
        return ids, mask

    # -- helpers --------------------------------------------------------------------------

    def _filler(self, budget: int) -> list[list[int]]:
        """Whole corpus lines totalling exactly ``budget`` tokens (the first one cut from the front)."""
        pieces: list[list[int]] = []
        total = 0
        i = self.rng.randrange(len(self.line_ids))
        while total < budget:
            ids = list(self.line_ids[i % len(self.line_ids)])
            pieces.append(ids)
            total += len(ids)
            i += 1
        excess = total - budget
        while excess > 0:
            if len(pieces[0]) <= excess:
                excess -= len(pieces.pop(0))
            else:
                pieces[0], excess = pieces[0][excess:], 0
        return pieces

    def _pad_front(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        """Corpus lines before a short sample so that it is exactly ``seq_length`` tokens."""
        short = self.seq_length - len(ids)
        if short <= 0:
            return ids[:self.seq_length], mask[:self.seq_length]
        filler = [t for piece in self._filler(short) for t in piece]
        bos = len(self.bos)
        return ids[:bos] + filler + ids[bos:], mask[:bos] + [0] * len(filler) + mask[bos:]

    def sample(self, kind: str) -> tuple[list[int], list[int]]:
        if kind == "induction":
            return self.induction()
        if kind == "induction_text":
            return self.induction(text=True)
        if kind == "repeat_small":
            return self.repeat(small=True)
        if kind == "repeat_words":
            return self.repeat(small=False)
        if kind == "recall":
            return self.recall()
        if kind == "keyed":
            return self.keyed()
        if kind == "text":
            return self.text()
        raise ValueError(f"unknown curriculum sample kind {kind!r}")

    def samples(self, mix: Mix, count: int, chunk: int = 1024) -> Iterator[tuple[str, list[int], list[int]]]:
        """``count`` samples of the mix's kinds; recall texts are encoded ``chunk`` samples at a time."""
        kinds, weights = mix.kinds()
        drawn = self.rng.choices(kinds, weights, k=count)
        for start in range(0, count, chunk):
            part = drawn[start:start + chunk]
            specs = [self.recall_spec() for kind in part if kind == "recall"]
            flat = self.tok.encode_batch([t for spec in specs for t in spec[1]]) if specs else []
            at, spec_iter = 0, iter(specs)
            for kind in part:
                if kind == "recall":
                    spec = next(spec_iter)
                    ids, mask = self.recall(spec, flat[at:at + len(spec[1])])
                    at += len(spec[1])
                else:
                    ids, mask = self.sample(kind)
                yield kind, ids, mask


def read_documents(corpus_jsonl: str | Path, max_documents: int | None = None) -> list[str]:
    docs = []
    with open(corpus_jsonl, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            if max_documents is not None and len(docs) >= max_documents:
                break
    return docs


def write_alphabet_tokenizer(tokenizer_dir: str | Path, token_ids: Sequence[int], out_dir: str | Path) -> dict:
    """A word-level tokenizer whose vocabulary is ``tokenizer_dir``'s special tokens and the
    strings of ``token_ids`` (in that order): the induction warm-up's model has this vocabulary
    alone, and convert/grow_vocab.py carries its rows over to the full tokenizer. Returns
    ``{"dir", "vocab_size", "remap"}`` (full-tokenizer id -> alphabet id, specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from megatron_longsky.convert.grow_vocab import tokenizer_vocabulary
    from megatron_longsky.utils.atomic import atomic_directory

    tokenizer_dir = Path(tokenizer_dir)
    full = tokenizer_vocabulary(tokenizer_dir)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = [t["content"] for t in sorted(spec.get("added_tokens") or [], key=lambda t: t["id"])]
    by_id = {i: token for token, i in full.items()}
    strings = specials + [by_id[i] for i in token_ids if by_id[i] not in specials]
    vocab = {token: i for i, token in enumerate(strings)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1] if specials else strings[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    with atomic_directory(out_dir, overwrite=True) as tmp:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).exists():
                (tmp / name).write_text((tokenizer_dir / name).read_text(encoding="utf-8"), encoding="utf-8")
        tokenizer.save(str(tmp / "tokenizer.json"))
    return {"dir": str(out_dir), "vocab_size": len(strings), "remap": {full[t]: i for t, i in vocab.items()}}


def write_curriculum(maker: SampleMaker, mix: Mix, count: int, output_prefix: str | Path,
                     text_jsonl: str | Path | None = None, tokenizer=None,
                     remap: dict[int, int] | None = None) -> dict:
    """Write ``count`` samples as an SFT dataset at ``output_prefix`` (and, with ``text_jsonl``,
    the non-``text`` samples' decoded text, for the evaluation-unseen check). Returns counts.
    ``tokenizer`` / ``remap``: write the samples in another tokenizer's ids (the alphabet's, see
    :func:`write_alphabet_tokenizer`: induction and keyed samples only)."""
    from megatron_longsky.sft.preprocess import SFTPreprocessConfig, SFTWriter
    from megatron_longsky.utils.atomic import atomic_path

    if remap is not None and not set(mix.kinds()[0]) <= ALPHABET_KINDS:
        raise ValueError(f"only {sorted(ALPHABET_KINDS)} samples can be written in the alphabet's ids, "
                         f"not {mix.kinds()[0]}")
    writer = SFTWriter(SFTPreprocessConfig(output_prefix=str(output_prefix), overwrite=True), tokenizer or maker.tok)
    counts: dict[str, int] = {}
    target_tokens = 0
    texts = []
    try:
        for kind, ids, mask in maker.samples(mix, count):
            written = [remap[i] for i in ids] if remap is not None else ids
            writer.add_encoded(np.asarray(written, dtype=np.int64), np.asarray(mask, dtype=np.uint8))
            counts[kind] = counts.get(kind, 0) + 1
            target_tokens += sum(mask)
            if kind != "text" and text_jsonl is not None:
                texts.append(maker.tok.decode(ids))
        summary = writer.finish({"curriculum": {"mix": vars(mix), "counts": counts}})
    except BaseException:
        writer.abort()
        raise
    if text_jsonl is not None:
        with atomic_path(text_jsonl) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return {"prefix": str(output_prefix), "samples": summary.samples, "tokens": summary.tokens,
            "target_tokens": target_tokens, "counts": dict(sorted(counts.items()))}
