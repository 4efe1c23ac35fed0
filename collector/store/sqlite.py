"""The embedded SQLite (WAL) store: the zero-setup default under one data directory.

It implements `collector.store.base.Store` with plain SQL and one connection guarded by a lock;
it makes no integrity decisions (those are `collector.ingest`'s) and never re-encodes event
bytes: what the agent sent is what is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from collector.store._reads import EVENT_COLS, EvidenceReads, event_row
from collector.store.base import (
    GENESIS_AUDIT,
    AgentRecord,
    AuditRow,
    ChainState,
    CheckpointRow,
    CommandRow,
    Conflict,
    EventRow,
    FileRow,
    IntegrityAlertRow,
    NotFound,
    ResponderRow,
    Store,
    StoreUnavailable,
    TokenRejected,
    audit_record_hash,
)

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash BLOB PRIMARY KEY, created_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL,
    max_uses INTEGER NOT NULL, uses INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, hostname TEXT NOT NULL, os TEXT NOT NULL, kernel TEXT NOT NULL,
    machine_id TEXT NOT NULL, addresses TEXT NOT NULL, agent_version TEXT NOT NULL,
    identity_key BLOB NOT NULL, cert_fingerprint TEXT NOT NULL, enrolled_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0,
    sensors TEXT NOT NULL DEFAULT '{}', isolation_state TEXT NOT NULL DEFAULT 'none',
    isolation_changed_ns INTEGER NOT NULL DEFAULT 0, isolation_reason TEXT NOT NULL DEFAULT '',
    chain_seq INTEGER NOT NULL DEFAULT 0, chain_head BLOB NOT NULL DEFAULT x'');
CREATE INDEX IF NOT EXISTS agents_hostname ON agents(hostname);
CREATE TABLE IF NOT EXISTS events (
    agent_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ns INTEGER NOT NULL, kind TEXT NOT NULL,
    data BLOB NOT NULL, chain_hash BLOB NOT NULL, received_ns INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_time ON events(agent_id, time_ns);
CREATE TABLE IF NOT EXISTS event_forks (
    id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL, data BLOB NOT NULL, chain_hash BLOB NOT NULL, received_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    agent_id TEXT NOT NULL, seq INTEGER NOT NULL, head BLOB NOT NULL, time_ns INTEGER NOT NULL,
    envelope BLOB NOT NULL, PRIMARY KEY (agent_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS integrity_alerts (
    id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, kind TEXT NOT NULL, seq INTEGER NOT NULL,
    detail TEXT NOT NULL, time_ns INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS integrity_agent ON integrity_alerts(agent_id);
CREATE TABLE IF NOT EXISTS files (
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, agent_id TEXT NOT NULL, command_id TEXT NOT NULL,
    path BLOB NOT NULL, record_envelope BLOB NOT NULL, stored_ns INTEGER NOT NULL,
    PRIMARY KEY (agent_id, sha256, command_id));
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, seq INTEGER NOT NULL, action TEXT NOT NULL,
    envelope BLOB NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL, detail_json TEXT NOT NULL,
    issued_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL, updated_ns INTEGER NOT NULL,
    actor TEXT NOT NULL, reason TEXT NOT NULL, UNIQUE (agent_id, seq));
CREATE TABLE IF NOT EXISTS responders (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, cert_fingerprint TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, actor TEXT NOT NULL, role TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL, outcome TEXT NOT NULL,
    prev_hash BLOB NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, heartbeat_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    agent_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, connected_ns INTEGER NOT NULL);
"""

OPEN_STATUSES = ("pending", "sent", "accepted")


class SQLiteStore(EvidenceReads, Store):
    """SQLite in WAL mode; one connection, one lock, short transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # An Ack tells the agent it may delete its spooled copy, so a commit must survive power
        # loss before we acknowledge it: FULL syncs the WAL on every commit.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreUnavailable(f"cannot start a transaction on {self.path}: {e}") from e
            try:
                yield self._db
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise StoreUnavailable(f"write to {self.path} failed: {e}") from e
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise StoreUnavailable(f"commit to {self.path} failed: {e}") from e

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"read from {self.path} failed: {e}") from e

    # -- tokens ---------------------------------------------------------------------------------
    def add_token(self, token_hash: bytes, created_ns: int, expires_ns: int, max_uses: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO tokens (token_hash, created_ns, expires_ns, max_uses) "
                       "VALUES (?, ?, ?, ?)", (token_hash, created_ns, expires_ns, max_uses))

    def consume_token(self, token_hash: bytes, now_ns: int) -> None:
        with self._tx() as db:
            row = db.execute("SELECT expires_ns, max_uses, uses, revoked FROM tokens "
                             "WHERE token_hash = ?", (token_hash,)).fetchone()
            if row is None:
                raise TokenRejected("unknown token")
            expires_ns, max_uses, uses, revoked = row
            if revoked:
                raise TokenRejected("token revoked")
            if now_ns >= expires_ns:
                raise TokenRejected("token expired")
            if uses >= max_uses:
                raise TokenRejected("token used up")
            db.execute("UPDATE tokens SET uses = uses + 1 WHERE token_hash = ?", (token_hash,))

    def revoke_token(self, token_hash: bytes) -> None:
        with self._tx() as db:
            if db.execute("UPDATE tokens SET revoked = 1 WHERE token_hash = ?",
                          (token_hash,)).rowcount == 0:
                raise NotFound("no such token")

    def revoke_token_by_id(self, token_id: str) -> bytes:
        token_id = token_id.lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", token_id):
            raise NotFound("a token id is 8 to 64 hex digits (printed by `ringfence token create`)")
        with self._tx() as db:
            rows = db.execute("SELECT token_hash FROM tokens WHERE substr(hex(token_hash), 1, ?) "
                              "= ?", (len(token_id), token_id.upper())).fetchall()
            if len(rows) != 1:
                raise NotFound(f"{'no' if not rows else 'more than one'} token has id "
                               f"{token_id}; give more digits or the token itself")
            db.execute("UPDATE tokens SET revoked = 1 WHERE token_hash = ?", (rows[0][0],))
            return bytes(rows[0][0])

    # -- agents ---------------------------------------------------------------------------------
    def register_agent(self, agent: AgentRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO agents (agent_id, hostname, os, kernel, machine_id, addresses, "
                "agent_version, identity_key, cert_fingerprint, enrolled_ns, chain_head) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (agent.agent_id, agent.hostname, agent.os, agent.kernel, agent.machine_id,
                 json.dumps(list(agent.addresses)), agent.agent_version, agent.identity_key,
                 agent.cert_fingerprint, agent.enrolled_ns, b""),
            )

    _AGENT_COLS = ("agent_id, hostname, os, kernel, machine_id, addresses, agent_version, "
                   "identity_key, cert_fingerprint, enrolled_ns, last_seen_ns, revoked, sensors, "
                   "isolation_state, isolation_changed_ns, isolation_reason")

    @staticmethod
    def _agent(row: Sequence[Any]) -> AgentRecord:
        return AgentRecord(
            agent_id=row[0], hostname=row[1], os=row[2], kernel=row[3], machine_id=row[4],
            addresses=tuple(json.loads(row[5])), agent_version=row[6], identity_key=bytes(row[7]),
            cert_fingerprint=row[8], enrolled_ns=row[9], last_seen_ns=row[10],
            revoked=bool(row[11]), sensors=json.loads(row[12]), isolation_state=row[13],
            isolation_changed_ns=row[14], isolation_reason=row[15],
        )

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        rows = self._query(f"SELECT {self._AGENT_COLS} FROM agents WHERE agent_id = ?", (agent_id,))
        return self._agent(rows[0]) if rows else None

    def find_agent(self, host: str) -> AgentRecord:
        agent = self.get_agent(host)
        if agent is not None:
            return agent
        rows = self._query(f"SELECT {self._AGENT_COLS} FROM agents WHERE hostname = ? "
                           "ORDER BY enrolled_ns", (host,))
        if not rows:
            raise NotFound(f"no host named {host!r}: `ringfence hosts` lists the fleet")
        if len(rows) > 1:
            ids = ", ".join(r[0] for r in rows)
            raise NotFound(f"hostname {host!r} is ambiguous; use one of the agent ids: {ids}")
        return self._agent(rows[0])

    def list_agents(self) -> list[AgentRecord]:
        return [self._agent(r) for r in
                self._query(f"SELECT {self._AGENT_COLS} FROM agents ORDER BY hostname, agent_id")]

    def agent_seen(self, agent_id: str, now_ns: int, version: str | None,
                   sensors: dict[str, str] | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE agents SET last_seen_ns = ? WHERE agent_id = ?", (now_ns, agent_id))
            if version is not None:
                db.execute("UPDATE agents SET agent_version = ? WHERE agent_id = ?",
                           (version, agent_id))
            if sensors is not None:
                db.execute("UPDATE agents SET sensors = ? WHERE agent_id = ?",
                           (json.dumps(sensors, sort_keys=True), agent_id))

    def agents_seen(self, seen: Mapping[str, int]) -> None:
        if not seen:
            return
        with self._tx() as db:
            db.executemany("UPDATE agents SET last_seen_ns = ? WHERE agent_id = ? AND "
                           "last_seen_ns < ?", [(ns, a, ns) for a, ns in seen.items()])

    def set_isolation(self, agent_id: str, state: str, reason: str, now_ns: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE agents SET isolation_state = ?, isolation_reason = ?, "
                       "isolation_changed_ns = ? WHERE agent_id = ?",
                       (state, reason, now_ns, agent_id))

    def revoke_agent(self, agent_id: str) -> None:
        with self._tx() as db:
            if db.execute("UPDATE agents SET revoked = 1 WHERE agent_id = ?",
                          (agent_id,)).rowcount == 0:
                raise NotFound(f"no agent {agent_id!r}")

    # -- evidence -------------------------------------------------------------------------------
    def chain_state(self, agent_id: str) -> ChainState:
        rows = self._query("SELECT chain_seq, chain_head FROM agents WHERE agent_id = ?",
                           (agent_id,))
        if not rows:
            raise NotFound(f"no agent {agent_id!r}")
        return ChainState(rows[0][0], bytes(rows[0][1]))

    _event = staticmethod(event_row)
    _EVENT_COLS = EVENT_COLS
    _PLACEHOLDER = "?"

    def stored_event(self, agent_id: str, seq: int) -> EventRow | None:
        rows = self._query(f"SELECT {self._EVENT_COLS} FROM events WHERE agent_id = ? AND seq = ?",
                           (agent_id, seq))
        return self._event(rows[0]) if rows else None

    def commit_batch(self, events: Sequence[EventRow], forks: Sequence[EventRow],
                     checkpoints: Sequence[CheckpointRow],
                     alerts: Sequence[IntegrityAlertRow], chain: ChainState) -> None:
        if not (events or forks or checkpoints or alerts):
            return
        agent_ids = {r.agent_id for r in events} | {r.agent_id for r in checkpoints}
        with self._tx() as db:
            # EventRow is a NamedTuple in _EVENT_COLS order: bound without a copy per row.
            db.executemany(
                f"INSERT INTO events ({self._EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)", events)
            db.executemany(
                f"INSERT INTO event_forks ({self._EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.agent_id, r.seq, r.time_ns, r.kind, r.data, r.chain_hash, r.received_ns)
                 for r in forks])
            db.executemany(
                "INSERT OR IGNORE INTO checkpoints (agent_id, seq, head, time_ns, envelope) "
                "VALUES (?, ?, ?, ?, ?)",
                [(c.agent_id, c.seq, c.head, c.time_ns, c.envelope) for c in checkpoints])
            db.executemany(
                "INSERT INTO integrity_alerts (agent_id, kind, seq, detail, time_ns) "
                "VALUES (?, ?, ?, ?, ?)",
                [(a.agent_id, a.kind, a.seq, a.detail, a.time_ns) for a in alerts])
            for agent_id in agent_ids:
                db.execute("UPDATE agents SET chain_seq = ?, chain_head = ? WHERE agent_id = ?",
                           (chain.last_seq, chain.head, agent_id))

    def add_alert(self, alert: IntegrityAlertRow) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO integrity_alerts (agent_id, kind, seq, detail, time_ns) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (alert.agent_id, alert.kind, alert.seq, alert.detail, alert.time_ns))

    def forks(self, agent_id: str) -> list[EventRow]:
        return [self._event(r) for r in self._query(
            f"SELECT {self._EVENT_COLS} FROM event_forks WHERE agent_id = ? ORDER BY id",
            (agent_id,))]

    # -- files ----------------------------------------------------------------------------------
    def add_file(self, row: FileRow) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO files (sha256, size, agent_id, command_id, path, "
                       "record_envelope, stored_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (row.sha256, row.size, row.agent_id, row.command_id, row.path,
                        row.record_envelope, row.stored_ns))

    def files_for(self, agent_id: str) -> list[FileRow]:
        return [FileRow(r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), r[6]) for r in
                self._query("SELECT sha256, size, agent_id, command_id, path, record_envelope, "
                            "stored_ns FROM files WHERE agent_id = ? ORDER BY stored_ns",
                            (agent_id,))]

    # -- commands -------------------------------------------------------------------------------
    def next_command_seq(self, agent_id: str) -> int:
        rows = self._query("SELECT COALESCE(MAX(seq), 0) FROM commands WHERE agent_id = ?",
                           (agent_id,))
        return int(rows[0][0]) + 1

    _COMMAND_COLS = ("command_id, agent_id, seq, action, envelope, status, message, detail_json, "
                     "issued_ns, expires_ns, updated_ns, actor, reason")

    @staticmethod
    def _command(r: Sequence[Any]) -> CommandRow:
        return CommandRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7], r[8], r[9],
                          r[10], r[11], r[12])

    def add_command(self, row: CommandRow) -> None:
        try:
            with self._tx() as db:
                db.execute(f"INSERT INTO commands ({self._COMMAND_COLS}) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (row.command_id, row.agent_id, row.seq, row.action, row.envelope,
                            row.status, row.message, row.detail_json, row.issued_ns,
                            row.expires_ns, row.updated_ns, row.actor, row.reason))
        except StoreUnavailable as e:
            if isinstance(e.__cause__, sqlite3.IntegrityError):
                raise Conflict(f"command seq {row.seq} of agent {row.agent_id} is taken") from e
            raise

    def update_command(self, command_id: str, status: str, message: str, detail_json: str,
                       now_ns: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE commands SET status = ?, message = ?, detail_json = ?, "
                       "updated_ns = ? WHERE command_id = ?",
                       (status, message, detail_json, now_ns, command_id))

    def get_command(self, command_id: str) -> CommandRow:
        rows = self._query(f"SELECT {self._COMMAND_COLS} FROM commands WHERE command_id = ?",
                           (command_id,))
        if not rows:
            raise NotFound(f"no command {command_id!r}")
        return self._command(rows[0])

    def open_commands(self, agent_id: str, now_ns: int) -> list[CommandRow]:
        rows = self._query(
            f"SELECT {self._COMMAND_COLS} FROM commands WHERE agent_id = ? AND status IN "
            f"({','.join('?' * len(OPEN_STATUSES))}) AND expires_ns > ? ORDER BY seq",
            (agent_id, *OPEN_STATUSES, now_ns))
        return [self._command(r) for r in rows]

    # -- responders and audit -------------------------------------------------------------------
    def add_responder(self, row: ResponderRow) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO responders (name, role, cert_fingerprint, created_ns, revoked) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (row.name, row.role, row.cert_fingerprint, row.created_ns, int(row.revoked)))

    def responder_by_fingerprint(self, fingerprint: str) -> ResponderRow | None:
        rows = self._query("SELECT name, role, cert_fingerprint, created_ns, revoked FROM "
                           "responders WHERE cert_fingerprint = ?", (fingerprint,))
        if not rows:
            return None
        r = rows[0]
        return ResponderRow(r[0], r[1], r[2], r[3], bool(r[4]))

    def responders(self) -> list[ResponderRow]:
        return [ResponderRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in self._query(
            "SELECT name, role, cert_fingerprint, created_ns, revoked FROM responders "
            "ORDER BY name")]

    def append_audit(self, time_ns: int, actor: str, role: str, action: str, target: str,
                     reason: str, outcome: str) -> AuditRow:
        with self._tx() as db:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, bytes(last[1])) if last else (1, GENESIS_AUDIT)
            digest = audit_record_hash(prev, seq, time_ns, actor, role, action, target, reason,
                                       outcome)
            db.execute("INSERT INTO audit (seq, time_ns, actor, role, action, target, reason, "
                       "outcome, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (seq, time_ns, actor, role, action, target, reason, outcome, prev, digest))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_head', ?)",
                       (f"{seq}:{digest.hex()}",))
        return AuditRow(seq, time_ns, actor, role, action, target, reason, outcome, prev, digest)

    def audit_rows(self) -> list[AuditRow]:
        return [AuditRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]), bytes(r[9]))
                for r in self._query("SELECT seq, time_ns, actor, role, action, target, reason, "
                                     "outcome, prev_hash, hash FROM audit ORDER BY seq")]

    def audit_head(self) -> tuple[int, bytes] | None:
        rows = self._query("SELECT value FROM meta WHERE key = 'audit_head'")
        if not rows:
            return None
        seq, _, digest = str(rows[0][0]).partition(":")
        try:
            return int(seq), bytes.fromhex(digest)
        except ValueError:
            return -1, b""

    # -- collector nodes and session ownership --------------------------------------------------
    def node_heartbeat(self, node_id: str, now_ns: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO nodes (node_id, heartbeat_ns) VALUES (?, ?) ON CONFLICT "
                       "(node_id) DO UPDATE SET heartbeat_ns = excluded.heartbeat_ns",
                       (node_id, now_ns))

    def claim_session(self, agent_id: str, node_id: str, now_ns: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO sessions (agent_id, node_id, connected_ns) "
                       "VALUES (?, ?, ?)", (agent_id, node_id, now_ns))

    def release_session(self, agent_id: str, node_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE agent_id = ? AND node_id = ?",
                       (agent_id, node_id))

    def session_owners(self, alive_since_ns: int) -> dict[str, str]:
        return {r[0]: r[1] for r in self._query(
            "SELECT s.agent_id, s.node_id FROM sessions s JOIN nodes n USING (node_id) "
            "WHERE n.heartbeat_ns >= ?", (alive_since_ns,))}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def token_digest(token: str) -> bytes:
    """How tokens are stored: only their SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).digest()
