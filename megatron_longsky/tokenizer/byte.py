"""The built-in byte-level tokenizer: ids 0..255 are UTF-8 bytes, then specials.

It needs no file, so it is the default for tests, the quickstart and any machine
without a tokenizer at hand.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from megatron_longsky.tokenizer.base import Tokenizer, make_fingerprint, specials_blob

BYTE_SPECIALS = ("<bos>", "<eod>", "<pad>")


class ByteTokenizer(Tokenizer):
    type = "byte"

    def __init__(self):
        self.model = None
        self._special_ids = {tok: 256 + i for i, tok in enumerate(BYTE_SPECIALS)}
        self._special_tokens = {i: tok for tok, i in self._special_ids.items()}
        self.vocab_size = 256 + len(BYTE_SPECIALS)
        self.bos_id = self._special_ids["<bos>"]
        self.eod_id = self._special_ids["<eod>"]
        self.pad_id = self._special_ids["<pad>"]
        self.chat_template = None
        self.fingerprint = make_fingerprint(
            "byte", "utf-8 bytes", ",".join(BYTE_SPECIALS), specials_blob(self.eod_id, self.bos_id, self.pad_id)
        )

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Specials are rendered by name; a byte sequence cut inside a UTF-8 character
        # (common when decoding a window of a long sequence) decodes with U+FFFD.
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
            token = self._special_tokens.get(i)
            if token is None:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary (size {self.vocab_size})")
            out.append(token)
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self._special_ids:
            return self._special_ids[token]
        data = token.encode("utf-8")
        return data[0] if len(data) == 1 else None
