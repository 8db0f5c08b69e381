"""Synthetic Lengthy Tables (SynL): long tables with exactly answered questions.

    from megatron_longsky.synl import SynLConfig, build_synl, score_answer, verify_record
    records = build_synl(SynLConfig(num_samples=10, min_tokens=200, max_tokens=800), tokenizer)
    assert not verify_record(records[0])          # recomputed from the table text
    score_answer("Answer: CU-01234", records[0])  # exact match of the final answer
"""

from megatron_longsky.synl.generate import SynLConfig, build_synl, iter_synl, prompt_turns, write_synl_jsonl
from megatron_longsky.synl.verify import recompute_answer, score_answer, verify_record

__all__ = ["SynLConfig", "build_synl", "iter_synl", "prompt_turns", "recompute_answer", "score_answer", "verify_record",
           "write_synl_jsonl"]
