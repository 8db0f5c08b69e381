"""The ``longsky`` command: one entry point, a subcommand per capability.

Each subcommand lives in its own module and exposes ``main(argv) -> int``; the
scripts in ``tools/`` call the same functions, so both spellings behave the same.
Modules are imported lazily so ``longsky --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("megatron_longsky.quickstart", "run the whole recipe on a tiny model (CPU)"),
    "preprocess": ("megatron_longsky.data.preprocess", "jsonl corpora -> Megatron indexed datasets"),
    "merge-datasets": ("megatron_longsky.data.merge", "merge indexed datasets into one"),
    "build-cip": ("megatron_longsky.data.cip", "chunk-interleaved (CIP) long sequences from documents"),
    "preprocess-sft": ("megatron_longsky.sft.preprocess", "chat jsonl -> SFT token + loss-mask datasets"),
    "build-synl": ("megatron_longsky.synl.generate", "Synthetic Lengthy Tables (long-context SFT data)"),
    "train": ("megatron_longsky.training.cli", "train / resume a model (torchrun or srun for several processes)"),
    "plot-loss": ("megatron_longsky.training.plot", "loss curve PNG from a training metrics.jsonl"),
    "synl-eval": ("megatron_longsky.synl.eval_cli", "exact-match accuracy on held-out SynL questions"),
    "convert": ("megatron_longsky.convert.cli", "HF <-> megatron_longsky checkpoints (import / export)"),
    "needle": ("megatron_longsky.eval.needle_cli", "needle-in-a-haystack sweep: heatmap, JSON, Markdown"),
    "eval": ("megatron_longsky.eval.tasks_cli", "passkey, RULER-style tasks, perplexity by position"),
    "plan": ("megatron_longsky.plan.cli", "per-GPU memory, fit and step time/MFU of a training config"),
    "doctor": ("megatron_longsky.runtime.doctor", "versions, the path each feature takes here, known-bad combinations"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: longsky <command> [args...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"longsky: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
