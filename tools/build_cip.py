#!/usr/bin/env python
"""Chunk Interleaved Pretraining data: see docs/cip.md or `--help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-cip", *sys.argv[1:]]))
