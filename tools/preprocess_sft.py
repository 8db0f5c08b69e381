#!/usr/bin/env python
"""Chat jsonl -> SFT token and loss-mask indexed datasets: see docs/sft.md or `--help`."""
import sys

from megatron_longsky.sft.preprocess import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
