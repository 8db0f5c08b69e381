#!/usr/bin/env python
"""jsonl corpora -> Megatron indexed datasets; see `longsky preprocess --help`.

Accepts Megatron-LM's tools/preprocess_data.py command line unchanged (docs/data.md).
"""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
