"""Our tokenizers seen through megatron-core's tokenizer interface.

megatron-core's datasets (``GPTDatasetConfig.tokenizer``) read ``eod``/``pad``/
``vocab_size`` and hash ``unique_identifiers`` into their index-cache names; this
adapter provides those from a :class:`~megatron_longsky.tokenizer.base.Tokenizer`,
so a cache built for one tokenizer is never reused for another.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_longsky.tokenizer.base import Tokenizer


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer.model or "", {})
        self.tokenizer = tokenizer
        self.unique_identifiers = {"class": type(tokenizer).__name__, "fingerprint": tokenizer.fingerprint}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist())

    @property
    def vocab(self):
        raise NotImplementedError("megatron_longsky tokenizers expose token_to_id, not a vocabulary dict")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eod(self) -> int:
        return self.tokenizer.eod_id

    @property
    def eos(self) -> int:
        return self.tokenizer.eod_id

    @property
    def bos(self) -> Optional[int]:
        return self.tokenizer.bos_id

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_id

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat formatting lives in megatron_longsky's SFT data code")


def to_megatron_tokenizer(tokenizer: Tokenizer) -> MegatronTokenizerAdapter:
    return MegatronTokenizerAdapter(tokenizer)
