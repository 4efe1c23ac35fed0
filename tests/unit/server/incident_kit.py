"""A real Admin over a real SQLite store with one registered host and no agent session:
commands are signed and queued, audit records written, nothing is delivered."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.rpc import SessionRegistry
from collector.store.base import AgentRecord
from collector.store.sqlite import SQLiteStore
from server.admin import Admin
from server.commands import CommandQueue

AGENT_ID = "0d6f6a0e-6c1f-4d7a-9a39-3b2b5f0f2a11"
HOSTNAME = "web-01"


def make_admin(tmp: Path, hostname: str = HOSTNAME, agent_id: str = AGENT_ID
               ) -> tuple[Admin, SQLiteStore]:
    store = SQLiteStore(tmp / "ringfence.db")
    store.register_agent(AgentRecord(agent_id, hostname, "Debian", "6.1", "m" * 32, (), "1",
                                     bytes(32), "f" * 64, 1))
    registry = SessionRegistry()
    commands = CommandQueue(store, registry, Ed25519PrivateKey.generate())
    return Admin(store, registry, commands, [("198.18.0.1", 8443)]), store
