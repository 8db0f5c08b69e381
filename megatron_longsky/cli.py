"""The ``longsky`` command: one entry point, a subcommand per capability.

Each subcommand lives in its own module and exposes ``main(argv) -> int``; the
scripts in ``tools/`` call the same functions, so both spellings behave the same.
Modules are imported lazily so ``longsky --help`` stays fast.

Every subcommand runs through :func:`run_command`: a user's mistake (a
:class:`~megatron_longsky.errors.UserError` such as ``ConfigError``, or a file that
cannot be read or written) is one line on stderr from rank 0 and exit status 2; any
other exception is our bug and keeps its traceback (exit 1). ``--debug`` anywhere on
the command line (or ``LONGSKY_DEBUG=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from typing import Callable

from megatron_longsky.errors import EXIT_FAILED, EXIT_USER_ERROR, UserError

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
    lines = ["usage: longsky [--debug] <command> [args...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun/srun launch, or a single process (the launcher's environment)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            try:
                return int(os.environ[key]) == 0
            except ValueError:
                return True
    return True


def split_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` (before any ``--``) from ``argv``; also on with LONGSKY_DEBUG=1."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return rest, debug or os.environ.get("LONGSKY_DEBUG", "") not in ("", "0")


def user_error_message(exc: BaseException) -> str | None:
    """The one line for a user's mistake, or None when ``exc`` is one of our bugs."""
    if isinstance(exc, UserError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and (exc.filename is not None or exc.strerror):
        # A path that does not exist, cannot be read or written, a full disk, ...
        where = f": {exc.filename}" if exc.filename is not None else ""
        other = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
        return f"{exc.strerror or exc}{where}{other}"
    return None


def _short_usage_error(parser: argparse.ArgumentParser, message: str):
    """argparse's usage error as two lines (argparse prints the whole usage, 10-16 lines for
    most commands, before the one line that matters): where to look, then the error."""
    parser.exit(2, f"usage: {parser.prog} [options] (`{parser.prog} --help` lists them)\n"
                   f"{parser.prog}: error: {message}\n")


@contextlib.contextmanager
def short_usage_errors():
    """Within the block, every argparse parser reports a usage error in two lines."""
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _short_usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def run_command(prog: str, fn: Callable[[list[str]], int | None], argv: list[str], debug: bool = False) -> int:
    """Run one subcommand's ``main(argv)`` with the shared error handling (see the module doc)."""
    argv, flag = split_debug_flag(list(argv))
    debug = debug or flag
    try:
        with short_usage_errors():
            return int(fn(argv) or 0)
    except SystemExit as exc:  # argparse usage errors exit 2 themselves; --help exits 0
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        if is_rank_zero():  # SystemExit("error: ...") from a command's own checks
            text = " ".join(str(code).split())
            print(text if text.startswith(f"{prog}:") else f"{prog}: {text}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if is_rank_zero():
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns exceptions into exit codes
        message = user_error_message(exc)
        if message is None:
            traceback.print_exc()
            print(f"{prog}: internal error (a bug, please report it with the traceback above): "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if is_rank_zero():
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug_flag(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"longsky: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module = importlib.import_module(COMMANDS[name][0])
    return run_command(f"longsky {name}", module.main, rest, debug)


if __name__ == "__main__":
    sys.exit(main())
