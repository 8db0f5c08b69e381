"""The sidecar ``<prefix>.meta.json`` written beside every indexed dataset.

It records which tokenizer made the tokens (type, fingerprint, vocab size, special
ids) and how the dataset was built, so that training or CIP building with another
tokenizer fails with a clear error instead of learning from garbage ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_longsky.errors import UserError
from megatron_longsky.utils.atomic import atomic_write_json


class TokenizerMismatchError(UserError, ValueError):
    """A dataset was made with a different tokenizer than the one in use."""


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.meta.json")


def write_meta(prefix: str | Path, meta: dict) -> None:
    atomic_write_json(meta_path(prefix), meta)


def read_meta(prefix: str | Path) -> dict | None:
    path = meta_path(prefix)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def check_tokenizer(prefix: str | Path, fingerprint: str, *, required: bool = False) -> None:
    """Raise :class:`TokenizerMismatchError` if ``prefix`` was made with another tokenizer."""
    meta = read_meta(prefix)
    if meta is None:
        if required:
            raise TokenizerMismatchError(
                f"{meta_path(prefix)} is missing: cannot verify which tokenizer made {prefix}"
            )
        return
    found = (meta.get("tokenizer") or {}).get("fingerprint")
    if found != fingerprint:
        raise TokenizerMismatchError(
            f"dataset {prefix} was tokenized with tokenizer {found!r} "
            f"({(meta.get('tokenizer') or {}).get('type')}), but the tokenizer in use is {fingerprint!r}; "
            "re-run preprocessing with this tokenizer or use the one the data was made with"
        )
