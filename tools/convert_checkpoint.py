#!/usr/bin/env python
"""HF <-> megatron_longsky checkpoints; see `longsky convert --help`."""
import sys

from megatron_longsky.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
