"""Hugging Face tokenizers: a ``tokenizer.json`` file or a tokenizer directory.

Loaded with the Rust ``tokenizers`` library (fast, thread-parallel batch encoding);
special tokens and the chat template come from ``tokenizer_config.json`` /
``special_tokens_map.json`` / ``chat_template.jinja`` when the directory has them.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from megatron_longsky.tokenizer.base import Tokenizer, TokenizerError, make_fingerprint, specials_blob

# Tried in order when the tokenizer's config does not name its special tokens.
EOD_CANDIDATES = ("<|eod|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: invalid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Optional[Path], config: dict) -> Optional[str]:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    if directory is not None and (directory / "chat_template.jinja").exists():
        path = directory / "chat_template.jinja"
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return None


class HFTokenizer(Tokenizer):
    type = "hf"

    def __init__(self, model: str, merges: Optional[str] = None):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(model)
        if merges is not None:
            self._load_gpt2_bpe(path, Path(merges))
            return
        if path.is_dir():
            directory, file = path, path / "tokenizer.json"
            if not file.exists():
                raise FileNotFoundError(
                    errno.ENOENT, "no tokenizer.json in the tokenizer directory (save the tokenizer with a fast "
                    "(Rust) backend: AutoTokenizer.from_pretrained(...).save_pretrained(dir), or use "
                    "--tokenizer-type sentencepiece with its .model file)", str(path))
        elif path.is_file():
            directory, file = path.parent, path
        else:
            raise FileNotFoundError(errno.ENOENT, "tokenizer model does not exist", model)
        raw = file.read_bytes()
        try:
            self._tok = RustTokenizer.from_str(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"{file}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception
            raise TokenizerError(f"{file}: not a Hugging Face tokenizer.json ({exc})") from exc
        # Only a directory's own config files describe this tokenizer.
        config: dict = {}
        if path.is_dir() or file.name == "tokenizer.json":
            config = {**_read_json(directory / "special_tokens_map.json"),
                      **_read_json(directory / "tokenizer_config.json")}
        self.model = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._special(config.get("eos_token"), EOD_CANDIDATES, "eod (eos_token)")
        self.bos_id = self._special(config.get("bos_token"), BOS_CANDIDATES, None)
        pad = self._special(config.get("pad_token"), PAD_CANDIDATES, None)
        self.pad_id = self.eod_id if pad is None else pad
        self.chat_template = _chat_template(directory, config)
        self.fingerprint = make_fingerprint("hf", self._canonical_definition(raw, file),
                                            specials_blob(self.eod_id, self.bos_id, self.pad_id))

    def _load_gpt2_bpe(self, vocab: Path, merges: Path) -> None:
        """GPT-2's byte-level BPE from vocab.json + merges.txt (Megatron-LM's GPT2BPETokenizer, which
        megatron-core 0.16 loads as transformers' GPT2Tokenizer): the same pre-tokenisation regex and
        byte mapping, ``<|endoftext|>`` in the text is the special token, nothing is added to the text."""
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        for path in (vocab, merges):
            if not path.is_file():
                raise FileNotFoundError(errno.ENOENT, "GPT-2 BPE file does not exist", str(path))
        try:
            tok = RustTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception
            raise TokenizerError(f"{vocab} / {merges}: not a GPT-2 vocab.json / merges.txt pair ({exc})") from exc
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id("<|endoftext|>") is not None:
            tok.add_special_tokens(["<|endoftext|>"])  # already in the vocabulary: keeps its id
        self._tok = tok
        self.model = str(vocab)
        self.merges = str(merges)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._special(None, ("<|endoftext|>",), "eod (<|endoftext|>)")
        self.bos_id = None
        self.pad_id = self.eod_id
        self.chat_template = None
        self.fingerprint = make_fingerprint("hf", self._canonical_definition(tok.to_str().encode(), vocab),
                                            specials_blob(self.eod_id, self.bos_id, self.pad_id))

    @staticmethod
    def _canonical_definition(raw: bytes, file: Path) -> str:
        # Hash what defines the ids (model, added tokens, normalisation), not formatting.
        data = json.loads(raw)
        keys = ("model", "added_tokens", "normalizer", "pre_tokenizer")
        return json.dumps({k: data.get(k) for k in keys}, sort_keys=True, ensure_ascii=False)

    def _special(self, configured, candidates, what: Optional[str]) -> Optional[int]:
        text = _token_text(configured)
        if text is not None:
            token_id = self._tok.token_to_id(text)
            if token_id is None:
                raise TokenizerError(f"{self.model}: special token {text!r} from the config is not in the vocabulary")
            return token_id
        for candidate in candidates:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        if what is not None:
            raise TokenizerError(f"{self.model}: cannot find the {what} token; name it in tokenizer_config.json "
                             f"or add one of {list(candidates)}")
        return None

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets; both run on Rust threads.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)
