"""Shared helpers for the training tests: a tiny tokenised dataset and tiny job configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_longsky.data.indexed import IndexedDatasetWriter
from megatron_longsky.tokenizer import ByteTokenizer


def write_token_dataset(prefix: str | Path, num_docs: int = 64, seed: int = 0, min_len: int = 20,
                        max_len: int = 200) -> str:
    """Random byte-token documents ending in EOD, with the tokenizer sidecar."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, np.uint16)
    # A learnable stream: each document repeats a short random motif.
    for _ in range(num_docs):
        motif = rng.integers(97, 123, size=int(rng.integers(3, 8)))
        length = int(rng.integers(min_len, max_len))
        doc = np.append(np.resize(motif, length), tok.eod_id).astype(np.uint16)
        writer.add_document(doc, [len(doc)])
    writer.finalize({"tokenizer": tok.metadata()})
    writer.commit()
    return str(prefix)


# A tiny fp32 model, small enough for a few steps in well under a second each.
TINY_MODEL = {"preset": "tiny", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "num_query_groups": 2, "ffn_hidden_size": 64, "seq_length": 32, "vocab_size": 384}


def tiny_config_dict(tmp: str | Path, prefix: str, **top) -> dict:
    """A training config of :data:`TINY_MODEL` on the dataset at ``prefix``."""
    tmp = Path(tmp)
    cfg = {
        "model": dict(TINY_MODEL),
        "tokenizer": {"type": "byte"},
        "data": {"kind": "gpt", "prefixes": [prefix], "split": "100,0,0", "cache_dir": str(tmp / "cache")},
        "optimizer": {"lr": 1.0e-2, "min_lr": 1.0e-3, "weight_decay": 0.1, "clip_grad": 1.0},
        "schedule": {"warmup_iters": 1, "decay_style": "cosine"},
        "logging": {"log_interval": 1, "tensorboard": False},
        "output_dir": str(tmp / "run"),
        "seed": 7,
        "train_iters": 4,
        "micro_batch_size": 1,
        "global_batch_size": 4,
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_sft_dataset(tmp: str | Path, num_samples: int = 12, seed: int = 0) -> str:
    """Chat samples through ``longsky preprocess-sft`` (byte tokenizer); returns the prefix."""
    import json

    from megatron_longsky.sft.preprocess import main as preprocess_sft

    rng = np.random.default_rng(seed)
    tmp = Path(tmp)
    with open(tmp / "chat.jsonl", "w", encoding="utf-8") as f:
        for i in range(num_samples):
            question = "question " * int(rng.integers(1, 5)) + str(i)
            answer = "answer " * int(rng.integers(1, 10)) + str(i)
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    assert preprocess_sft(["--input", str(tmp / "chat.jsonl"), "--output-prefix", str(tmp / "chat"),
                           "--no-progress"]) == 0
    return str(tmp / "chat")
