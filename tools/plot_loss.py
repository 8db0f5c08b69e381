#!/usr/bin/env python
"""Loss curve PNG from a training metrics.jsonl; see `longsky plot-loss --help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot-loss", *sys.argv[1:]]))
