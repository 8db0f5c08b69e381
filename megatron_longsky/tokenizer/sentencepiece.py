"""SentencePiece ``.model`` files (Llama-2, Skywork, ...)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Iterable, Optional, Sequence

from megatron_longsky.tokenizer.base import Tokenizer, TokenizerError, make_fingerprint, specials_blob


class SentencePieceTokenizer(Tokenizer):
    type = "sentencepiece"

    def __init__(self, model: str):
        import sentencepiece as spm

        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "sentencepiece model does not exist", model)
        raw = path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(raw)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise TokenizerError(f"{path}: not a sentencepiece model ({exc})") from exc
        self.model = str(path)
        self.vocab_size = self._sp.get_piece_size()
        eos, bos, pad = self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id()
        if eos < 0:
            raise TokenizerError(f"{path}: the sentencepiece model has no </s> (eos) id to use as end of document")
        self.eod_id = eos
        self.bos_id = bos if bos >= 0 else None
        self.pad_id = pad if pad >= 0 else eos
        self.chat_template = None
        self.fingerprint = make_fingerprint("sentencepiece", raw, specials_blob(self.eod_id, self.bos_id, self.pad_id))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces.
        if self._sp.id_to_piece(token_id) != token:
            return None
        return token_id
