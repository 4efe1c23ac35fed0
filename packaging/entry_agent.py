"""PyInstaller entry point of the one-file `ringfence-agent` binary."""

import sys

from agent.main import main

if __name__ == "__main__":
    sys.exit(main())
