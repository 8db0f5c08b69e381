"""Train a fresh byte-level BPE tokenizer (no hub downloads needed).

Saved as a Hugging Face tokenizer directory (``tokenizer.json`` plus config files)
that ``TokenizerConfig(type="hf", model=dir)`` and transformers'
``AutoTokenizer.from_pretrained(dir)`` both load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from megatron_longsky.utils.atomic import atomic_write_text

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        split_digits: bool = False) -> Path:
    """Train byte-level BPE on ``texts``; write ``out_dir`` and return it.

    ``split_digits``: every digit is a token of its own (as in Llama's tokenizer), so
    a number's tokens do not depend on its neighbours and copying it is a fixed
    per-digit copy.

    ``</s>`` is the end-of-document token, ``<s>`` BOS and ``<pad>`` padding. Every byte
    is in the base alphabet, so any text encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus specials "
                         f"({len(alphabet) + len(specials)})")
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    # tokenizer.json is the file that makes the directory loadable: write it last.
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    return out_dir
