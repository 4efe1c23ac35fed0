"""Last-seen times of agents, coalesced in memory and written to the store in batches.

Ten thousand agents heartbeating every 30 s would otherwise be ~333 single-row write
transactions a second (each an fsync with SQLite). Heartbeats only move `last_seen_ns`
forward, so the newest time per agent is kept here and written once per flush. It knows
nothing of gRPC; the collector's listener decides when to flush.
"""

from __future__ import annotations

import logging
import threading

from collector.store.base import Store, StoreError

logger = logging.getLogger(__name__)

# Flush pending last-seen times at least this often (seconds).
FLUSH_INTERVAL_S = 1.0


class LastSeen:
    """Pending last-seen times by agent id; `flush` writes them all in one store call."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        # One flush at a time, so a slow flush and the final one at shutdown never interleave.
        self._flushing = threading.Lock()

    def touch(self, agent_id: str, now_ns: int) -> None:
        """Record that the agent was seen at `now_ns` (thread-safe, no IO)."""
        with self._lock:
            if now_ns > self._pending.get(agent_id, 0):
                self._pending[agent_id] = now_ns

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write every pending time; return how many agents were written.

        On a store failure the times are kept for the next flush (never dropped silently) and
        the error is raised to the caller, which logs it.
        """
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                self._store.agents_seen(batch)
            except StoreError:
                with self._lock:
                    for agent_id, seen_ns in batch.items():
                        if seen_ns > self._pending.get(agent_id, 0):
                            self._pending[agent_id] = seen_ns
                raise
            return len(batch)
