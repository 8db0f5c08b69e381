#!/usr/bin/env python
"""Train / resume a model; see `longsky train --help` (torchrun or srun for several processes)."""
import sys

from megatron_longsky.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
