"""Settings of the quickstart: the whole recipe in miniature on CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class QuickstartConfig:
    seed: int = 1234
    # Tokenizer: the built-in byte tokenizer, or a BPE trained on the corpus.
    tokenizer: Literal["byte", "bpe"] = "bpe"
    bpe_vocab_size: int = 2048
    # Built-in corpus from the Python standard library's docs and sources.
    corpus_bytes: int = 3_000_000
    heldout_bytes: int = 200_000
    # Share of training documents turned into recall documents (facts recalled further on).
    recall_fraction: float = 0.5
    workers: int = 2
    # The model: a small Llama-style decoder (GQA, SwiGLU, RMSNorm, RoPE).
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 384
    # Base pretraining at a short length, then continual pretraining (CPT) on CIP data
    # at long_seq_length with a raised RoPE base and context parallelism.
    base_seq_length: int = 256
    long_seq_length: int = 1024
    base_rope_base: float = 10000.0
    long_rope_base: float = 160000.0
    context_parallel: int = 2
    base_iters: int = 300
    cpt_iters: int = 80
    sft_iters: int = 60
    long_sft_iters: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 3e-3
    # CIP: documents per sequence and chunks per document.
    cip_docs_per_seq: int = 4
    cip_chunks_per_doc: int = 4
    # Run the CPT ablation on plain concatenated data too (CIP vs concatenation).
    ablation: bool = True
    # SFT data.
    sft_samples: int = 2000
    synl_samples: int = 300
    synl_eval_samples: int = 40
    synl_min_tokens: int = 300
    synl_max_tokens: int = 900
    # Needle sweep after each stage.
    needle_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    needle_depths: int = 5
    needle_samples: int = 4
    # Held-out documents for perplexity and loss by position (at most; those long enough).
    ppl_documents: int = 16
