"""PyInstaller entry point of the one-dir `ringfence` (server and responder CLI) build."""

import multiprocessing
import sys

from server.cli import main

if __name__ == "__main__":
    # Detection evaluates in a spawned child process; in a frozen build the child starts
    # this executable, which must hand over to multiprocessing instead of running the CLI.
    multiprocessing.freeze_support()
    sys.exit(main())
