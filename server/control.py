"""The control plane: what the server does when agents connect, report and send files.

It implements `collector.rpc.ControlPlane`: delivers queued commands on connect, turns command
results and isolation events into host state, and receives acquired files into the blob store,
checking each against the agent-signed acquisition record. Authorization lives in server.admin.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from collector.ingest import DecodedEvent
from collector.rpc import AgentSession, SessionRegistry
from collector.store.base import AgentRecord, FileRow, IntegrityAlertRow, NotFound, Store
from evidence.acquisition import verify_acquisition
from evidence.errors import EvidenceError
from evidence.keys import public_key_from_bytes
from proto import ringfence_pb2 as pb
from server.commands import CommandQueue

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 512 << 20
MAX_OPEN_TRANSFERS = 64

# Host isolation state after each command outcome.
ISOLATION_AFTER_RESULT = {
    ("isolate", "succeeded"): "isolated",
    ("isolate", "failed"): "failed",
    ("isolate", "rejected"): "failed",
    ("isolate", "expired"): "failed",
    ("release", "succeeded"): "none",
    ("release", "failed"): "isolated",
    ("release", "rejected"): "isolated",
}

# Host isolation state implied by the agent's own chain events.
ISOLATION_AFTER_TRANSITION = {
    pb.IsolationActivity.REAPPLIED: "isolated",
    pb.IsolationActivity.CONFIRMED: "isolated",
    pb.IsolationActivity.RELEASED: "none",
    pb.IsolationActivity.FAILED: "failed",
}


@dataclass
class _Transfer:
    path: Path
    digest: hashlib._Hash
    size: int = 0


class BlobStore:
    """Content-addressed files under DATA/blobs: files/<sha256>; partial uploads in tmp/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "files").mkdir(parents=True, exist_ok=True, mode=0o700)
        (root / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)

    def path_of(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / "files" / sha256

    def tmp_path(self, key: str) -> Path:
        return self.root / "tmp" / key


class ControlPlane:
    """The server's side of agent sessions."""

    def __init__(self, store: Store, registry: SessionRegistry, commands: CommandQueue,
                 blobs: BlobStore,
                 detection: Callable[[str, list[DecodedEvent]], None] | None = None,
                 detection_hold: Callable[[], float] | None = None) -> None:
        self._store = store
        # Receives every stored batch (server.detection queues it and returns at once), and
        # says when to hold ingest because detection lags.
        self._detection = detection
        self._detection_hold = detection_hold
        self._registry = registry
        self._commands = commands
        self._blobs = blobs
        self._lock = threading.Lock()
        self._transfers: dict[tuple[str, str, bytes], _Transfer] = {}
        self._received: dict[tuple[str, str, bytes], tuple[str, int]] = {}

    # -- sessions -------------------------------------------------------------------------------
    def agent_connected(self, agent: AgentRecord, hello: pb.Hello, session: AgentSession) -> None:
        logger.info("agent %s (%s) connected, version %s", agent.agent_id, agent.hostname,
                    hello.agent_version)
        self._commands.redeliver(agent.agent_id)

    def agent_disconnected(self, agent_id: str, session: AgentSession) -> None:
        logger.info("agent %s disconnected", agent_id)
        with self._lock:
            for key in [k for k in self._transfers if k[0] == agent_id]:
                transfer = self._transfers.pop(key)
                transfer.path.unlink(missing_ok=True)

    # -- results and events ---------------------------------------------------------------------
    def command_result(self, agent_id: str, result: pb.CommandResult) -> None:
        try:
            row = self._store.get_command(result.command_id)
        except NotFound:
            logger.warning("agent %s answered unknown command %s", agent_id, result.command_id)
            return
        if row.agent_id != agent_id:
            logger.warning("agent %s answered a command addressed to %s", agent_id, row.agent_id)
            return
        status = result.status if result.status != "progress" else row.status
        self._commands.update(row.command_id, status, result.message,
                              result.detail_json or row.detail_json)
        self._commands.answered(agent_id, row.command_id, status)
        state = ISOLATION_AFTER_RESULT.get((row.action, status))
        if state is not None:
            reason = row.reason if status == "succeeded" else result.message
            self._store.set_isolation(agent_id, state, reason, time.time_ns())

    def events_stored(self, agent_id: str, events: list[DecodedEvent]) -> None:
        for d in events:
            if d.kind == "isolation":
                state = ISOLATION_AFTER_TRANSITION.get(d.event.isolation.transition)
                if state is not None:
                    self._store.set_isolation(agent_id, state, d.event.isolation.reason,
                                              time.time_ns())
            elif d.kind == "acquisition":
                self._check_acquisition(agent_id, d.event.acquisition)
        if self._detection is not None:
            self._detection(agent_id, events)

    def hold_ingest_s(self, agent_id: str) -> float:
        if self._detection_hold is None or self._commands.awaiting_answer(agent_id):
            # An agent with a command in flight is never held: its answer (isolation
            # confirmed, a file collected) may be queued behind its batches in the stream.
            return 0.0
        return self._detection_hold()

    # -- files ----------------------------------------------------------------------------------
    def file_chunk(self, agent_id: str, chunk: pb.FileChunk) -> None:
        key = (agent_id, chunk.command_id, bytes(chunk.path))
        with self._lock:
            transfer = self._transfers.get(key)
            if transfer is None:
                if chunk.offset != 0 or len(self._transfers) >= MAX_OPEN_TRANSFERS:
                    logger.warning("agent %s sent a chunk at offset %d of a transfer not started",
                                   agent_id, chunk.offset)
                    return
                name = hashlib.sha256(repr(key).encode()).hexdigest()[:32] + ".part"
                transfer = _Transfer(self._blobs.tmp_path(name), hashlib.sha256())
                transfer.path.write_bytes(b"")
                self._transfers[key] = transfer
            if chunk.offset != transfer.size or transfer.size + len(chunk.data) > MAX_FILE_BYTES:
                logger.warning("agent %s: chunk out of order or file over the cap; dropping "
                               "the transfer", agent_id)
                self._transfers.pop(key, None)
                transfer.path.unlink(missing_ok=True)
                return
            with transfer.path.open("ab") as f:
                f.write(chunk.data)
            transfer.digest.update(chunk.data)
            transfer.size += len(chunk.data)
            if chunk.last:
                self._transfers.pop(key)
                sha = transfer.digest.hexdigest()
                os.replace(transfer.path, self._blobs.path_of(sha))
                self._received[key] = (sha, transfer.size)

    def _check_acquisition(self, agent_id: str, acq: pb.FileAcquisition) -> None:
        if acq.error:
            return
        agent = self._store.get_agent(agent_id)
        assert agent is not None
        now = time.time_ns()
        key = (agent_id, acq.command_id, bytes(acq.path))
        with self._lock:
            received = self._received.pop(key, None)
        try:
            record = verify_acquisition(acq.record_dsse, public_key_from_bytes(agent.identity_key),
                                        expected_agent_id=agent_id)
        except EvidenceError as e:
            self._store.add_alert(IntegrityAlertRow(agent_id, "bad_signature", 0,
                                                    f"acquisition record failed verification: {e}",
                                                    now))
            return
        if received is None or received != (record.sha256, record.size):
            detail = ("the file content never arrived" if received is None else
                      f"received content has SHA-256 {received[0]} ({received[1]} bytes), the "
                      f"agent signed {record.sha256} ({record.size} bytes)")
            self._store.add_alert(IntegrityAlertRow(agent_id, "acquisition_mismatch", 0, detail,
                                                    now))
            return
        self._store.add_file(FileRow(record.sha256, record.size, agent_id, acq.command_id,
                                     bytes(acq.path), bytes(acq.record_dsse), now))
        logger.info("stored acquired file %s (%d bytes) from agent %s", record.sha256,
                    record.size, agent_id)


def describe_files(rows: list[FileRow]) -> str:
    return json.dumps([{"sha256": r.sha256, "size": r.size} for r in rows])
