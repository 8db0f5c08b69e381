"""The tokenizer interface every part of megatron_longsky uses.

A :class:`Tokenizer` encodes text without ever adding special tokens (callers add
EOD/BOS themselves, so a needle or a chat turn is never polluted by a hidden BOS),
knows its special ids, pads its vocabulary the way Megatron does, and carries a
fingerprint stored beside every dataset so that data made with another tokenizer
is refused (see :mod:`megatron_longsky.data.metadata`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence

import numpy as np

from megatron_longsky.errors import UserError

TOKENIZER_TYPES = ("byte", "hf", "sentencepiece")
# Megatron-LM's --tokenizer-type names -> ours, with the same ids as megatron-core's tokenizers
# (0.16: no BOS added, EOD = the tokenizer's eos). GPT2BPETokenizer is GPT-2's byte-level BPE
# read from --vocab-file (vocab.json) and --merge-file (merges.txt).
MEGATRON_TOKENIZER_TYPES = {
    "HuggingFaceTokenizer": "hf",
    "GPT2BPETokenizer": "hf",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
}


class TokenizerError(UserError, ValueError):
    """A tokenizer file or directory that is missing or cannot be read (named in the message)."""


@dataclass
class TokenizerConfig:
    """Which tokenizer to use: ``byte`` needs no file; ``hf`` takes a tokenizer.json
    file or a Hugging Face tokenizer directory; ``sentencepiece`` takes a ``.model``."""

    type: Literal["byte", "hf", "sentencepiece"] = "byte"
    model: Optional[str] = None
    merges: Optional[str] = None  # hf only: GPT-2 merges.txt when ``model`` is its vocab.json

    def __post_init__(self):
        megatron_name = self.type if self.type in MEGATRON_TOKENIZER_TYPES else None
        self.type = MEGATRON_TOKENIZER_TYPES.get(self.type, self.type)
        if self.type not in TOKENIZER_TYPES:
            raise ValueError(f"tokenizer type {self.type!r} is not one of "
                             f"{list(TOKENIZER_TYPES) + list(MEGATRON_TOKENIZER_TYPES)}")
        if megatron_name == "GPT2BPETokenizer" and not (self.model and self.merges):
            raise ValueError("GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt)")
        if self.merges and self.type != "hf":
            raise ValueError(f"a merges file is only used by hf (GPT-2 BPE) tokenizers, not {self.type!r}")
        if self.type == "byte" and self.model:
            raise ValueError("the byte tokenizer takes no model file; drop tokenizer model "
                             f"{self.model!r} or choose type hf/sentencepiece")
        if self.type != "byte" and not self.model:
            raise ValueError(f"tokenizer type {self.type!r} needs a model path (--tokenizer-model)")


def make_fingerprint(kind: str, *parts: bytes | str) -> str:
    """``<kind>-<16 hex>``: a stable hash of the tokenizer's defining bytes."""
    h = hashlib.sha256(kind.encode())
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return f"{kind}-{h.hexdigest()[:16]}"


def specials_blob(eod_id: int, bos_id: Optional[int], pad_id: int) -> str:
    return json.dumps({"eod": eod_id, "bos": bos_id, "pad": pad_id}, sort_keys=True)


def pad_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Round up to a multiple of ``divisible_by``. Unlike Megatron-LM (a multiple of
    ``divisible_by x TP``) the result does not depend on the layout, so a run starts from
    the same model at any TP; the TP size must divide it (see model.config.padded_vocab_size)."""
    if divisible_by < 1:
        raise ValueError(f"divisible_by ({divisible_by}) must be >= 1")
    return -(-vocab_size // divisible_by) * divisible_by


class Tokenizer:
    """Base class. Subclasses set the attributes in ``__init__`` and implement
    :meth:`encode`, :meth:`decode` and :meth:`token_to_id`."""

    type: str
    model: Optional[str] = None
    vocab_size: int  # unpadded: the largest id + 1
    eod_id: int
    bos_id: Optional[int] = None
    pad_id: int
    fingerprint: str
    chat_template: Optional[str] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like :meth:`encode_batch` but as int arrays (the preprocessing fast path)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def padded_vocab_size(self, divisible_by: int = 128) -> int:
        return pad_vocab_size(self.vocab_size, divisible_by)

    def metadata(self) -> dict:
        """What ``<prefix>.meta.json`` records under ``"tokenizer"``."""
        return {
            "type": self.type,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
            **({"merges": self.merges} if getattr(self, "merges", None) else {}),
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, vocab_size={self.vocab_size}, "
                f"eod_id={self.eod_id}, bos_id={self.bos_id}, pad_id={self.pad_id}, "
                f"fingerprint={self.fingerprint!r})")
