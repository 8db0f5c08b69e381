"""Long-context evaluation: needle sweep, passkey, RULER-style tasks, perplexity by position.

    from megatron_longsky.eval import NeedleConfig, run_needle, write_report
    result = run_needle(NeedleConfig(lengths=[1024, 2048]), backend, tokenizer)
    paths = write_report(result, "out/needle")      # {'png': ..., 'json': ..., 'md': ...}

Backends: :class:`~megatron_longsky.eval.backends.HFBackend` (transformers, local dir)
and :class:`~megatron_longsky.eval.megatron_backend.MegatronBackend` (our checkpoints,
forward-only with TP/PP/CP).
"""

from megatron_longsky.eval.backends import HFBackend, LMBackend, LogitsBackend
from megatron_longsky.eval.haystack import Haystack
from megatron_longsky.eval.needle import NeedleConfig, NeedleResult, depth_grid, run_needle
from megatron_longsky.eval.megatron_backend import MegatronBackend
from megatron_longsky.eval.passkey import run_passkey
from megatron_longsky.eval.perplexity import PerplexityConfig, perplexity_by_position, write_perplexity_report
from megatron_longsky.eval.report import (
    comparison_markdown, heatmaps_png, load_result, markdown_summary, write_comparison, write_report,
)
from megatron_longsky.eval.ruler import RulerConfig, run_ruler, write_ruler_report
from megatron_longsky.eval.scoring import Case, CaseResult, exact_match, score_case

__all__ = [
    "Case", "CaseResult", "HFBackend", "Haystack", "LMBackend", "LogitsBackend", "MegatronBackend",
    "NeedleConfig", "NeedleResult", "PerplexityConfig", "RulerConfig", "comparison_markdown", "depth_grid",
    "exact_match", "heatmaps_png", "load_result", "markdown_summary", "perplexity_by_position", "run_needle",
    "run_passkey", "run_ruler", "score_case", "write_comparison", "write_perplexity_report", "write_report",
    "write_ruler_report",
]
