#!/usr/bin/env python3
"""`python worker.py --procs 8`: the same program as `botworker run --procs 8`."""

import sys

from botworker.__main__ import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        argv = ["run", *argv]
    sys.exit(main(argv))
