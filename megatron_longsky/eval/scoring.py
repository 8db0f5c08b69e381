"""Deterministic scoring: no judge, no sampling.

- base mode: teacher forcing. The answer's tokens follow the prompt; the case passes
  when every one of them is the argmax of the model's logits at its position.
- chat mode: greedy generation, then exact match. The reply is cut at the first
  newline or sentence end, split into items at commas / "and", and passes when the
  set of items equals the set of answers (case-insensitive, outer punctuation
  stripped). "4821739." passes for 4821739; "about 4821739" does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_longsky.eval.backends import LMBackend, continuation_logits
from megatron_longsky.eval.prompt import Mode, answer_ids
from megatron_longsky.tokenizer.base import Tokenizer

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_ITEM_SPLIT = re.compile(r"\s*(?:,|;|\band\b)\s*", re.IGNORECASE)
_STRIP = " \t\"'`*.:;!?()[]"

# Turn-ending tokens of common chat formats, stopped on when the tokenizer has them.
_CHAT_STOP_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


@dataclass
class Case:
    """One question about one context."""

    prompt_ids: list[int]
    answers: list[str]
    meta: dict = field(default_factory=dict)


@dataclass
class CaseResult:
    passed: bool
    prediction: str
    answers: list[str]
    # base mode: answer tokens that were the argmax / all answer tokens.
    correct_tokens: Optional[int] = None
    answer_tokens: Optional[int] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def extract_items(reply: str) -> list[str]:
    """The answer items of a reply (see the module docstring)."""
    text = reply.strip().split("\n", 1)[0]
    end = _SENTENCE_END.search(text)
    if end:
        text = text[: end.start()]
    items = [item.strip(_STRIP) for item in _ITEM_SPLIT.split(text)]
    return [item for item in items if item]


def exact_match(reply: str, answers: Sequence[str]) -> bool:
    got = sorted(i.lower() for i in extract_items(reply))
    want = sorted(a.strip(_STRIP).lower() for a in answers)
    return got == want


def chat_stop_ids(tokenizer: Tokenizer) -> list[int]:
    stops = {tokenizer.eod_id}
    for token in _CHAT_STOP_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and len(tokenizer.decode([token_id])) > 1:
            stops.add(token_id)
    return sorted(stops)


def score_case(backend: LMBackend, tokenizer: Tokenizer, case: Case, mode: Mode,
               max_new_tokens: int = 32) -> CaseResult:
    # Only ids the tokenizer has are ever picked: a model's vocabulary is often padded
    # beyond the tokenizer's (Megatron's make_vocab_size_divisible_by, HF padded embeddings).
    if mode == "base":
        target = answer_ids(tokenizer, case.answers)
        logits = continuation_logits(backend, case.prompt_ids, target)
        predicted = logits[:, :tokenizer.vocab_size].argmax(dim=-1).tolist()
        correct = sum(int(p == t) for p, t in zip(predicted, target))
        return CaseResult(passed=correct == len(target), prediction=tokenizer.decode(predicted),
                          answers=list(case.answers), correct_tokens=correct, answer_tokens=len(target))
    if mode == "chat":
        generated = backend.generate_greedy(case.prompt_ids, max_new_tokens, chat_stop_ids(tokenizer),
                                            vocab_size=tokenizer.vocab_size)
        reply = tokenizer.decode(generated)
        return CaseResult(passed=exact_match(reply, case.answers), prediction=reply, answers=list(case.answers))
    raise ValueError(f"mode must be 'base' or 'chat', got {mode!r}")
