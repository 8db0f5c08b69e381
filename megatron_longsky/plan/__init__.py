"""Planning: per-GPU memory and step time of a training config (``longsky plan``)."""

from megatron_longsky.plan.cli import main

__all__ = ["main"]
