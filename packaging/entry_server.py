"""PyInstaller entry point of the one-dir `ringfence` (server and responder CLI) build."""

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main())
