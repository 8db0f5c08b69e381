#!/usr/bin/env python
"""Train / resume a model; see `longsky train --help` (torchrun or srun for several processes)."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
