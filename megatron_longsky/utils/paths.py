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
