"""Cases: the record of one incident, linking its alerts, hosts, responder actions (commands),
collected files, evidence bundles and notes; every change is written to the audit log.

Storage sits behind the small `CaseStore` interface (SQLite here: DATA/cases.db, next to the
main database so the evidence store's schema is untouched). `CaseService` adds authorization
and audit through server.admin. It does not render reports (server.report) or send
notifications (server.notify); it calls an optional `on_event` hook for the latter.

Exceptions: CaseNotFound (an InvalidRequest, so the CLI tells the user which id is unknown).
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from collector.store.base import NotFound, Store, StoreUnavailable
from server.admin import Actor, Admin, InvalidRequest, command_summary

SEVERITIES = ("low", "medium", "high", "critical")
LINK_KINDS = ("alert", "host", "command", "bundle", "file", "note")
MAX_TITLE = 200
MAX_REF = 512
MAX_NOTE = 4096


class CaseNotFound(InvalidRequest):
    def __init__(self, case_id: str) -> None:
        super().__init__(f"no case {case_id}: list cases with `ringfence case list`")
        self.case_id = case_id


@dataclass(frozen=True)
class CaseRow:
    case_id: str
    title: str
    severity: str
    status: str                  # open | closed
    created_ns: int
    created_by: str
    closed_ns: int = 0
    closed_by: str = ""
    close_reason: str = ""


@dataclass(frozen=True)
class CaseLink:
    case_id: str
    kind: str
    ref: str
    detail: dict[str, Any]
    actor: str
    time_ns: int


class CaseStore(abc.ABC):
    """Where cases live. Implementations: SQLiteCaseStore (a PostgreSQL one can follow the
    same five methods)."""

    @abc.abstractmethod
    def create(self, title: str, severity: str, actor: str, now_ns: int) -> CaseRow: ...

    @abc.abstractmethod
    def get(self, case_id: str) -> CaseRow: ...

    @abc.abstractmethod
    def all(self) -> list[CaseRow]: ...

    @abc.abstractmethod
    def close(self, case_id: str, actor: str, reason: str, now_ns: int) -> CaseRow: ...

    @abc.abstractmethod
    def add_link(self, link: CaseLink) -> bool:
        """Add a link; False when the same (kind, ref) is already linked."""

    @abc.abstractmethod
    def links(self, case_id: str) -> list[CaseLink]: ...

    @abc.abstractmethod
    def close_store(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
  n INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT UNIQUE NOT NULL, title TEXT NOT NULL,
  severity TEXT NOT NULL, status TEXT NOT NULL, created_ns INTEGER NOT NULL,
  created_by TEXT NOT NULL, closed_ns INTEGER NOT NULL DEFAULT 0,
  closed_by TEXT NOT NULL DEFAULT '', close_reason TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS case_links (
  case_id TEXT NOT NULL, kind TEXT NOT NULL, ref TEXT NOT NULL, detail TEXT NOT NULL,
  actor TEXT NOT NULL, time_ns INTEGER NOT NULL, PRIMARY KEY (case_id, kind, ref));
"""


class SQLiteCaseStore(CaseStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise StoreUnavailable(f"case store {self.path} failed: {e}") from e
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @staticmethod
    def _row(r: tuple[Any, ...]) -> CaseRow:
        return CaseRow(*r)

    _COLS = ("case_id, title, severity, status, created_ns, created_by, closed_ns, closed_by, "
             "close_reason")

    def create(self, title: str, severity: str, actor: str, now_ns: int) -> CaseRow:
        with self._tx() as db:
            n = db.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM cases").fetchone()[0]
            case_id = f"CASE-{n}"
            db.execute("INSERT INTO cases (n, case_id, title, severity, status, created_ns, "
                       "created_by) VALUES (?, ?, ?, ?, 'open', ?, ?)",
                       (n, case_id, title, severity, now_ns, actor))
        return self.get(case_id)

    def get(self, case_id: str) -> CaseRow:
        with self._lock:
            r = self._db.execute(f"SELECT {self._COLS} FROM cases WHERE case_id = ?",
                                 (case_id,)).fetchone()
        if r is None:
            raise CaseNotFound(case_id)
        return self._row(r)

    def all(self) -> list[CaseRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLS} FROM cases ORDER BY n").fetchall()
        return [self._row(r) for r in rows]

    def close(self, case_id: str, actor: str, reason: str, now_ns: int) -> CaseRow:
        with self._tx() as db:
            changed = db.execute("UPDATE cases SET status = 'closed', closed_ns = ?, "
                                 "closed_by = ?, close_reason = ? WHERE case_id = ? AND "
                                 "status = 'open'", (now_ns, actor, reason, case_id)).rowcount
        if not changed:
            case = self.get(case_id)
            raise InvalidRequest(f"{case_id} is already {case.status}")
        return self.get(case_id)

    def add_link(self, link: CaseLink) -> bool:
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO case_links VALUES (?, ?, ?, ?, ?, ?)",
                             (link.case_id, link.kind, link.ref,
                              json.dumps(link.detail, sort_keys=True), link.actor, link.time_ns))
            return cur.rowcount == 1

    def links(self, case_id: str) -> list[CaseLink]:
        with self._lock:
            rows = self._db.execute("SELECT case_id, kind, ref, detail, actor, time_ns FROM "
                                    "case_links WHERE case_id = ? ORDER BY time_ns, kind, ref",
                                    (case_id,)).fetchall()
        return [CaseLink(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def any_cases(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM cases LIMIT 1").fetchone() is not None

    def close_store(self) -> None:
        with self._lock:
            self._db.close()


CaseEvent = Callable[[str, CaseRow, dict[str, Any]], None]


class CaseService:
    """Case operations for responders: role checks and an audit record for every change."""

    def __init__(self, admin: Admin, cases: SQLiteCaseStore, store: Store,
                 on_event: CaseEvent | None = None) -> None:
        self._admin = admin
        self._cases = cases
        self._store = store
        self._on_event = on_event

    def _emit(self, kind: str, case: CaseRow, detail: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(kind, case, detail)

    def require_case(self, case_id: str) -> None:
        """Raise CaseNotFound unless the case exists (when cases are used at all); closed
        cases take no new actions."""
        if not self._cases.any_cases():
            return
        case = self._cases.get(case_id)
        if case.status != "open":
            raise InvalidRequest(f"{case_id} is closed; reopen work under a new case")

    def create(self, actor: Actor, title: str, severity: str, hosts: list[str],
               reason: str = "") -> CaseRow:
        self._admin.authorize(actor, "case_edit", title, reason)
        title = title.strip()
        if not title or len(title) > MAX_TITLE:
            raise InvalidRequest(f"a case needs a title of 1..{MAX_TITLE} characters")
        severity = severity or "medium"
        if severity not in SEVERITIES:
            raise InvalidRequest(f"severity must be one of {', '.join(SEVERITIES)}")
        agents = [self._admin.find_host(h) for h in hosts]
        case = self._cases.create(title, severity, actor.name, time.time_ns())
        self._admin.audit(actor, "case_create", case.case_id, reason or title,
                          f"allowed: created {case.case_id} ({severity}) {title}")
        for agent in agents:
            self.link(actor, case.case_id, "host", agent.agent_id, {"hostname": agent.hostname})
        self._emit("case_created", case, {"hosts": [a.hostname for a in agents]})
        return case

    def link(self, actor: Actor, case_id: str, kind: str, ref: str,
             detail: dict[str, Any] | None = None, reason: str = "") -> bool:
        self._admin.authorize(actor, "case_edit", case_id, reason)
        if kind not in LINK_KINDS:
            raise InvalidRequest(f"link kind must be one of {', '.join(LINK_KINDS)}")
        if not ref or len(ref) > (MAX_NOTE if kind == "note" else MAX_REF):
            raise InvalidRequest(f"a {kind} link needs a reference")
        case = self._cases.get(case_id)
        detail = dict(detail or {})
        if kind == "host":
            agent = self._admin.find_host(ref)
            ref, detail = agent.agent_id, {"hostname": agent.hostname, **detail}
        elif kind == "command":
            try:
                row = self._store.get_command(ref)
            except NotFound as e:
                raise InvalidRequest(str(e)) from e
            detail = {"action": row.action, "agent_id": row.agent_id, **detail}
        added = self._cases.add_link(CaseLink(case_id, kind, ref, detail, actor.name,
                                              time.time_ns()))
        self._admin.audit(actor, "case_link", case_id, reason or f"{kind} {ref}",
                          f"allowed: linked {kind} {ref}" if added else
                          f"allowed: {kind} {ref} was already linked")
        if added and kind != "host":
            self._emit("case_updated", case, {"linked": kind, "ref": ref})
        return added

    def close(self, actor: Actor, case_id: str, reason: str) -> CaseRow:
        if not reason.strip():
            self._admin.audit(actor, "case_close", case_id, reason, "refused: no reason given")
            raise InvalidRequest("closing a case needs a --reason: it goes into the audit log")
        self._admin.authorize(actor, "case_edit", case_id, reason)
        case = self._cases.close(case_id, actor.name, reason, time.time_ns())
        self._admin.audit(actor, "case_close", case_id, reason, "allowed: closed")
        self._emit("case_closed", case, {"reason": reason})
        return case

    def list_cases(self, actor: Actor) -> list[CaseRow]:
        self._admin.authorize(actor, "case_view")
        return self._cases.all()

    def show(self, actor: Actor, case_id: str) -> dict[str, Any]:
        self._admin.authorize(actor, "case_view", case_id)
        return self.document(case_id)

    def document(self, case_id: str) -> dict[str, Any]:
        """The case with its links; linked commands carry their current status, and files
        collected by linked commands are listed with their SHA-256."""
        case = self._cases.get(case_id)
        links = self._cases.links(case_id)
        commands: list[dict[str, Any]] = []
        command_ids: set[str] = set()
        for link in links:
            if link.kind == "command":
                try:
                    row = self._store.get_command(link.ref)
                except NotFound:
                    continue
                command_ids.add(row.command_id)
                commands.append({**command_summary(row), "issued_ns": row.issued_ns,
                                 "updated_ns": row.updated_ns, "actor": row.actor,
                                 "reason": row.reason, "linked_ns": link.time_ns})
        hosts = sorted({link.ref for link in links if link.kind == "host"}
                       | {str(c["agent_id"]) for c in commands})
        files = [{"sha256": f.sha256, "size": f.size, "agent_id": f.agent_id,
                  "command_id": f.command_id, "path": f.path.decode("utf-8", "replace"),
                  "stored_ns": f.stored_ns}
                 for agent_id in hosts for f in self._store.files_for(agent_id)
                 if f.command_id in command_ids]
        files += [{"sha256": link.ref, **link.detail} for link in links if link.kind == "file"]
        return {"case": asdict(case),
                "links": [asdict(link) for link in links],
                "hosts": hosts, "commands": commands, "files": files,
                "alerts": [{"alert_id": link.ref, **link.detail} for link in links
                           if link.kind == "alert"],
                "bundles": [{"bundle_id": link.ref, **link.detail} for link in links
                            if link.kind == "bundle"],
                "notes": [{"note": link.ref, "actor": link.actor, "time_ns": link.time_ns}
                          for link in links if link.kind == "note"]}

    def bundle_created(self, actor: Actor, case_id: str, bundle_id: str, sha256: str,
                       agent_id: str, events: int) -> None:
        """Link a new bundle to its case (called by server.bundles after it was built)."""
        if not self._cases.any_cases():
            return
        self.link(actor, case_id, "bundle", bundle_id,
                  {"sha256": sha256, "agent_id": agent_id, "events": events},
                  reason=f"bundle {bundle_id}")
