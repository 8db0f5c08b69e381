#!/usr/bin/env python
"""Needle-in-a-haystack sweep over a checkpoint or HF model; see `longsky needle --help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["needle", *sys.argv[1:]]))
