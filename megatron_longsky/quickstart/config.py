"""Settings of the quickstart: the whole recipe in miniature on CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class QuickstartConfig:
    seed: int = 1234
    # Tokenizer: the built-in byte tokenizer, or a BPE trained on the corpus.
    tokenizer: Literal["byte", "bpe"] = "bpe"
    bpe_vocab_size: int = 2048
    # Every digit its own token (as Llama): copying a number is a fixed per-digit copy.
    bpe_split_digits: bool = True
    # Built-in corpus from the Python standard library's docs and sources.
    corpus_bytes: int = 3_000_000
    heldout_bytes: int = 300_000
    # Share of training documents turned into recall documents (facts recalled further on).
    # Off by default: at 0.9 the needle stayed at 0% and the training text no longer looked
    # like the held-out text (held-out perplexity after long SFT 105.7 vs 58.8 at 0.0).
    recall_fraction: float = 0.0
    # Share of the training bytes that are recall drills: made-up key -> value facts, each
    # asked about further on (dense copy targets). Off by default: at 0.5 the needle stayed
    # at 0% and held-out perplexity after SFT was 118 vs 95 without (each run with its own BPE,
    # so only indicative); see docs/data.md, "Retrieval at quickstart scale".
    drill_fraction: float = 0.0
    # Share of drills that are a line repeated verbatim (the plainest copy signal).
    drill_repeat_share: float = 0.3
    workers: int = 2
    # The model: a small Llama-style decoder (GQA, SwiGLU, RMSNorm, RoPE). Two layers: enough
    # for an induction circuit (a previous-token head, then a matching head), and the cheapest.
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 384
    # Base pretraining at a short length, then continual pretraining (CPT) on CIP data
    # at long_seq_length with a raised RoPE base and context parallelism.
    base_seq_length: int = 128
    long_seq_length: int = 512
    base_rope_base: float = 10000.0
    # About the NTK-aware base for a 4x longer context (10000 * 4 ** (d / (d - 2)) = 43,900 at
    # head dim 32). Measured against 160000 from the same base model (benchmarks/RESULTS.md,
    # "RoPE base for CPT"): needle at 512 77% for both; held-out perplexity at 512 215 vs 259;
    # loss beyond 128 0.15 nats below the loss within 128 (160000: 0.52 above).
    long_rope_base: float = 40000.0
    context_parallel: int = 2
    base_iters: int = 800
    # Megatron's init_method_std for the model's matrices (0.05 is about PyTorch's default
    # for a 128-wide linear layer).
    init_method_std: float = 0.02
    # The word embedding's init std (model.embedding_init_std; None: init_method_std).
    embedding_init_std: Optional[float] = 1.0
    # The retrieval curriculum (data/retrieval_curriculum.py): the miniature's stand-in for "a
    # pretrained model that already retrieves". Base pretraining starts with copy_warmup_iters
    # on induction samples alone (chunks of a random source over the corpus's most frequent
    # tokens, loss on the copied tokens only), then base_iters on corpus text mixed with recall
    # (key -> value facts asked further on) and induction samples. Measured on the quickstart's
    # model (benchmarks/RESULTS.md, "Retrieval formation"): the copy forms by warm-up iteration
    # 400 with the alphabet as the warm-up model's vocabulary, and the base model then finds the
    # needle at 128 tokens; with retrieval_curriculum=false no stage's model retrieves.
    retrieval_curriculum: bool = True
    copy_warmup_iters: int = 400
    copy_warmup_lr: float = 3e-3
    # The warm-up's learning rate after its linear ramp (10% of its iterations): the copy
    # forms in a phase change, which a decaying rate delays.
    copy_warmup_decay: Literal["cosine", "constant", "linear"] = "constant"
    # Then this many iterations on keyed samples alone (records "key sep value" over the same
    # alphabet, asked again: only the key tells the values apart), from the warm-up's weights and
    # in its vocabulary. The copy alone finds a needle by its wording, and a second needle of the
    # same wording halves the hit rate (benchmarks/RESULTS.md, "Needle with distractors"). Off by
    # default: the key match formed on the alphabet (keyed loss 3.6 -> 0.2 in 300 iterations) but
    # the base model's needle with a distractor stayed at chance. Mixed into the warm-up from its
    # start, keyed samples kept the copy from forming within 400 iterations.
    keyed_warmup_iters: int = 0
    warmup_induction: float = 1.0
    warmup_repeat_small: float = 0.0
    warmup_repeat_words: float = 0.0
    warmup_recall: float = 0.0
    # The warm-up's model has the induction alphabet (and the special tokens) as its whole
    # vocabulary; its rows are then grown to the tokenizer's (convert/grow_vocab.py). With the
    # tokenizer's 2048 output rows the copy did not form within 500 warm-up iterations; with the
    # alphabet's alone it formed by 400 (benchmarks/RESULTS.md, "Retrieval formation").
    # Needs a warm-up of induction samples only and the BPE tokenizer.
    copy_warmup_alphabet_vocab: bool = True
    curriculum_alphabet: int = 12
    # The induction samples' symbols (the corpus's most frequent tokens, digits included) and
    # the length of their repeated segment.
    induction_alphabet: int = 64
    # Leave this many of the most frequent tokens (digits apart) out of the induction alphabet.
    # Copying after the commonest tokens ("the", ".", spaces) is mostly wrong in natural text:
    # from the same warm-up, skip 0 / 64 / 128 gave base perplexity at 512 150 / 76 / 72 and
    # the needle at 128 73% / 63% / 57%. But after CPT, skip 64 found the needle at 512 in
    # 3% of cases (skip 0: 77%), so the default stays 0 (benchmarks/RESULTS.md, "Induction
    # alphabet").
    induction_skip: int = 0
    induction_segment: int = 8
    base_recall_share: float = 0.25
    # Share of induction samples in the base mix (keeps the copy formed in the warm-up).
    base_induction_share: float = 0.15
    # Share of keyed samples in the base mix (0: none). With 0.15 in place of the induction share,
    # perplexity at 512 after CPT was 89.5 (default 214.9) with the needle claim kept, but the
    # distractor sweep and SynL did not move and the long-SFT model lost the needle
    # (benchmarks/RESULTS.md, "Needle with distractors").
    base_keyed_share: float = 0.0
    # Share of CPT samples that are recall samples at long_seq_length (made-up key -> value
    # facts among corpus lines, asked at the end; loss on the values), the rest whole CIP (or,
    # for the ablation, concatenated) sequences. Natural text at this scale has few long-range
    # dependencies: with CIP alone the needle at 512 reached 13% after CPT (75% of its answer
    # tokens), with 20% recall samples 77%. 0: CPT on the CIP dataset alone.
    cpt_recall_share: float = 0.2
    cpt_iters: int = 120
    sft_iters: int = 40
    long_sft_iters: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 8
    # Stages at the long length (CPT, long SFT).
    long_global_batch_size: int = 8
    long_micro_batch_size: int = 4
    lr: float = 3e-3
    # CIP: documents per sequence and chunks per document.
    cip_docs_per_seq: int = 4
    cip_chunks_per_doc: int = 4
    # Run the CPT ablation on plain concatenated data too (CIP vs concatenation).
    ablation: bool = True
    # SFT data.
    sft_samples: int = 2000
    synl_samples: int = 1000
    synl_eval_samples: int = 90
    # jsonl rows name every cell's column: a tiny model can find a cell by copying.
    synl_format: Literal["markdown", "csv", "jsonl", "mixed"] = "jsonl"
    # Share of long-SFT records that are general-text continuations (keeps the LM intact).
    long_sft_general: float = 0.3
    synl_min_tokens: int = 150
    synl_max_tokens: int = 350
    # Needle sweep after each stage.
    needle_lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    needle_depths: int = 5
    needle_samples: int = 6
    # A second sweep per model with this many distractors: needles with other keys that are not
    # asked about. One needle can be found by copying what follows its wording; with a distractor
    # only the key tells the two apart, which is what a table lookup needs. 0: no second sweep.
    needle_distractors: int = 1
    # Held-out documents for perplexity and loss by position (at most; those long enough).
    ppl_documents: int = 16

    def __post_init__(self):
        """Every field checked when the config is loaded, not when its stage runs (a negative
        ``base_iters`` used to fail after the data stages, a minute in)."""
        from dataclasses import fields

        may_be_zero = {"copy_warmup_iters", "copy_warmup_bytes", "induction_skip", "needle_distractors",
                       "keyed_warmup_iters"}
        fractions = {"recall_fraction", "drill_fraction", "drill_repeat_share", "long_sft_general",
                     "warmup_induction", "warmup_repeat_small", "warmup_repeat_words", "warmup_recall",
                     "base_recall_share", "base_induction_share", "base_keyed_share", "cpt_recall_share"}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and f.name != "seed" and value < (0 if f.name in may_be_zero else 1):
                raise ValueError(f"{f.name} must be >= {0 if f.name in may_be_zero else 1}, got {value}")
            if f.type == "float" and f.name in fractions and not 0 <= value <= 1:
                raise ValueError(f"{f.name} must be in [0, 1], got {value}")
            if f.type == "float" and f.name not in fractions and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if self.embedding_init_std is not None and not self.embedding_init_std > 0:
            raise ValueError(f"embedding_init_std must be > 0, got {self.embedding_init_std}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        for glob, micro in (("global_batch_size", "micro_batch_size"),
                            ("long_global_batch_size", "long_micro_batch_size")):
            if getattr(self, glob) % getattr(self, micro):
                raise ValueError(f"{glob} {getattr(self, glob)} is not a multiple of {micro} {getattr(self, micro)}")
        if self.retrieval_curriculum and self.copy_warmup_iters > 0 and self.copy_warmup_alphabet_vocab:
            others = {k: getattr(self, k) for k in ("warmup_repeat_small", "warmup_repeat_words", "warmup_recall")
                      if getattr(self, k) > 0}
            if others or self.warmup_induction <= 0 or self.tokenizer != "bpe":
                raise ValueError("copy_warmup_alphabet_vocab needs a warm-up of induction samples only "
                                 f"(warmup_induction > 0, got {self.warmup_induction}; other shares {others}) "
                                 f"and tokenizer=bpe (got {self.tokenizer}); or set copy_warmup_alphabet_vocab=false")
        if self.keyed_warmup_iters and not (self.retrieval_curriculum and self.copy_warmup_iters):
            raise ValueError(f"keyed_warmup_iters {self.keyed_warmup_iters} follows the copy warm-up: it needs "
                             f"retrieval_curriculum=true and copy_warmup_iters > 0 (got {self.retrieval_curriculum}, "
                             f"{self.copy_warmup_iters})")
        retrieval = self.base_recall_share + self.base_induction_share + self.base_keyed_share
        if retrieval > 1:
            raise ValueError(f"base_recall_share {self.base_recall_share} + base_induction_share "
                             f"{self.base_induction_share} + base_keyed_share {self.base_keyed_share} exceed 1 "
                             "(the rest of the base mix is corpus text)")
        if self.synl_min_tokens > self.synl_max_tokens:
            raise ValueError(f"synl_min_tokens {self.synl_min_tokens} exceeds synl_max_tokens {self.synl_max_tokens}")
        if not self.needle_lengths or min(self.needle_lengths) < 1:
            raise ValueError(f"needle_lengths must be positive lengths, got {self.needle_lengths}")
        if self.base_seq_length > self.long_seq_length:
            raise ValueError(f"base_seq_length {self.base_seq_length} exceeds long_seq_length {self.long_seq_length}")
