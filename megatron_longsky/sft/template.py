"""Chat templates: turns -> token ids plus a loss mask that is 1 on assistant tokens only.

Two templates:

* the tokenizer's own Hugging Face (jinja) chat template, when it has one, rendered
  with transformers' renderer;
* otherwise the built-in template ``longsky-v1`` (below).

The mask is exact by construction: the conversation is cut into text segments, each
either prompt (mask 0) or assistant (mask 1), and the segments are tokenized one by one
and concatenated, so every token belongs to exactly one segment. For a jinja template
the segments come from rendering incrementally: the text added by rendering
``messages[:i]`` with the generation prompt is prompt, the text added by then rendering
``messages[:i+1]`` (assistant content and the template's end-of-turn marker) is
assistant. A template whose renders are not prefixes of one another is refused.

Built-in template ``longsky-v1`` (``[BOS]`` only when the tokenizer has one; ``<EOD>`` is
the tokenizer's end-of-document id, the other markers are plain text)::

    [BOS]<|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}<EOD><|user|>\\n...

Assistant tokens are ``{assistant}<EOD>``: the model learns to stop.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_longsky.sft.formats import Turn, turns_to_messages
from megatron_longsky.errors import UserError

BUILTIN_NAME = "longsky-v1"
BUILTIN_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
# The built-in template as a Hugging Face style Jinja template, for inference prompts
# (e.g. the needle test's chat mode) of models trained with it. ``bos_token`` renders as
# "" when the tokenizer has no BOS.
BUILTIN_JINJA = (
    r"{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    r"{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class ChatTemplateError(UserError, ValueError):
    pass


class ChatTemplate:
    """Encode conversations for one tokenizer.

    ``source``: ``"auto"`` (the tokenizer's own template, else built-in), ``"builtin"``,
    or a path to a ``.jinja`` file; ``text``: the Jinja template itself (overrides ``source``).
    """

    def __init__(self, tokenizer, source: str = "auto", text: Optional[str] = None):
        self.tokenizer = tokenizer
        if text is not None:
            self.jinja = text
            self.name = "jinja-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        elif source == "builtin" or (source == "auto" and not tokenizer.chat_template):
            self.jinja: Optional[str] = None
            self.name = BUILTIN_NAME
        else:
            if source == "auto":
                text = tokenizer.chat_template
            else:
                path = Path(source)
                if not path.is_file():
                    raise ChatTemplateError(f"chat template file {source} does not exist")
                text = path.read_text(encoding="utf-8")
            self.jinja = text
            self.name = "jinja-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        self._specials = self._special_strings() if self.jinja is not None else {}

    def describe(self) -> dict:
        """What the dataset metadata (and, from it, a trained checkpoint) records about the
        template: enough to build the same prompts at inference (:func:`recorded_jinja`)."""
        if self.jinja is None:
            return {"name": self.name, "source": "builtin"}
        return {"name": self.name, "source": "jinja", "jinja": self.jinja}

    # -- segments -----------------------------------------------------------------------

    def segments(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[tuple[object, bool]]:
        """``(text or token id, is_assistant)`` pieces of the conversation in order."""
        if self.jinja is None:
            return self._builtin_segments(turns, add_generation_prompt)
        return self._jinja_segments(turns, add_generation_prompt)

    def _builtin_segments(self, turns, add_generation_prompt):
        tok = self.tokenizer
        out: list[tuple[object, bool]] = []
        if tok.bos_id is not None:
            out.append((int(tok.bos_id), False))
        for turn in turns:
            out.append((BUILTIN_HEADERS[turn.role], False))
            if turn.role == "assistant":
                out.append((turn.content, True))
                out.append((int(tok.eod_id), True))
            else:
                out.append((turn.content + "\n", False))
        if add_generation_prompt:
            out.append((BUILTIN_HEADERS["assistant"], False))
        return out

    def _special_strings(self) -> dict:
        # bos_token / eos_token / pad_token as text: many jinja templates use them
        tok = self.tokenizer
        names = {}
        for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eod_id), ("pad_token", tok.pad_id)):
            if token_id is not None:
                names[key] = tok.decode([token_id])
        return names

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages], chat_template=self.jinja,
                add_generation_prompt=add_generation_prompt, **self._specials)
        except Exception as exc:  # noqa: BLE001 - jinja raises many kinds (incl. raise_exception)
            raise ChatTemplateError(f"chat template {self.name} failed to render: {exc}") from exc
        return rendered[0]

    def _jinja_segments(self, turns, add_generation_prompt):
        messages = turns_to_messages(turns)
        out: list[tuple[object, bool]] = []
        done = ""

        def extend(text: str, is_assistant: bool, what: str):
            nonlocal done
            if not text.startswith(done):
                raise ChatTemplateError(
                    f"chat template {self.name} is not incremental: rendering {what} does not extend the "
                    "previous render, so assistant tokens cannot be located exactly; use --chat-template "
                    "builtin or a template file that renders each turn independently")
            if len(text) > len(done):
                out.append((text[len(done):], is_assistant))
            done = text

        for i, turn in enumerate(turns):
            if turn.role == "assistant":
                extend(self.render(messages[:i], add_generation_prompt=True), False,
                       f"the generation prompt before message {i}")
                extend(self.render(messages[:i + 1], add_generation_prompt=False), True, f"message {i}")
            else:
                extend(self.render(messages[:i + 1], add_generation_prompt=False), False, f"message {i}")
        if add_generation_prompt:
            extend(self.render(messages, add_generation_prompt=True), False, "the final generation prompt")
        return out

    # -- tokens -------------------------------------------------------------------------

    def encode(self, turns: Sequence[Turn]) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens int64[n], loss_mask uint8[n])``; the mask is 1 on assistant tokens."""
        tokens: list[int] = []
        mask: list[int] = []
        for piece, is_assistant in self.segments(turns):
            ids = [piece] if isinstance(piece, int) else self.tokenizer.encode(piece)
            tokens.extend(ids)
            mask.extend([int(is_assistant)] * len(ids))
        return np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=np.uint8)

    def encode_prompt(self, turns: Sequence[Turn]) -> list[int]:
        """Tokens of a conversation (ending with a user turn) plus the generation prompt:
        what a model is given at inference time to produce the next assistant turn."""
        if turns and turns[-1].role == "assistant":
            raise ChatTemplateError("encode_prompt wants a conversation ending with a user turn")
        ids: list[int] = []
        for piece, _ in self.segments(turns, add_generation_prompt=True):
            ids.extend([piece] if isinstance(piece, int) else self.tokenizer.encode(piece))
        return ids

    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn (for generation loops)."""
        ids = {int(self.tokenizer.eod_id)}
        for text in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
            token_id = self.tokenizer.token_to_id(text)
            if token_id is not None and self.jinja is not None and text in self.jinja:
                ids.add(int(token_id))
        return sorted(ids)


def recorded_jinja(recorded: Optional[dict]) -> Optional[str]:
    """The Jinja text of a template recorded by :meth:`ChatTemplate.describe` (None if unknown)."""
    if not isinstance(recorded, dict):
        return None
    if recorded.get("source") == "builtin" and recorded.get("name") == BUILTIN_NAME:
        return BUILTIN_JINJA
    return recorded.get("jinja")


def template_from_record(tokenizer, recorded: Optional[dict]) -> Optional["ChatTemplate"]:
    """The :class:`ChatTemplate` a model was trained with, from its record (None if unknown)."""
    if not isinstance(recorded, dict):
        return None
    if recorded.get("source") == "builtin":
        return ChatTemplate(tokenizer, "builtin")
    if recorded.get("jinja"):
        return ChatTemplate(tokenizer, text=recorded["jinja"])
    return None

