"""Checks on output paths, made before a command does any expensive work."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_longsky.config import ConfigError


def ensure_writable_dir(key: str, directory: str | Path) -> Path:
    """Make sure ``directory`` can hold our outputs: it is a writable directory, or the
    nearest existing parent is one (so it can be created). Nothing is left behind; a
    :class:`ConfigError` naming ``key`` and the path otherwise."""
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={directory} cannot be written: {existing} is not a directory")
    probe = existing / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}={directory} cannot be written: {exc.strerror or exc} ({existing})") from exc
    return directory


def _input_paths(value) -> list[str]:
    """The files behind an input flag's value (``indexed:<prefix>`` names its dataset files)."""
    if not isinstance(value, str) or not value or value == "default":
        return []
    if value.startswith("indexed:"):
        prefix = value[len("indexed:"):]
        return [f"{prefix}.bin", f"{prefix}.idx", f"{prefix}.meta.json"]
    return [value]


# argparse destinations of the evaluation commands' inputs: (directories read whole, files)
_TREE_INPUTS = ("checkpoint", "hf_model", "tokenizer_dir")
_FILE_INPUTS = ("data", "haystack", "chat_template", "tokenizer_model", "config")


def ensure_report_dir(args, flag: str = "--output") -> Path:
    """An evaluation command's report directory (``args.output``): never one of the command's
    inputs (its checkpoint, model, data, haystack, template; any spelling) nor inside an input
    directory, and writable (:func:`ensure_writable_dir`). Called before the model is loaded."""
    from megatron_longsky.utils.output_paths import check_outputs

    trees = [getattr(args, k) for k in _TREE_INPUTS if isinstance(getattr(args, k, None), str)]
    files = [p for k in _FILE_INPUTS for p in _input_paths(getattr(args, k, None))]
    check_outputs([], inputs=files, tree_inputs=trees, report_dirs=[args.output], flag=flag)
    return ensure_writable_dir(flag, args.output)
