"""The control plane's answer to "hold this agent's ingest?": detection's, except while a
command sent to the agent awaits its final answer (responders wait for that answer, which may
be queued behind the agent's batches in the stream)."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.rpc import AgentSession, SessionRegistry
from collector.store.base import AgentRecord
from collector.store.sqlite import SQLiteStore
from proto import ringfence_pb2 as pb
from server.commands import CommandQueue
from server.control import BlobStore, ControlPlane

AGENT = "0d6f6a0e-6c1f-4d7a-9a39-3b2b5f0f2a11"


def test_an_agent_with_a_command_in_flight_is_never_held(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ringfence.db")
    store.register_agent(AgentRecord(AGENT, "web-01", "Debian", "6.1", "m" * 32, (), "1",
                                     bytes(32), "f" * 64, 1))
    registry = SessionRegistry()
    session = AgentSession(AGENT, "f" * 64)
    registry.add(session)
    commands = CommandQueue(store, registry, Ed25519PrivateKey.generate())
    control = ControlPlane(store, registry, commands, BlobStore(tmp_path / "blobs"),
                           lambda agent_id, events: None, lambda: 0.05)
    assert control.hold_ingest_s(AGENT) == 0.05         # detection lags: hold
    row = commands.issue(AGENT, "triage", {}, "rita", "IR-7")
    assert store.get_command(row.command_id).status == "sent"
    assert control.hold_ingest_s(AGENT) == 0.0          # its answer must get through
    assert control.hold_ingest_s("another-agent") == 0.05
    # Progress is not an answer; a final status is.
    control.command_result(AGENT, pb.CommandResult(command_id=row.command_id,
                                                   status="progress", message="1 of 3"))
    assert control.hold_ingest_s(AGENT) == 0.0
    control.command_result(AGENT, pb.CommandResult(command_id=row.command_id,
                                                   status="succeeded", message="done"))
    assert control.hold_ingest_s(AGENT) == 0.05
    # A command that expired unanswered stops counting.
    short = commands.issue(AGENT, "triage", {}, "rita", "IR-8", expires_s=1)
    assert store.get_command(short.command_id).status == "sent"
    assert control.hold_ingest_s(AGENT) == 0.0
    time.sleep(1.1)
    assert control.hold_ingest_s(AGENT) == 0.05
    # Without detection there is nothing to hold for.
    assert ControlPlane(store, registry, commands, BlobStore(tmp_path / "blobs")
                        ).hold_ingest_s(AGENT) == 0.0
    store.close()
