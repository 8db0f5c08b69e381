#!/usr/bin/env python
"""HF <-> megatron_longsky checkpoints; see `longsky convert --help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
