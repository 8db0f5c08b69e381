#!/usr/bin/env python
"""Merge indexed datasets into one; see `longsky merge-datasets --help`."""
import sys

from megatron_longsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge-datasets", *sys.argv[1:]]))
