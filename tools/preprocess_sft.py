#!/usr/bin/env python
"""Chat jsonl -> SFT token and loss-mask indexed datasets: see docs/sft.md or `--help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess-sft", *sys.argv[1:]]))
