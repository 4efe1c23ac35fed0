"""Where detection keeps its own records: alerts and their hash-chained log, baseline state,
evaluation cursors, queue overflows, custom and disabled rules.

`DetectionStore` is the small interface; `SQLiteDetectionStore` keeps it in its own database
file next to the evidence database (DATA/detection.sqlite), so detection writes never contend
with ingest for the evidence database's write lock. Evidence itself is never touched here.
Two processes write it: the server (status changes, state, rules) and the detection
evaluator process (alerts); every write is one transaction that reads the alert log head
inside it, so the chain stays linear.
"""

from __future__ import annotations

import abc
import functools
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.detection import AlertNotFound, DetectionStoreError, InvalidTransition
from server.detection.records import (
    GENESIS,
    MAX_EVENT_REFS,
    SEVERITIES,
    Alert,
    AlertLogRow,
    BaselineRow,
    CustomRule,
    EventRef,
    NewAlert,
    StoredAlerts,
    log_hash,
    raised_body,
    repeated_body,
    severity_rank,
    status_body,
)

# Allowed status changes: an alert is acknowledged, then closed; closing needs a reason.
TRANSITIONS = {("new", "acknowledged"), ("new", "closed"), ("acknowledged", "closed")}


class DetectionStore(abc.ABC):
    """Storage for detection. Implementations make each method one transaction."""

    # -- alerts ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def raise_alerts(self, alerts: Sequence[NewAlert], now_ns: int,
                     dedup_window_ns: int) -> StoredAlerts:
        """Store each alert, or fold it into the open alert with the same dedup key updated
        within the window (count + 1, event link kept while there is room). All repeats of
        one alert in a call are one log record with their count and events."""

    @abc.abstractmethod
    def list_alerts(self, agent_id: str = "", min_severity: str = "", status: str = "",
                    after_id: int = 0, limit: int = 1000) -> list[Alert]: ...

    @abc.abstractmethod
    def get_alert(self, alert_id: int) -> Alert: ...

    @abc.abstractmethod
    def set_status(self, alert_id: int, status: str, reason: str, actor: str,
                   now_ns: int) -> Alert: ...

    @abc.abstractmethod
    def open_alert_counts(self) -> dict[str, int]:
        """agent id -> alerts not closed."""

    @abc.abstractmethod
    def alert_log(self) -> list[AlertLogRow]: ...

    @abc.abstractmethod
    def alert_head(self) -> tuple[int, bytes] | None: ...

    # -- baselines and cursors ------------------------------------------------------------------
    @abc.abstractmethod
    def baselines(self) -> list[BaselineRow]: ...

    @abc.abstractmethod
    def save_state(self, rows: Sequence[BaselineRow], cursors: dict[str, int]) -> None:
        """Upsert baseline rows and evaluation cursors (agent id -> last evaluated seq)."""

    @abc.abstractmethod
    def cursors(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def record_overflow(self, agent_id: str, first_seq: int, last_seq: int,
                        time_ns: int) -> None: ...

    @abc.abstractmethod
    def overflows(self) -> list[tuple[str, int, int, int]]: ...

    # -- rules ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_rule(self, rule: CustomRule) -> None: ...

    @abc.abstractmethod
    def custom_rules(self) -> list[CustomRule]: ...

    @abc.abstractmethod
    def set_rule_disabled(self, rule_id: str, disabled: bool, actor: str, now_ns: int) -> None: ...

    @abc.abstractmethod
    def disabled_rules(self) -> set[str]: ...

    @abc.abstractmethod
    def rules_version(self) -> int:
        """A number that changes whenever rules are added, enabled or disabled."""

    @abc.abstractmethod
    def opener(self) -> Callable[[], DetectionStore]:
        """A picklable callable that opens this same store (in the evaluator process)."""

    @abc.abstractmethod
    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id INTEGER PRIMARY KEY, raised_ns INTEGER NOT NULL, agent_id TEXT NOT NULL,
    source TEXT NOT NULL, rule_id TEXT NOT NULL, title TEXT NOT NULL, severity TEXT NOT NULL,
    severity_rank INTEGER NOT NULL, detail TEXT NOT NULL, dedup_key TEXT NOT NULL,
    events TEXT NOT NULL, count INTEGER NOT NULL, first_event_ns INTEGER NOT NULL,
    last_event_ns INTEGER NOT NULL, updated_ns INTEGER NOT NULL, status TEXT NOT NULL,
    status_reason TEXT NOT NULL DEFAULT '', status_actor TEXT NOT NULL DEFAULT '',
    hash BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_dedup ON alerts(dedup_key, updated_ns);
CREATE INDEX IF NOT EXISTS alerts_agent ON alerts(agent_id, status);
CREATE TABLE IF NOT EXISTS alert_log (
    seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, alert_id INTEGER NOT NULL,
    kind TEXT NOT NULL, body TEXT NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS alert_head (id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS baselines (
    model TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL, count INTEGER NOT NULL,
    first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL, value TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (model, scope, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (agent_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS overflows (
    id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, time_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rules (
    rule_id TEXT PRIMARY KEY, yaml TEXT NOT NULL, added_ns INTEGER NOT NULL, actor TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS disabled_rules (
    rule_id TEXT PRIMARY KEY, actor TEXT NOT NULL, time_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

ALERT_COLUMNS = ("alert_id, raised_ns, agent_id, source, rule_id, title, severity, detail, "
                 "dedup_key, events, count, first_event_ns, last_event_ns, updated_ns, status, "
                 "status_reason, status_actor, hash")


def _alert(row: Sequence[Any]) -> Alert:
    events = tuple(EventRef(a, s) for a, s in json.loads(row[9]))
    return Alert(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], events,
                 row[10], row[11], row[12], row[13], row[14], row[15], row[16], bytes(row[17]))


class SQLiteDetectionStore(DetectionStore):
    """SQLite (WAL) in its own file; one connection, one lock, short transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise DetectionStoreError(f"cannot open the detection database {path}: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise DetectionStoreError(f"cannot write to {self.path}: {e}") from e
            try:
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise DetectionStoreError(f"write to {self.path} failed: {e}") from e
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise DetectionStoreError(f"read from {self.path} failed: {e}") from e

    # -- alert log ------------------------------------------------------------------------------
    @staticmethod
    def _append_log(db: sqlite3.Connection, head: tuple[int, bytes], time_ns: int,
                    alert_id: int, kind: str, body: str) -> tuple[int, bytes]:
        """Append one record after `head` (seq, hash); return the new head."""
        seq, digest = head[0] + 1, log_hash(head[1], head[0] + 1, time_ns, alert_id, kind, body)
        db.execute("INSERT INTO alert_log VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (seq, time_ns, alert_id, kind, body, head[1], digest))
        return seq, digest

    @staticmethod
    def _read_head(db: sqlite3.Connection) -> tuple[int, bytes]:
        row = db.execute("SELECT seq, hash FROM alert_head WHERE id = 1").fetchone()
        return (row[0], bytes(row[1])) if row else (0, GENESIS)

    @staticmethod
    def _write_head(db: sqlite3.Connection, head: tuple[int, bytes]) -> None:
        db.execute("INSERT INTO alert_head (id, seq, hash) VALUES (1, ?, ?) ON CONFLICT(id) "
                   "DO UPDATE SET seq = excluded.seq, hash = excluded.hash", head)

    def raise_alerts(self, alerts: Sequence[NewAlert], now_ns: int,
                     dedup_window_ns: int) -> StoredAlerts:
        groups: dict[str, list[NewAlert]] = {}
        for a in alerts:
            groups.setdefault(a.dedup_key, []).append(a)
        touched: list[int] = []
        raised: set[int] = set()
        with self._tx() as db:
            head = self._read_head(db)
            next_id = db.execute("SELECT COALESCE(MAX(alert_id), 0) + 1 FROM alerts").fetchone()[0]
            for key, group in groups.items():
                row = db.execute(
                    "SELECT alert_id, events FROM alerts WHERE dedup_key = ? AND status != "
                    "'closed' AND updated_ns >= ? ORDER BY alert_id DESC LIMIT 1",
                    (key, now_ns - dedup_window_ns)).fetchone()
                if row is None:
                    first, group = group[0], group[1:]
                    alert_id, next_id = next_id, next_id + 1
                    head = self._append_log(db, head, now_ns, alert_id, "raised",
                                            raised_body(first))
                    ref = [[first.event.agent_id, first.event.seq]] if first.event else []
                    db.execute(f"INSERT INTO alerts ({ALERT_COLUMNS}, severity_rank) VALUES "
                               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, 'new', '', '', ?, ?)",
                               (alert_id, now_ns, first.agent_id, first.source, first.rule_id,
                                first.title, first.severity, first.detail, key, json.dumps(ref),
                                first.time_ns, first.time_ns, now_ns, head[1],
                                severity_rank(first.severity)))
                    raised.add(alert_id)
                    events: list[list[Any]] = ref
                else:
                    alert_id, events = row[0], json.loads(row[1])
                touched.append(alert_id)
                if not group:
                    continue
                # Every repeat in this batch: one log record and one update, with the count.
                room = MAX_EVENT_REFS - len(events)
                if room > 0:
                    events.extend([[a.event.agent_id, a.event.seq]
                                   for a in group if a.event][:room])
                db.execute("UPDATE alerts SET count = count + ?, events = ?, "
                           "last_event_ns = MAX(last_event_ns, ?), updated_ns = ? "
                           "WHERE alert_id = ?",
                           (len(group), json.dumps(events), max(a.time_ns for a in group),
                            now_ns, alert_id))
                head = self._append_log(db, head, now_ns, alert_id, "repeated",
                                        repeated_body(group))
            self._write_head(db, head)
            ids = sorted(set(touched))
            rows = db.execute(f"SELECT {ALERT_COLUMNS} FROM alerts WHERE alert_id IN "
                              f"({','.join('?' * len(ids))})", ids).fetchall() if ids else []
        return StoredAlerts([_alert(r) for r in rows], frozenset(raised), len(alerts))

    def list_alerts(self, agent_id: str = "", min_severity: str = "", status: str = "",
                    after_id: int = 0, limit: int = 1000) -> list[Alert]:
        sql = f"SELECT {ALERT_COLUMNS} FROM alerts WHERE alert_id > ?"
        args: list[Any] = [after_id]
        if agent_id:
            sql += " AND agent_id = ?"
            args.append(agent_id)
        if min_severity:
            sql += " AND severity_rank >= ?"
            args.append(SEVERITIES.index(min_severity))
        if status == "open":
            sql += " AND status != 'closed'"
        elif status:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY alert_id LIMIT ?"
        args.append(limit)
        return [_alert(r) for r in self._query(sql, args)]

    def get_alert(self, alert_id: int) -> Alert:
        rows = self._query(f"SELECT {ALERT_COLUMNS} FROM alerts WHERE alert_id = ?", (alert_id,))
        if not rows:
            raise AlertNotFound(alert_id)
        return _alert(rows[0])

    def set_status(self, alert_id: int, status: str, reason: str, actor: str,
                   now_ns: int) -> Alert:
        with self._tx() as db:
            row = db.execute("SELECT status FROM alerts WHERE alert_id = ?",
                             (alert_id,)).fetchone()
            if row is None:
                raise AlertNotFound(alert_id)
            if (row[0], status) not in TRANSITIONS:
                raise InvalidTransition(alert_id, row[0], status)
            db.execute("UPDATE alerts SET status = ?, status_reason = ?, status_actor = ?, "
                       "updated_ns = ? WHERE alert_id = ?",
                       (status, reason, actor, now_ns, alert_id))
            head = self._append_log(db, self._read_head(db), now_ns, alert_id, "status",
                                    status_body(status, reason, actor))
            self._write_head(db, head)
        return self.get_alert(alert_id)

    def open_alert_counts(self) -> dict[str, int]:
        return {a: n for a, n in self._query(
            "SELECT agent_id, COUNT(*) FROM alerts WHERE status != 'closed' GROUP BY agent_id")}

    def alert_log(self) -> list[AlertLogRow]:
        return [AlertLogRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), bytes(r[6]))
                for r in self._query("SELECT seq, time_ns, alert_id, kind, body, prev_hash, hash "
                                     "FROM alert_log ORDER BY seq")]

    def alert_head(self) -> tuple[int, bytes] | None:
        rows = self._query("SELECT seq, hash FROM alert_head WHERE id = 1")
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    # -- baselines ------------------------------------------------------------------------------
    def baselines(self) -> list[BaselineRow]:
        return [BaselineRow(*r) for r in self._query(
            "SELECT model, scope, key, count, first_ns, last_ns, value FROM baselines")]

    def save_state(self, rows: Sequence[BaselineRow], cursors: dict[str, int]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO baselines VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model, scope, key) "
                "DO UPDATE SET count = excluded.count, first_ns = excluded.first_ns, "
                "last_ns = excluded.last_ns, value = excluded.value",
                [(r.model, r.scope, r.key, r.count, r.first_ns, r.last_ns, r.value)
                 for r in rows])
            db.executemany("INSERT INTO cursors VALUES (?, ?) ON CONFLICT(agent_id) DO UPDATE "
                           "SET seq = MAX(seq, excluded.seq)", list(cursors.items()))

    def cursors(self) -> dict[str, int]:
        return dict(self._query("SELECT agent_id, seq FROM cursors"))

    def record_overflow(self, agent_id: str, first_seq: int, last_seq: int,
                        time_ns: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO overflows (agent_id, first_seq, last_seq, time_ns) VALUES "
                       "(?, ?, ?, ?)", (agent_id, first_seq, last_seq, time_ns))

    def overflows(self) -> list[tuple[str, int, int, int]]:
        return [(r[0], r[1], r[2], r[3]) for r in self._query(
            "SELECT agent_id, first_seq, last_seq, time_ns FROM overflows ORDER BY id")]

    # -- rules ----------------------------------------------------------------------------------
    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO meta VALUES ('rules_version', 1) ON CONFLICT(key) DO UPDATE "
                   "SET value = value + 1")

    def add_rule(self, rule: CustomRule) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO rules VALUES (?, ?, ?, ?) ON CONFLICT(rule_id) DO UPDATE "
                       "SET yaml = excluded.yaml, added_ns = excluded.added_ns, "
                       "actor = excluded.actor",
                       (rule.rule_id, rule.yaml, rule.added_ns, rule.actor))
            self._bump(db)

    def custom_rules(self) -> list[CustomRule]:
        return [CustomRule(*r) for r in self._query(
            "SELECT rule_id, yaml, added_ns, actor FROM rules ORDER BY added_ns")]

    def set_rule_disabled(self, rule_id: str, disabled: bool, actor: str, now_ns: int) -> None:
        with self._tx() as db:
            if disabled:
                db.execute("INSERT OR REPLACE INTO disabled_rules VALUES (?, ?, ?)",
                           (rule_id, actor, now_ns))
            else:
                db.execute("DELETE FROM disabled_rules WHERE rule_id = ?", (rule_id,))
            self._bump(db)

    def disabled_rules(self) -> set[str]:
        return {r[0] for r in self._query("SELECT rule_id FROM disabled_rules")}

    def rules_version(self) -> int:
        rows = self._query("SELECT value FROM meta WHERE key = 'rules_version'")
        return int(rows[0][0]) if rows else 0

    def opener(self) -> Callable[[], DetectionStore]:
        return functools.partial(SQLiteDetectionStore, self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()
