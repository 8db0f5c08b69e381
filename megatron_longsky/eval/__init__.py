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
from megatron_longsky.eval.report import heatmaps_png, load_result, markdown_summary, write_report
from megatron_longsky.eval.scoring import Case, CaseResult, exact_match, score_case

__all__ = [
    "Case", "CaseResult", "HFBackend", "Haystack", "LMBackend", "LogitsBackend", "NeedleConfig",
    "NeedleResult", "depth_grid", "exact_match", "heatmaps_png", "load_result", "markdown_summary",
    "run_needle", "score_case", "write_report",
]
