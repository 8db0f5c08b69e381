"""Grow a Hugging Face checkpoint's vocabulary to a larger tokenizer's, token by token.

Vocabulary expansion: every token of the source tokenizer keeps its embedding row (and
output row) at its id in the target tokenizer; the target's other rows are drawn fresh
from N(0, std) with a seeded generator; every other tensor is copied unchanged. Tokens
are matched by their string in the tokenizers' ``tokenizer.json`` vocabularies, so the
source's ids may be in any order.

The quickstart uses it for its retrieval warm-up: the copy is learned on a small
alphabet by a model whose vocabulary is that alphabet alone (with thousands of unused
output rows it does not form within the warm-up; benchmarks/RESULTS.md, "Retrieval
formation"), then carried over to the real tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_longsky.convert.hf_weights import ConversionError

EMBEDDING = "model.embed_tokens.weight"
OUTPUT = "lm_head.weight"


def tokenizer_vocabulary(tokenizer_dir: str | Path) -> dict[str, int]:
    """Token string -> id of a Hugging Face ``tokenizer.json`` (added tokens included)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        vocab = dict(spec["model"]["vocab"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not a tokenizer.json with a model vocabulary ({exc})") from None
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab


def grow_vocabulary(source_dir: str | Path, output_dir: str | Path, tokenizer_dir: str | Path, *,
                    seed: int, embedding_std: float, output_std: float, overwrite: bool = False) -> dict:
    """Write ``output_dir``: ``source_dir`` (an HF Llama directory with its tokenizer) with its
    vocabulary grown to ``tokenizer_dir``'s, whose tokenizer files it then carries."""
    from safetensors.torch import load_file, save_file

    from megatron_longsky.utils.atomic import atomic_directory

    source_dir, tokenizer_dir = Path(source_dir), Path(tokenizer_dir)
    small, large = tokenizer_vocabulary(source_dir), tokenizer_vocabulary(tokenizer_dir)
    missing = sorted(token for token in small if token not in large)
    if missing:
        raise ConversionError(f"{len(missing)} token(s) of {source_dir}'s tokenizer are not in {tokenizer_dir}'s: "
                              f"{missing[:5]}")
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    size = max(large.values()) + 1
    if size < config["vocab_size"]:
        raise ConversionError(f"{tokenizer_dir} has {size} tokens, fewer than {source_dir}'s vocab_size "
                              f"{config['vocab_size']}: nothing to grow")
    shards = sorted(source_dir.glob("*.safetensors"))
    if not shards:
        raise ConversionError(f"{source_dir}: no safetensors weights")
    generator = torch.Generator().manual_seed(seed)
    grown = []
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        for shard in shards:
            weights = load_file(shard)
            for name, std in ((EMBEDDING, embedding_std), (OUTPUT, output_std)):
                if name not in weights:
                    continue
                old = weights[name]
                new = torch.randn(size, old.shape[1], generator=generator, dtype=torch.float32).to(old.dtype) * std
                for token, i in small.items():
                    if i < old.shape[0]:
                        new[large[token]] = old[i]
                weights[name] = new
                grown.append(name)
            save_file(weights, tmp / shard.name, metadata={"format": "pt"})
        if EMBEDDING not in grown:  # raised inside the block: no output is left behind
            raise ConversionError(f"{source_dir}: no {EMBEDDING} in its weights")
        for extra in source_dir.iterdir():  # the index and anything else that is not weights or tokenizer
            if extra.suffix != ".safetensors" and extra.name != "config.json" and not extra.name.startswith("token") \
                    and extra.name != "special_tokens_map.json" and extra.is_file():
                shutil.copy2(extra, tmp / extra.name)
        for file in tokenizer_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        config["vocab_size"] = size
        for key, token in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")):
            if key in config and token in large:
                config[key] = large[token]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {"source_vocab": len(small), "vocab": size, "kept_rows": len(small), "grown": grown}
