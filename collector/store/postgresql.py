"""The PostgreSQL store: the scale-out backend that several collector nodes share.

It implements `collector.store.base.Store` with the same semantics as the SQLite store
(exactly-once events by (agent_id, seq), atomic batches, one audit chain) but safe across
processes: per-agent chain updates take a row lock, the audit chain an advisory lock, command
sequence numbers a unique constraint (a lost race raises `Conflict` for the caller to retry),
and stored commands and revocations are announced with NOTIFY so the node holding the agent's
session delivers them. The schema is versioned (table `ringfence_schema`) and changed only by
`migrate()` (`ringfence server migrate --store URL`). It makes no integrity decisions and
never re-encodes event bytes. psycopg errors never leave this module: they become
`StoreUnavailable` (or `Conflict`).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors

from collector.store._reads import EVENT_COLS, EvidenceReads, event_row
from collector.store.base import (
    COMMANDS_CHANNEL,
    GENESIS_AUDIT,
    REVOCATIONS_CHANNEL,
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

# (version, description, SQL). Append only: a released migration never changes.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "core schema", """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens (
    token_hash BYTEA PRIMARY KEY, created_ns BIGINT NOT NULL, expires_ns BIGINT NOT NULL,
    max_uses BIGINT NOT NULL, uses BIGINT NOT NULL DEFAULT 0,
    revoked BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY, hostname TEXT NOT NULL, os TEXT NOT NULL, kernel TEXT NOT NULL,
    machine_id TEXT NOT NULL, addresses TEXT NOT NULL, agent_version TEXT NOT NULL,
    identity_key BYTEA NOT NULL, cert_fingerprint TEXT NOT NULL, enrolled_ns BIGINT NOT NULL,
    last_seen_ns BIGINT NOT NULL DEFAULT 0, revoked BOOLEAN NOT NULL DEFAULT FALSE,
    sensors TEXT NOT NULL DEFAULT '{}', isolation_state TEXT NOT NULL DEFAULT 'none',
    isolation_changed_ns BIGINT NOT NULL DEFAULT 0, isolation_reason TEXT NOT NULL DEFAULT '',
    chain_seq BIGINT NOT NULL DEFAULT 0, chain_head BYTEA NOT NULL DEFAULT '\\x');
CREATE INDEX agents_hostname ON agents (hostname);
CREATE TABLE events (
    agent_id TEXT NOT NULL, seq BIGINT NOT NULL, time_ns BIGINT NOT NULL, kind TEXT NOT NULL,
    data BYTEA NOT NULL, chain_hash BYTEA NOT NULL, received_ns BIGINT NOT NULL,
    PRIMARY KEY (agent_id, seq));
CREATE INDEX events_time ON events (agent_id, time_ns);
CREATE TABLE event_forks (
    id BIGSERIAL PRIMARY KEY, agent_id TEXT NOT NULL, seq BIGINT NOT NULL,
    time_ns BIGINT NOT NULL, kind TEXT NOT NULL, data BYTEA NOT NULL, chain_hash BYTEA NOT NULL,
    received_ns BIGINT NOT NULL);
CREATE INDEX event_forks_agent ON event_forks (agent_id);
CREATE TABLE checkpoints (
    agent_id TEXT NOT NULL, seq BIGINT NOT NULL, head BYTEA NOT NULL, time_ns BIGINT NOT NULL,
    envelope BYTEA NOT NULL, PRIMARY KEY (agent_id, seq));
CREATE TABLE integrity_alerts (
    id BIGSERIAL PRIMARY KEY, agent_id TEXT NOT NULL, kind TEXT NOT NULL, seq BIGINT NOT NULL,
    detail TEXT NOT NULL, time_ns BIGINT NOT NULL);
CREATE INDEX integrity_agent ON integrity_alerts (agent_id);
CREATE TABLE files (
    sha256 TEXT NOT NULL, size BIGINT NOT NULL, agent_id TEXT NOT NULL,
    command_id TEXT NOT NULL, path BYTEA NOT NULL, record_envelope BYTEA NOT NULL,
    stored_ns BIGINT NOT NULL, PRIMARY KEY (agent_id, sha256, command_id));
CREATE TABLE commands (
    command_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, seq BIGINT NOT NULL,
    action TEXT NOT NULL, envelope BYTEA NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL,
    detail_json TEXT NOT NULL, issued_ns BIGINT NOT NULL, expires_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL,
    UNIQUE (agent_id, seq));
CREATE TABLE responders (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, cert_fingerprint TEXT NOT NULL UNIQUE,
    created_ns BIGINT NOT NULL, revoked BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY, time_ns BIGINT NOT NULL, actor TEXT NOT NULL, role TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL, outcome TEXT NOT NULL,
    prev_hash BYTEA NOT NULL, hash BYTEA NOT NULL);
"""),
    (2, "collector nodes and session ownership", """
CREATE TABLE nodes (node_id TEXT PRIMARY KEY, heartbeat_ns BIGINT NOT NULL);
CREATE TABLE sessions (
    agent_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, connected_ns BIGINT NOT NULL);
CREATE INDEX sessions_node ON sessions (node_id);
"""),
)
LATEST_VERSION = MIGRATIONS[-1][0]

OPEN_STATUSES = ("pending", "sent", "accepted")
# Arbitrary constants naming ringfence's advisory locks (pg_advisory_xact_lock keys).
AUDIT_LOCK = 0x52460001
MIGRATE_LOCK = 0x52460002
POOL_WAIT_S = 30.0
CONNECT_TIMEOUT_S = 5
LISTEN_POLL_S = 0.5
LISTEN_RETRY_MAX_S = 5.0


def is_postgresql_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unparseable)"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _describe(e: psycopg.Error) -> str:
    # The primary message only: DETAIL lines may quote row values (never evidence bytes in our
    # schema's keys, but keep logs small and predictable).
    primary = e.diag.message_primary if e.diag is not None else None
    if not primary:
        lines = str(e).splitlines()
        primary = lines[0] if lines else "no detail"
    return f"{type(e).__name__}: {primary}"


class _Pool:
    """A small bounded pool of autocommit connections; a broken connection is discarded."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as e:
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {redact(self._dsn)}: "
                                   f"{_describe(e)}") from e

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        if not self._slots.acquire(timeout=POOL_WAIT_S):
            raise StoreUnavailable(f"no PostgreSQL connection free within {POOL_WAIT_S} s")
        conn: psycopg.Connection[Any] | None = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self.connect()
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError):
            if conn is not None:
                conn.close()
                conn = None
            raise
        finally:
            if conn is not None:
                idle = psycopg.pq.TransactionStatus.IDLE
                if conn.closed or self._closed or conn.info.transaction_status != idle:
                    conn.close()
                else:
                    self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class PostgreSQLStore(EvidenceReads, Store):
    """PostgreSQL through a pool of psycopg 3 connections; short transactions."""

    def __init__(self, dsn: str, pool_size: int = 8, migrate: bool = False) -> None:
        self.dsn = dsn
        self.url = redact(dsn)
        self._pool = _Pool(dsn, pool_size)
        # Versions this constructor applied (with migrate=True), for the caller to report.
        self.applied: list[int] = self.migrate() if migrate else []
        version = self.schema_version()
        if version < LATEST_VERSION:
            self._pool.close()
            raise StoreUnavailable(
                f"the PostgreSQL schema at {self.url} is at version {version}, this ringfence "
                f"needs {LATEST_VERSION}: run `ringfence server migrate --store URL`")
        if version > LATEST_VERSION:
            self._pool.close()
            raise StoreUnavailable(
                f"the PostgreSQL schema at {self.url} is at version {version}, newer than this "
                f"ringfence knows ({LATEST_VERSION}): upgrade ringfence on this node")

    # -- plumbing -------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor[Any]]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except pg_errors.IntegrityError as e:
            raise Conflict(f"write to {self.url} conflicted: {_describe(e)}") from e
        except psycopg.Error as e:
            raise StoreUnavailable(f"write to {self.url} failed: {_describe(e)}") from e

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(sql, args).fetchall()
        except psycopg.Error as e:
            raise StoreUnavailable(f"read from {self.url} failed: {_describe(e)}") from e

    # -- schema ---------------------------------------------------------------------------------
    def schema_version(self) -> int:
        rows = self._query("SELECT to_regclass('ringfence_schema') IS NOT NULL")
        if not rows[0][0]:
            return 0
        return int(self._query("SELECT COALESCE(MAX(version), 0) FROM ringfence_schema")[0][0])

    def migrate(self) -> list[int]:
        """Apply every migration not yet applied, in one transaction; return their versions.

        An advisory lock makes concurrent `migrate` runs (two nodes starting) wait for each
        other instead of applying the same migration twice."""
        applied: list[int] = []
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS ringfence_schema (version INTEGER PRIMARY "
                        "KEY, description TEXT NOT NULL, applied_ns BIGINT NOT NULL)")
            done = {r[0] for r in cur.execute("SELECT version FROM ringfence_schema")}
            for version, description, sql in MIGRATIONS:
                if version in done:
                    continue
                cur.execute(sql.encode())
                cur.execute("INSERT INTO ringfence_schema (version, description, applied_ns) "
                            "VALUES (%s, %s, %s)", (version, description, time.time_ns()))
                applied.append(version)
        if applied:
            logger.info("migrated the PostgreSQL schema at %s: applied %s", self.url, applied)
        return applied

    # -- tokens ---------------------------------------------------------------------------------
    def add_token(self, token_hash: bytes, created_ns: int, expires_ns: int, max_uses: int) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO tokens (token_hash, created_ns, expires_ns, max_uses) "
                        "VALUES (%s, %s, %s, %s)", (token_hash, created_ns, expires_ns, max_uses))

    def consume_token(self, token_hash: bytes, now_ns: int) -> None:
        with self._tx() as cur:
            row = cur.execute("SELECT expires_ns, max_uses, uses, revoked FROM tokens "
                              "WHERE token_hash = %s FOR UPDATE", (token_hash,)).fetchone()
            if row is None:
                raise TokenRejected("unknown token")
            expires_ns, max_uses, uses, revoked = row
            if revoked:
                raise TokenRejected("token revoked")
            if now_ns >= expires_ns:
                raise TokenRejected("token expired")
            if uses >= max_uses:
                raise TokenRejected("token used up")
            cur.execute("UPDATE tokens SET uses = uses + 1 WHERE token_hash = %s", (token_hash,))

    def revoke_token(self, token_hash: bytes) -> None:
        with self._tx() as cur:
            if cur.execute("UPDATE tokens SET revoked = TRUE WHERE token_hash = %s",
                           (token_hash,)).rowcount == 0:
                raise NotFound("no such token")

    def revoke_token_by_id(self, token_id: str) -> bytes:
        token_id = token_id.lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", token_id):
            raise NotFound("a token id is 8 to 64 hex digits (printed by `ringfence token create`)")
        with self._tx() as cur:
            # token_id is validated hex above, so it carries no LIKE wildcards.
            rows = cur.execute("SELECT token_hash FROM tokens WHERE encode(token_hash, 'hex') "
                               "LIKE %s", (token_id + "%",)).fetchall()
            if len(rows) != 1:
                raise NotFound(f"{'no' if not rows else 'more than one'} token has id "
                               f"{token_id}; give more digits or the token itself")
            cur.execute("UPDATE tokens SET revoked = TRUE WHERE token_hash = %s", (rows[0][0],))
            return bytes(rows[0][0])

    # -- agents ---------------------------------------------------------------------------------
    def register_agent(self, agent: AgentRecord) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO agents (agent_id, hostname, os, kernel, machine_id, addresses, "
                "agent_version, identity_key, cert_fingerprint, enrolled_ns, chain_head) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (agent.agent_id, agent.hostname, agent.os, agent.kernel, agent.machine_id,
                 json.dumps(list(agent.addresses)), agent.agent_version, agent.identity_key,
                 agent.cert_fingerprint, agent.enrolled_ns, b""))

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
            isolation_changed_ns=row[14], isolation_reason=row[15])

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        rows = self._query(f"SELECT {self._AGENT_COLS} FROM agents WHERE agent_id = %s",
                           (agent_id,))
        return self._agent(rows[0]) if rows else None

    def find_agent(self, host: str) -> AgentRecord:
        agent = self.get_agent(host)
        if agent is not None:
            return agent
        rows = self._query(f"SELECT {self._AGENT_COLS} FROM agents WHERE hostname = %s "
                           "ORDER BY enrolled_ns", (host,))
        if not rows:
            raise NotFound(f"no host named {host!r}: `ringfence hosts` lists the fleet")
        if len(rows) > 1:
            ids = ", ".join(r[0] for r in rows)
            raise NotFound(f"hostname {host!r} is ambiguous; use one of the agent ids: {ids}")
        return self._agent(rows[0])

    def list_agents(self) -> list[AgentRecord]:
        # Byte order, as SQLite sorts, whatever the database's collation.
        return [self._agent(r) for r in self._query(
            f"SELECT {self._AGENT_COLS} FROM agents ORDER BY hostname COLLATE \"C\", "
            "agent_id COLLATE \"C\"")]

    def agent_seen(self, agent_id: str, now_ns: int, version: str | None,
                   sensors: dict[str, str] | None) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE agents SET last_seen_ns = %s, "
                        "agent_version = COALESCE(%s, agent_version), "
                        "sensors = COALESCE(%s, sensors) WHERE agent_id = %s",
                        (now_ns, version,
                         None if sensors is None else json.dumps(sensors, sort_keys=True),
                         agent_id))

    def agents_seen(self, seen: Mapping[str, int]) -> None:
        if not seen:
            return
        with self._tx() as cur:
            # Sorted ids keep the row-lock order fixed against concurrent ingest.
            cur.executemany("UPDATE agents SET last_seen_ns = %s WHERE agent_id = %s AND "
                            "last_seen_ns < %s", [(seen[a], a, seen[a]) for a in sorted(seen)])

    def set_isolation(self, agent_id: str, state: str, reason: str, now_ns: int) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE agents SET isolation_state = %s, isolation_reason = %s, "
                        "isolation_changed_ns = %s WHERE agent_id = %s",
                        (state, reason, now_ns, agent_id))

    def revoke_agent(self, agent_id: str) -> None:
        with self._tx() as cur:
            if cur.execute("UPDATE agents SET revoked = TRUE WHERE agent_id = %s",
                           (agent_id,)).rowcount == 0:
                raise NotFound(f"no agent {agent_id!r}")
            # Delivered at commit to every node: the one holding the session closes it.
            cur.execute("SELECT pg_notify(%s, %s)", (REVOCATIONS_CHANNEL, agent_id))

    # -- evidence -------------------------------------------------------------------------------
    def chain_state(self, agent_id: str) -> ChainState:
        rows = self._query("SELECT chain_seq, chain_head FROM agents WHERE agent_id = %s",
                           (agent_id,))
        if not rows:
            raise NotFound(f"no agent {agent_id!r}")
        return ChainState(rows[0][0], bytes(rows[0][1]))

    _event = staticmethod(event_row)
    _EVENT_COLS = EVENT_COLS
    _PLACEHOLDER = "%s"
    _EVENT_TYPES = ("text", "int8", "int8", "text", "bytea", "bytea", "int8")

    def stored_event(self, agent_id: str, seq: int) -> EventRow | None:
        rows = self._query(f"SELECT {self._EVENT_COLS} FROM events WHERE agent_id = %s AND "
                           "seq = %s", (agent_id, seq))
        return self._event(rows[0]) if rows else None

    def commit_batch(self, events: Sequence[EventRow], forks: Sequence[EventRow],
                     checkpoints: Sequence[CheckpointRow],
                     alerts: Sequence[IntegrityAlertRow], chain: ChainState) -> None:
        if not (events or forks or checkpoints or alerts):
            return
        first_new: dict[str, int] = {}
        for r in events:
            first_new.setdefault(r.agent_id, r.seq)
        with self._tx() as cur:
            # The chain moves only with new events. Updating it first takes the agent's row
            # lock, which serializes ingest of one agent across collector nodes (sorted ids
            # keep lock order fixed), and its WHERE re-checks the newest row version: a node
            # that verified against a chain state another node has since moved past updates
            # nothing and gets Conflict (retryable), never a second copy of a seq. The whole
            # transaction, this update included, commits or rolls back as one.
            for agent_id in sorted(first_new):
                floor = first_new[agent_id]
                if cur.execute("UPDATE agents SET chain_seq = %s, chain_head = %s WHERE "
                               "agent_id = %s AND chain_seq < %s",
                               (chain.last_seq, chain.head, agent_id, floor)).rowcount == 1:
                    continue
                row = cur.execute("SELECT chain_seq FROM agents WHERE agent_id = %s",
                                  (agent_id,)).fetchone()
                if row is None:
                    raise NotFound(f"no agent {agent_id!r}")
                raise Conflict(f"events of agent {agent_id} from seq {floor} were verified "
                               f"against a stale chain (stored up to seq {row[0]}): another "
                               "node ingested them first")
            if events:
                with cur.copy(f"COPY events ({self._EVENT_COLS}) FROM STDIN "
                              "(FORMAT BINARY)") as copy:
                    copy.set_types(self._EVENT_TYPES)
                    for r in events:
                        copy.write_row(r)
            if forks:
                cur.executemany(f"INSERT INTO event_forks ({self._EVENT_COLS}) VALUES "
                                "(%s, %s, %s, %s, %s, %s, %s)", list(forks))
            if checkpoints:
                cur.executemany(
                    "INSERT INTO checkpoints (agent_id, seq, head, time_ns, envelope) VALUES "
                    "(%s, %s, %s, %s, %s) ON CONFLICT (agent_id, seq) DO NOTHING",
                    [(c.agent_id, c.seq, c.head, c.time_ns, c.envelope) for c in checkpoints])
            if alerts:
                cur.executemany(
                    "INSERT INTO integrity_alerts (agent_id, kind, seq, detail, time_ns) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [(a.agent_id, a.kind, a.seq, a.detail, a.time_ns) for a in alerts])

    def add_alert(self, alert: IntegrityAlertRow) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO integrity_alerts (agent_id, kind, seq, detail, time_ns) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        (alert.agent_id, alert.kind, alert.seq, alert.detail, alert.time_ns))

    def forks(self, agent_id: str) -> list[EventRow]:
        return [self._event(r) for r in self._query(
            f"SELECT {self._EVENT_COLS} FROM event_forks WHERE agent_id = %s ORDER BY id",
            (agent_id,))]

    # -- files ----------------------------------------------------------------------------------
    def add_file(self, row: FileRow) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO files (sha256, size, agent_id, command_id, path, record_envelope, "
                "stored_ns) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (agent_id, sha256, "
                "command_id) DO UPDATE SET size = excluded.size, path = excluded.path, "
                "record_envelope = excluded.record_envelope, stored_ns = excluded.stored_ns",
                (row.sha256, row.size, row.agent_id, row.command_id, row.path,
                 row.record_envelope, row.stored_ns))

    def files_for(self, agent_id: str) -> list[FileRow]:
        return [FileRow(r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), r[6]) for r in
                self._query("SELECT sha256, size, agent_id, command_id, path, record_envelope, "
                            "stored_ns FROM files WHERE agent_id = %s ORDER BY stored_ns",
                            (agent_id,))]

    # -- commands -------------------------------------------------------------------------------
    def next_command_seq(self, agent_id: str) -> int:
        rows = self._query("SELECT COALESCE(MAX(seq), 0) FROM commands WHERE agent_id = %s",
                           (agent_id,))
        return int(rows[0][0]) + 1

    _COMMAND_COLS = ("command_id, agent_id, seq, action, envelope, status, message, detail_json, "
                     "issued_ns, expires_ns, updated_ns, actor, reason")

    @staticmethod
    def _command(r: Sequence[Any]) -> CommandRow:
        return CommandRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7], r[8], r[9],
                          r[10], r[11], r[12])

    def add_command(self, row: CommandRow) -> None:
        """Store a command and announce it (NOTIFY at commit) to every collector node; a seq
        another node took first raises Conflict: re-sign with the next seq and retry."""
        with self._tx() as cur:
            cur.execute(f"INSERT INTO commands ({self._COMMAND_COLS}) VALUES "
                        "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (row.command_id, row.agent_id, row.seq, row.action, row.envelope,
                         row.status, row.message, row.detail_json, row.issued_ns,
                         row.expires_ns, row.updated_ns, row.actor, row.reason))
            cur.execute("SELECT pg_notify(%s, %s)", (COMMANDS_CHANNEL, row.agent_id))

    def update_command(self, command_id: str, status: str, message: str, detail_json: str,
                       now_ns: int) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE commands SET status = %s, message = %s, detail_json = %s, "
                        "updated_ns = %s WHERE command_id = %s",
                        (status, message, detail_json, now_ns, command_id))

    def get_command(self, command_id: str) -> CommandRow:
        rows = self._query(f"SELECT {self._COMMAND_COLS} FROM commands WHERE command_id = %s",
                           (command_id,))
        if not rows:
            raise NotFound(f"no command {command_id!r}")
        return self._command(rows[0])

    def open_commands(self, agent_id: str, now_ns: int) -> list[CommandRow]:
        rows = self._query(
            f"SELECT {self._COMMAND_COLS} FROM commands WHERE agent_id = %s AND "
            "status = ANY(%s) AND expires_ns > %s ORDER BY seq",
            (agent_id, list(OPEN_STATUSES), now_ns))
        return [self._command(r) for r in rows]

    # -- responders and audit -------------------------------------------------------------------
    def add_responder(self, row: ResponderRow) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO responders (name, role, cert_fingerprint, created_ns, "
                        "revoked) VALUES (%s, %s, %s, %s, %s)",
                        (row.name, row.role, row.cert_fingerprint, row.created_ns, row.revoked))

    def responder_by_fingerprint(self, fingerprint: str) -> ResponderRow | None:
        rows = self._query("SELECT name, role, cert_fingerprint, created_ns, revoked FROM "
                           "responders WHERE cert_fingerprint = %s", (fingerprint,))
        if not rows:
            return None
        r = rows[0]
        return ResponderRow(r[0], r[1], r[2], r[3], bool(r[4]))

    def responders(self) -> list[ResponderRow]:
        return [ResponderRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in self._query(
            "SELECT name, role, cert_fingerprint, created_ns, revoked FROM responders "
            "ORDER BY name COLLATE \"C\"")]

    def append_audit(self, time_ns: int, actor: str, role: str, action: str, target: str,
                     reason: str, outcome: str) -> AuditRow:
        with self._tx() as cur:
            # One writer at a time across all nodes, so the chain never forks.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
            last = cur.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, bytes(last[1])) if last else (1, GENESIS_AUDIT)
            digest = audit_record_hash(prev, seq, time_ns, actor, role, action, target, reason,
                                       outcome)
            cur.execute("INSERT INTO audit (seq, time_ns, actor, role, action, target, reason, "
                        "outcome, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, "
                        "%s)", (seq, time_ns, actor, role, action, target, reason, outcome, prev,
                                digest))
            cur.execute("INSERT INTO meta (key, value) VALUES ('audit_head', %s) ON CONFLICT "
                        "(key) DO UPDATE SET value = excluded.value", (f"{seq}:{digest.hex()}",))
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
        with self._tx() as cur:
            cur.execute("INSERT INTO nodes (node_id, heartbeat_ns) VALUES (%s, %s) ON CONFLICT "
                        "(node_id) DO UPDATE SET heartbeat_ns = excluded.heartbeat_ns",
                        (node_id, now_ns))

    def claim_session(self, agent_id: str, node_id: str, now_ns: int) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO sessions (agent_id, node_id, connected_ns) VALUES "
                        "(%s, %s, %s) ON CONFLICT (agent_id) DO UPDATE SET node_id = "
                        "excluded.node_id, connected_ns = excluded.connected_ns",
                        (agent_id, node_id, now_ns))

    def release_session(self, agent_id: str, node_id: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM sessions WHERE agent_id = %s AND node_id = %s",
                        (agent_id, node_id))

    def session_owners(self, alive_since_ns: int) -> dict[str, str]:
        return {r[0]: r[1] for r in self._query(
            "SELECT s.agent_id, s.node_id FROM sessions s JOIN nodes n USING (node_id) "
            "WHERE n.heartbeat_ns >= %s", (alive_since_ns,))}

    def listen(self, on_notify: Callable[[str, str], None], stop: threading.Event) -> bool:
        """LISTEN on a dedicated connection until `stop`. After every (re)connect it calls
        `on_notify(COMMANDS_CHANNEL, "")`: notifications may have been missed while the
        connection was down, so the caller re-checks every session it holds."""
        delay = 0.5
        while not stop.is_set():
            try:
                with self._pool.connect() as conn:
                    conn.execute(f"LISTEN {COMMANDS_CHANNEL}")
                    conn.execute(f"LISTEN {REVOCATIONS_CHANNEL}")
                    delay = 0.5
                    self._dispatch(on_notify, COMMANDS_CHANNEL, "")
                    while not stop.is_set():
                        for note in conn.notifies(timeout=LISTEN_POLL_S):
                            self._dispatch(on_notify, note.channel, note.payload)
                            if stop.is_set():
                                break
            except (StoreUnavailable, psycopg.Error) as e:
                logger.warning("LISTEN connection to %s lost (%s); retrying in %.1f s",
                               self.url, e if isinstance(e, StoreUnavailable) else
                               _describe(e), delay)
                stop.wait(delay)
                delay = min(delay * 2, LISTEN_RETRY_MAX_S)
        return True

    @staticmethod
    def _dispatch(on_notify: Callable[[str, str], None], channel: str, payload: str) -> None:
        try:
            on_notify(channel, payload)
        except Exception:
            # One failing delivery must not stop this node from hearing the next ones.
            logger.exception("handling a %s notification failed", channel)

    def close(self) -> None:
        self._pool.close()
