"""Passkey retrieval (Mohtashami & Jaggi, 2023): a number hidden in repetitive filler.

The same exact-length machinery as the needle sweep, with the classic prompt: an
instruction, the five filler sentences repeated, and "The pass key is N. Remember
it. N is the pass key." at the requested depth. Results are a
:class:`~megatron_longsky.eval.needle.NeedleResult`, so reports and heatmaps work as
for the needle test.
"""

from __future__ import annotations

from typing import Optional

from dataclasses import replace

from megatron_longsky.eval.backends import LMBackend
from megatron_longsky.eval.haystack import Haystack
from megatron_longsky.eval.needle import NeedleConfig, NeedleResult, run_needle
from megatron_longsky.tokenizer.base import Tokenizer

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def passkey_haystack() -> Haystack:
    return Haystack(list(FILLER), "passkey filler")


def passkey_config(base: NeedleConfig, digits: int = 5) -> NeedleConfig:
    """``base``'s grid, seed and mode with the passkey texts (one needle, a ``digits``-digit key)."""
    return replace(
        base,
        needle="The pass key is {value}. Remember it. {value} is the pass key.",
        question="What is the pass key?",
        answer_prefix="The pass key is",
        instruction=INSTRUCTION,
        value_digits=digits,
        num_needles=1,
        num_distractors=0,
        haystack="passkey filler",
    )


def run_passkey(cfg: NeedleConfig, backend: LMBackend, tokenizer: Tokenizer, model_name: str = "",
                digits: int = 5, progress: bool = True, journal_dir: Optional[str] = None,
                model_source: str = "") -> NeedleResult:
    return run_needle(passkey_config(cfg, digits), backend, tokenizer, model_name=model_name,
                      haystack=passkey_haystack(), progress=progress, journal_dir=journal_dir,
                      model_source=model_source, journal_name="passkey")
