#!/usr/bin/env python
"""Per-GPU memory, fit and step time of a training config (see docs/plan.md)."""
import sys

from megatron_longsky.cli import main

sys.exit(main(["plan", *sys.argv[1:]]))
