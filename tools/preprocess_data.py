#!/usr/bin/env python
"""jsonl corpora -> Megatron indexed datasets; see `longsky preprocess --help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
