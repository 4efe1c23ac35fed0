"""Throwaway network-namespace topologies for integration tests (root only).

The implementation lives in the product (`isolation.lab`) so the demo and the benchmark can
use it without importing tests; this module re-exports it for the tests written against it.
"""

from __future__ import annotations

from isolation.lab import (
    CONNECT,
    ECHO_SERVER,
    HOLD,
    MAX_HOSTS,
    Host,
    LabError,
    Topology,
    hold_exchange,
    kill_group,
    python_argv,
    start_hold,
    topology,
)

__all__ = [
    "CONNECT",
    "ECHO_SERVER",
    "HOLD",
    "MAX_HOSTS",
    "Host",
    "LabError",
    "Topology",
    "hold_exchange",
    "kill_group",
    "python_argv",
    "start_hold",
    "topology",
]
