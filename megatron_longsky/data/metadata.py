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


class MetaFileError(UserError, ValueError):
    """A ``.meta.json`` sidecar that is not UTF-8 JSON of the expected shape; names the file."""


def read_meta(prefix: str | Path) -> dict | None:
    """The sidecar of ``prefix`` (None if there is none), checked for its shape: a JSON object
    whose ``tokenizer`` (if present) is an object. Anything else is a :class:`MetaFileError`
    naming the file, for every reader (merge-datasets, build-cip, train, eval)."""
    from megatron_longsky.data.switch import finish_interrupted_switch

    finish_interrupted_switch(prefix)
    path = meta_path(prefix)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MetaFileError(f"{path}: not UTF-8 text (byte {exc.start}): a corrupt sidecar; "
                            "re-create the dataset") from None
    except json.JSONDecodeError as exc:
        raise MetaFileError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise MetaFileError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise MetaFileError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise MetaFileError(f"{path}: 'tokenizer' must be an object, found {type(tokenizer).__name__}")
    for key in ("fingerprint", "type"):
        if isinstance(tokenizer, dict) and tokenizer.get(key) is not None and not isinstance(tokenizer[key], str):
            raise MetaFileError(f"{path}: tokenizer.{key} must be a string, found {type(tokenizer[key]).__name__}")
    vocab = (tokenizer or {}).get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0):
        raise MetaFileError(f"{path}: tokenizer.vocab_size must be a positive integer, found {vocab!r}")
    for key in ("eod_id", "pad_id"):
        value = (tokenizer or {}).get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise MetaFileError(f"{path}: tokenizer.{key} must be a non-negative integer, found {value!r}")
    if meta.get("sft") is not None and not isinstance(meta["sft"], dict):
        raise MetaFileError(f"{path}: 'sft' must be an object, found {type(meta['sft']).__name__}")
    return meta


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
