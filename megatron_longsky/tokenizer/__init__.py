"""Tokenizers: built-in bytes, Hugging Face tokenizer.json / directories, SentencePiece.

    tok = build_tokenizer(TokenizerConfig(type="hf", model="path/to/tokenizer_dir"))
    ids = tok.encode("text")            # never adds BOS/EOD: add tok.eod_id yourself
    tok.padded_vocab_size(128)          # a multiple of 128, whatever the TP size
    tok.metadata()                      # recorded in <prefix>.meta.json beside datasets
"""

from __future__ import annotations

import argparse

from megatron_longsky.tokenizer.base import (
    MEGATRON_TOKENIZER_TYPES,
    TOKENIZER_TYPES,
    Tokenizer,
    TokenizerConfig,
    pad_vocab_size,
)
from megatron_longsky.tokenizer.byte import ByteTokenizer
from megatron_longsky.tokenizer.hf import HFTokenizer
from megatron_longsky.tokenizer.sentencepiece import SentencePieceTokenizer
from megatron_longsky.tokenizer.train import train_bpe_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "add_tokenizer_args",
    "build_tokenizer",
    "pad_vocab_size",
    "tokenizer_config_from_args",
    "train_bpe_tokenizer",
]


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.type == "byte":
        return ByteTokenizer()
    if cfg.type == "hf":
        return HFTokenizer(cfg.model, merges=cfg.merges)
    if cfg.type == "sentencepiece":
        return SentencePieceTokenizer(cfg.model)
    raise ValueError(f"tokenizer type {cfg.type!r} is not one of {list(TOKENIZER_TYPES)}")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES + tuple(MEGATRON_TOKENIZER_TYPES),
                       default="byte", metavar="TYPE",
                       help="byte (built in, no file), hf (tokenizer.json or HF tokenizer dir), "
                            "sentencepiece (.model file); Megatron-LM's names: "
                            + ", ".join(f"{k} (= {v})" for k, v in MEGATRON_TOKENIZER_TYPES.items()))
    group.add_argument("--tokenizer-model", default=None,
                       help="tokenizer.json / tokenizer directory (hf) or .model file (sentencepiece)")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2 merges.txt")


def tokenizer_config_from_args(args: argparse.Namespace) -> TokenizerConfig:
    try:
        if args.tokenizer_type == "GPT2BPETokenizer" or getattr(args, "merge_file", None):
            return TokenizerConfig(type=args.tokenizer_type, model=args.vocab_file or args.tokenizer_model,
                                   merges=args.merge_file)
        return TokenizerConfig(type=args.tokenizer_type, model=args.tokenizer_model)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
