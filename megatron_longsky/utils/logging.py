"""One logging set-up for every entry point: rank-aware, to stderr."""

from __future__ import annotations

import logging
import os
import sys


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# megatron-core loggers whose INFO lines say nothing to our users and would land in the middle
# of a one-line error (e.g. "Detected Megatron Core, using Megatron-FSDP", logged at import).
_QUIET_LOGGERS = ("megatron.core.distributed.fsdp",)


def setup_logging(level: str | int = "INFO", all_ranks: bool = False) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank != 0 and not all_ranks:
        level = logging.WARNING
    fmt = f"[%(asctime)s rank{rank} %(name)s %(levelname)s] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
