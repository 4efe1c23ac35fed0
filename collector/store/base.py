"""The store interface every backend implements, and the records it speaks in.

It defines what the collector and server may ask of storage; it holds no SQL and no policy
(chain verification lives in `collector.ingest`, authorization in `server`).

Exceptions:

    StoreError                  root
    +-- StoreUnavailable        the backend refused or failed (disk full, locked, down)
    |   +-- Conflict            a write lost a race for a unique key; retrying may succeed
    +-- TokenRejected           an enrollment token is unknown, expired, used up or revoked
    +-- NotFound                a named host, command or file does not exist
"""

from __future__ import annotations

import abc
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class StoreError(Exception):
    """Root of storage errors."""


class StoreUnavailable(StoreError):
    """The backend failed (disk full, I/O error, locked); nothing was written."""


class Conflict(StoreUnavailable):
    """A write lost a race with another writer for a unique key (the same command seq issued
    by two collector nodes at once, the same event seq ingested twice); nothing was written."""


class TokenRejected(StoreError):
    """An enrollment token cannot be used; `reason` says why, for the local log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotFound(StoreError):
    """A host, command or file named by the caller does not exist."""


@dataclass(frozen=True)
class AgentRecord:
    agent_id: str
    hostname: str
    os: str
    kernel: str
    machine_id: str
    addresses: tuple[str, ...]
    agent_version: str
    identity_key: bytes          # raw Ed25519 public key that signs the agent's checkpoints
    cert_fingerprint: str        # SHA-256 of the current client certificate (hex)
    enrolled_ns: int
    last_seen_ns: int = 0
    revoked: bool = False
    sensors: dict[str, str] = field(default_factory=dict)
    isolation_state: str = "none"
    isolation_changed_ns: int = 0
    isolation_reason: str = ""


@dataclass(frozen=True)
class ChainState:
    """Where an agent's verified chain stands at the collector."""

    last_seq: int                # highest seq stored in chain order (0 = nothing yet)
    head: bytes                  # h[last_seq]


class EventRow(NamedTuple):
    """One stored event. A NamedTuple, not a dataclass: ingest builds one per event and the
    SQL layer binds it as is (its field order is the events table's column order)."""

    agent_id: str
    seq: int
    time_ns: int
    kind: str
    data: bytes
    chain_hash: bytes
    received_ns: int


@dataclass(frozen=True)
class CheckpointRow:
    agent_id: str
    seq: int
    head: bytes
    time_ns: int
    envelope: bytes


@dataclass(frozen=True)
class IntegrityAlertRow:
    agent_id: str
    kind: str
    seq: int
    detail: str
    time_ns: int


@dataclass(frozen=True)
class CommandRow:
    command_id: str
    agent_id: str
    seq: int
    action: str
    envelope: bytes
    status: str
    message: str
    detail_json: str
    issued_ns: int
    expires_ns: int
    updated_ns: int
    actor: str
    reason: str


@dataclass(frozen=True)
class AuditRow:
    seq: int
    time_ns: int
    actor: str
    role: str
    action: str
    target: str
    reason: str
    outcome: str
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True)
class ResponderRow:
    name: str
    role: str
    cert_fingerprint: str
    created_ns: int
    revoked: bool = False


@dataclass(frozen=True)
class FileRow:
    sha256: str
    size: int
    agent_id: str
    command_id: str
    path: bytes
    record_envelope: bytes
    stored_ns: int


@dataclass(frozen=True)
class IngestResult:
    stored: int                  # new events written
    duplicates: int              # exact re-sends ignored
    chain: ChainState            # chain state after the batch


GENESIS_AUDIT = bytes(32)

# Channels of cross-node notifications (PostgreSQL LISTEN/NOTIFY); the payload is an agent id.
COMMANDS_CHANNEL = "ringfence_commands"          # a command for the agent was stored
REVOCATIONS_CHANNEL = "ringfence_revocations"    # the agent was revoked: end its session


def audit_record_hash(prev: bytes, seq: int, time_ns: int, actor: str, role: str, action: str,
                      target: str, reason: str, outcome: str) -> bytes:
    """Chain hash of one audit record: SHA-256(prev || canonical JSON of its fields)."""
    body = json.dumps([seq, time_ns, actor, role, action, target, reason, outcome],
                      separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(prev + body).digest()


class Store(abc.ABC):
    """Storage for agents, evidence, commands, audit and responders."""

    # -- agents and enrollment ---------------------------------------------------------------
    @abc.abstractmethod
    def add_token(self, token_hash: bytes, created_ns: int, expires_ns: int, max_uses: int) -> None: ...

    @abc.abstractmethod
    def consume_token(self, token_hash: bytes, now_ns: int) -> None:
        """Use one enrollment of a token or raise TokenRejected."""

    @abc.abstractmethod
    def revoke_token(self, token_hash: bytes) -> None: ...

    @abc.abstractmethod
    def revoke_token_by_id(self, token_id: str) -> bytes:
        """Revoke the one token whose hash starts with the hex `token_id`; return its hash.
        Raise NotFound when none or more than one token matches."""

    @abc.abstractmethod
    def register_agent(self, agent: AgentRecord) -> None: ...

    @abc.abstractmethod
    def get_agent(self, agent_id: str) -> AgentRecord | None: ...

    @abc.abstractmethod
    def find_agent(self, host: str) -> AgentRecord:
        """An agent by id or hostname, or raise NotFound (ambiguous hostnames too)."""

    @abc.abstractmethod
    def list_agents(self) -> list[AgentRecord]: ...

    @abc.abstractmethod
    def agent_seen(self, agent_id: str, now_ns: int, version: str | None,
                   sensors: dict[str, str] | None) -> None: ...

    def agents_seen(self, seen: Mapping[str, int]) -> None:
        """Move `last_seen_ns` forward for many agents at once (agent id -> time); a time older
        than the stored one changes nothing. Backends override this with one transaction."""
        for agent_id, now_ns in seen.items():
            self.agent_seen(agent_id, now_ns, None, None)

    @abc.abstractmethod
    def set_isolation(self, agent_id: str, state: str, reason: str, now_ns: int) -> None: ...

    @abc.abstractmethod
    def revoke_agent(self, agent_id: str) -> None: ...

    # -- evidence -----------------------------------------------------------------------------
    @abc.abstractmethod
    def chain_state(self, agent_id: str) -> ChainState: ...

    @abc.abstractmethod
    def stored_event(self, agent_id: str, seq: int) -> EventRow | None: ...

    @abc.abstractmethod
    def commit_batch(self, events: Sequence[EventRow], forks: Sequence[EventRow],
                     checkpoints: Sequence[CheckpointRow],
                     alerts: Sequence[IntegrityAlertRow], chain: ChainState) -> None:
        """Write one verified batch atomically: all of it or, on StoreUnavailable, none."""

    @abc.abstractmethod
    def query_events(self, agent_id: str, since_ns: int = 0, until_ns: int = 0, kind: str = "",
                     limit: int = 1000, after_seq: int = 0) -> Iterator[EventRow]: ...

    @abc.abstractmethod
    def previous_event(self, agent_id: str, seq: int) -> EventRow | None:
        """The stored event with the highest seq below `seq`, if any."""

    @abc.abstractmethod
    def last_seq_in_range(self, agent_id: str, since_ns: int = 0, until_ns: int = 0) -> int:
        """Highest stored seq whose event time lies in the range (0 bounds are open)."""

    @abc.abstractmethod
    def events_by_seq(self, agent_id: str, first_seq: int, last_seq: int) -> Iterator[EventRow]: ...

    @abc.abstractmethod
    def checkpoints(self, agent_id: str, first_seq: int = 0,
                    last_seq: int = 2**63 - 1) -> list[CheckpointRow]: ...

    @abc.abstractmethod
    def add_alert(self, alert: IntegrityAlertRow) -> None: ...

    @abc.abstractmethod
    def alerts(self, agent_id: str | None = None) -> list[IntegrityAlertRow]: ...

    @abc.abstractmethod
    def alert_counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def forks(self, agent_id: str) -> list[EventRow]: ...

    # -- files ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_file(self, row: FileRow) -> None: ...

    @abc.abstractmethod
    def files_for(self, agent_id: str) -> list[FileRow]: ...

    # -- commands -------------------------------------------------------------------------------
    @abc.abstractmethod
    def next_command_seq(self, agent_id: str) -> int: ...

    @abc.abstractmethod
    def add_command(self, row: CommandRow) -> None: ...

    @abc.abstractmethod
    def update_command(self, command_id: str, status: str, message: str, detail_json: str,
                       now_ns: int) -> None: ...

    @abc.abstractmethod
    def get_command(self, command_id: str) -> CommandRow: ...

    @abc.abstractmethod
    def open_commands(self, agent_id: str, now_ns: int) -> list[CommandRow]:
        """Commands not yet answered and not expired, oldest first."""

    # -- responders and audit -------------------------------------------------------------------
    @abc.abstractmethod
    def add_responder(self, row: ResponderRow) -> None: ...

    @abc.abstractmethod
    def responder_by_fingerprint(self, fingerprint: str) -> ResponderRow | None: ...

    @abc.abstractmethod
    def responders(self) -> list[ResponderRow]:
        """Every responder identity, by name."""

    @abc.abstractmethod
    def append_audit(self, time_ns: int, actor: str, role: str, action: str, target: str,
                     reason: str, outcome: str) -> AuditRow: ...

    @abc.abstractmethod
    def audit_rows(self) -> list[AuditRow]: ...

    @abc.abstractmethod
    def audit_head(self) -> tuple[int, bytes] | None:
        """(seq, hash) of the last audit record as written alongside it, so deleting records
        from the end of the log is detected too; None when nothing was ever audited."""

    # -- collector nodes and session ownership --------------------------------------------------
    @abc.abstractmethod
    def node_heartbeat(self, node_id: str, now_ns: int) -> None:
        """Record that collector node `node_id` is alive now."""

    @abc.abstractmethod
    def claim_session(self, agent_id: str, node_id: str, now_ns: int) -> None:
        """Record that `node_id` holds the agent's live session (replacing any other owner)."""

    @abc.abstractmethod
    def release_session(self, agent_id: str, node_id: str) -> None:
        """Forget the agent's session if `node_id` still owns it (a newer owner is kept)."""

    @abc.abstractmethod
    def session_owners(self, alive_since_ns: int) -> dict[str, str]:
        """agent id -> node id for sessions whose node heartbeat is at or after
        `alive_since_ns`: the agents online anywhere in the cluster."""

    def listen(self, on_notify: Callable[[str, str], None], stop: threading.Event) -> bool:
        """Block until `stop`, calling `on_notify(channel, agent_id)` for every notification on
        COMMANDS_CHANNEL and REVOCATIONS_CHANNEL from any process sharing the store.

        Returns False at once when the backend has no cross-process notifications (SQLite:
        one collector process only, which delivers its own commands directly)."""
        return False

    @abc.abstractmethod
    def close(self) -> None: ...
