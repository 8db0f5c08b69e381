"""Prompt framing shared by every task: what goes before and after the context.

base mode:  [BOS] [instruction] context "\\n\\n" question "\\n" answer_prefix  -> the answer
chat mode:  the model's chat template around one user turn ([instruction] context question),
            with the generation prompt, then the answer prefix

The context is given as token ids and spliced in between separately encoded
prefix and suffix, so the prompt length is exact and the context tokens are
exactly the haystack's. Chat templates are rendered with a marker in place of the
context and split at it; special-token text in the template (e.g. ``<s>``) is
mapped to its id by the tokenizer, never inserted into the context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from megatron_longsky.eval.errors import EvalInputError
from megatron_longsky.tokenizer.base import Tokenizer

log = logging.getLogger(__name__)

_MARKER = "\u2063LONGSKY_CONTEXT\u2063"

Mode = Literal["base", "chat"]


_SPECIAL_CANDIDATES = ("<s>", "</s>", "<bos>", "<eos>", "<eod>", "<|begin_of_text|>", "<|end_of_text|>",
                       "<|endoftext|>", "<|startoftext|>")


def special_token_texts(tokenizer: Tokenizer) -> dict[str, int]:
    """Text -> id of the tokenizer's BOS / EOD tokens (what a chat template's
    ``bos_token`` / ``eos_token`` render as)."""
    found: dict[str, int] = {}
    for token_id in (tokenizer.bos_id, tokenizer.eod_id):
        if token_id is None:
            continue
        candidates = [tokenizer.decode([token_id]), *_SPECIAL_CANDIDATES]
        for text in candidates:
            if text and tokenizer.token_to_id(text) == token_id:
                found.setdefault(text, token_id)
                break
    return found


def encode_template_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode rendered template text, mapping special-token text to its id.

    Hugging Face tokenizers match their added tokens natively; for the others
    (SentencePiece, bytes) the BOS / EOD texts are split out and mapped here.
    """
    if tokenizer.type == "hf":
        return tokenizer.encode(text)
    import re

    specials = special_token_texts(tokenizer)
    if not specials:
        return tokenizer.encode(text)
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tokenizer.encode(part))
    return ids


def render_chat_template(template: str, messages: list[dict], tokenizer: Tokenizer,
                         add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face style Jinja chat template (sandboxed, like transformers)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    texts = {token_id: text for text, token_id in special_token_texts(tokenizer).items()}
    specials = {"bos_token": texts.get(tokenizer.bos_id, ""), "eos_token": texts.get(tokenizer.eod_id, "")}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **specials)
    except TemplateError as exc:  # a template that does not parse, or raise_exception() in it
        raise EvalInputError(f"chat template: {type(exc).__name__}: {exc}") from None


def check_template_syntax(text: str, source: str) -> None:
    """A Jinja template that does not parse is an error naming ``source`` and the line."""
    from jinja2.exceptions import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise EvalInputError(f"chat template {source}:{exc.lineno}: invalid Jinja ({exc.message})") from None


def load_chat_template(tokenizer: Tokenizer, path: Optional[str]) -> str:
    """The template from ``path`` if given, else the tokenizer's own; an error if neither."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise EvalInputError(f"--chat-template {p}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise EvalInputError(f"chat template {p}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        check_template_syntax(text, str(p))
        return text
    if not tokenizer.chat_template:
        raise EvalInputError(
            f"chat mode needs a chat template, but tokenizer {tokenizer.model or tokenizer.type!r} has none; "
            "pass a Jinja template file (--chat-template) or use --mode base"
        )
    return tokenizer.chat_template


def use_trained_chat_template(tokenizer: Tokenizer, recorded: Optional[dict]) -> bool:
    """Chat mode evaluates a model with the template it was trained with: the one its
    checkpoint recorded at SFT time (the built-in ``longsky-v1`` or a Jinja template)
    replaces the tokenizer's own for this evaluation. False when nothing is recorded."""
    from megatron_longsky.sft.template import recorded_jinja

    text = recorded_jinja(recorded)
    if text is None:
        return False
    if tokenizer.chat_template and tokenizer.chat_template != text:
        log.info("chat mode: using the template the model was trained with (%s), not the tokenizer's own",
                 recorded.get("name"))
    tokenizer.chat_template = text
    return True


@dataclass
class PromptFrame:
    """Token ids that surround a context for one question."""

    prefix: list[int]
    suffix: list[int]

    @property
    def overhead(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def assemble(self, context: list[int]) -> list[int]:
        return self.prefix + context + self.suffix


def make_frame(tokenizer: Tokenizer, question: str, answer_prefix: str, mode: Mode,
               chat_template: Optional[str] = None, add_bos: bool = True, instruction: str = "") -> PromptFrame:
    """``instruction`` (optional) goes right before the context."""
    if mode == "base":
        prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        if instruction:
            prefix = prefix + tokenizer.encode(instruction)
        return PromptFrame(prefix, tokenizer.encode(f"\n\n{question}\n{answer_prefix}"))
    if mode != "chat":
        raise ValueError(f"mode must be 'base' or 'chat', got {mode!r}")
    if chat_template is None:
        raise EvalInputError("chat mode needs a chat template")
    content = f"{instruction}{_MARKER}\n\n{question}"
    text = render_chat_template(chat_template, [{"role": "user", "content": content}], tokenizer)
    if text.count(_MARKER) != 1:
        raise EvalInputError("the chat template did not render the user message exactly once")
    before, after = text.split(_MARKER)
    return PromptFrame(encode_template_text(tokenizer, before), encode_template_text(tokenizer, after + answer_prefix))


def answer_ids(tokenizer: Tokenizer, answers: list[str]) -> list[int]:
    """The teacher-forced continuation: ``" " + ", ".join(answers)`` (no special tokens)."""
    return tokenizer.encode(" " + ", ".join(answers))
