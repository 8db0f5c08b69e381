"""Chat records in the common jsonl shapes, normalised to a list of turns.

Accepted shapes (``format="auto"`` picks by the keys present):

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (OpenAI / HF chat; ``human``/``gpt`` style role names are accepted too);
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``;
* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}`` -- the user
  turn is the instruction, followed by a blank line and the input when non-empty.

A record may carry a ``system`` string (ShareGPT/Alpaca exports often do); the
``system_prompt`` option adds a system turn to records that have none.
Every problem raises :class:`SFTFormatError` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_longsky.errors import UserError

FORMATS = ("auto", "messages", "sharegpt", "alpaca")
ChatFormat = Literal["auto", "messages", "sharegpt", "alpaca"]

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
}


class SFTFormatError(UserError, ValueError):
    """A chat record that cannot be used; ``kind`` groups the counts of skipped lines."""

    def __init__(self, message: str, kind: str = "bad_record"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    content: str


def _fail(where: str, kind: str, message: str):
    raise SFTFormatError(f"{where}: {message}", kind)


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return ""


def _turns_from_list(items, where: str, field: str, role_key: str, content_key: str) -> list[Turn]:
    if not isinstance(items, list):
        _fail(where, "wrong_type", f"{field!r} must be a list, got {type(items).__name__}")
    turns = []
    for i, item in enumerate(items):
        at = f"{field}[{i}]"
        if not isinstance(item, dict):
            _fail(where, "wrong_type", f"{at} must be an object, got {type(item).__name__}")
        if role_key not in item:
            _fail(where, "missing_role", f"{at} has no {role_key!r}")
        raw_role = item[role_key]
        if not isinstance(raw_role, str) or raw_role.lower() not in ROLE_ALIASES:
            _fail(where, "bad_role", f"{at} has unknown {role_key} {raw_role!r} "
                                     f"(expected one of {sorted(ROLE_ALIASES)})")
        if content_key not in item:
            _fail(where, "missing_content", f"{at} has no {content_key!r}")
        content = item[content_key]
        if not isinstance(content, str):
            _fail(where, "wrong_type", f"{at}.{content_key} must be a string, got {type(content).__name__}")
        if not content.strip():
            _fail(where, "empty_turn", f"{at} ({raw_role}) is empty")
        turns.append(Turn(ROLE_ALIASES[raw_role.lower()], content))
    return turns


def _alpaca_turns(record: dict, where: str) -> list[Turn]:
    for key in ("instruction", "output"):
        if key not in record:
            _fail(where, "missing_field", f"alpaca record has no {key!r}")
    for key in ("instruction", "input", "output"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            _fail(where, "wrong_type", f"{key!r} must be a string, got {type(record[key]).__name__}")
    instruction, output = record["instruction"], record["output"]
    extra = record.get("input") or ""
    if not instruction.strip():
        _fail(where, "empty_turn", "'instruction' is empty")
    if not output.strip():
        _fail(where, "empty_turn", "'output' is empty")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [Turn("user", user), Turn("assistant", output)]


def parse_record(record, where: str, fmt: str = "auto", system_prompt: Optional[str] = None) -> list[Turn]:
    """Turns of one record; ``where`` (``file:line``) prefixes every error."""
    if not isinstance(record, dict):
        _fail(where, "wrong_type", f"expected a JSON object, got {type(record).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"chat format {fmt!r} is not one of {list(FORMATS)}")
    shape = detect_format(record) if fmt == "auto" else fmt
    if shape == "messages":
        if "messages" not in record:
            _fail(where, "missing_field", "record has no 'messages'")
        turns = _turns_from_list(record["messages"], where, "messages", "role", "content")
    elif shape == "sharegpt":
        if "conversations" not in record:
            _fail(where, "missing_field", "record has no 'conversations'")
        turns = _turns_from_list(record["conversations"], where, "conversations", "from", "value")
    elif shape == "alpaca":
        turns = _alpaca_turns(record, where)
    else:
        _fail(where, "unknown_format", f"cannot tell the chat format from keys {sorted(record)[:10]}; "
                                       "expected 'messages', 'conversations' or 'instruction'/'output'")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        _fail(where, "wrong_type", f"'system' must be a string, got {type(system).__name__}")
    has_system = any(t.role == "system" for t in turns)
    if system and system.strip() and not has_system:
        turns.insert(0, Turn("system", system))
    elif system_prompt and not has_system:
        turns.insert(0, Turn("system", system_prompt))
    return validate_turns(turns, where)


def validate_turns(turns: list[Turn], where: str) -> list[Turn]:
    """System only first; then user/assistant alternating, starting with user, ending with assistant."""
    if not turns:
        _fail(where, "empty_conversation", "the conversation has no turns")
    body = turns[1:] if turns[0].role == "system" else turns
    for i, turn in enumerate(body):
        if turn.role == "system":
            _fail(where, "bad_order", "a system turn may only come first")
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            _fail(where, "bad_order", f"turn {i + len(turns) - len(body)} is {turn.role!r} but "
                                      f"{expected!r} was expected (turns alternate user/assistant)")
    if not body or body[-1].role != "assistant":
        _fail(where, "no_assistant", "the conversation does not end with an assistant turn")
    return turns


def turns_to_messages(turns: list[Turn]) -> list[dict]:
    return [{"role": t.role, "content": t.content} for t in turns]
