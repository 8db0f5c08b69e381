#!/usr/bin/env python
"""Synthetic Lengthy Tables (SynL) as chat jsonl: see docs/synl.md or `--help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-synl", *sys.argv[1:]]))
