"""Detection records (alerts, the alert log, baseline rows, custom rules) and the alert log's
hash chain with its verifier.

Every alert event (raised, repeated, status change) is appended to a log chained like the
audit log: hash = SHA-256(prev_hash || canonical JSON of the record), with the last (seq, hash)
kept as a head so cutting records off the end is detected too. The alerts table is a view
of that log; `verify_alert_log` proves both. Pure code: no SQL, no IO.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.detection import DetectionError

GENESIS = bytes(32)
SEVERITIES = ("informational", "low", "medium", "high", "critical")
STATUSES = ("new", "acknowledged", "closed")
MAX_EVENT_REFS = 50          # event links kept per alert (the count keeps counting)


class AlertChainBroken(DetectionError):
    """The alert log or the alerts table does not verify; `seq` names the first bad record."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq


@dataclass(frozen=True)
class EventRef:
    agent_id: str
    seq: int


@dataclass(frozen=True)
class NewAlert:
    """A match or anomaly to raise (or fold into an open alert with the same dedup key)."""

    agent_id: str
    source: str                  # "sigma" | "baseline" | "engine"
    rule_id: str                 # Sigma rule id, baseline model name, or engine condition
    title: str
    severity: str
    detail: str                  # why: the rule's description or the baseline's numbers
    dedup_key: str
    event: EventRef | None
    time_ns: int                 # when the matching event happened (agent clock)


@dataclass(frozen=True)
class Alert:
    alert_id: int
    raised_ns: int               # server time the alert was stored
    agent_id: str
    source: str
    rule_id: str
    title: str
    severity: str
    detail: str
    dedup_key: str
    events: tuple[EventRef, ...]
    count: int
    first_event_ns: int
    last_event_ns: int
    updated_ns: int
    status: str
    status_reason: str
    status_actor: str
    hash: bytes                  # chain hash of the log record that raised it


@dataclass(frozen=True)
class AlertLogRow:
    seq: int
    time_ns: int
    alert_id: int
    kind: str                    # "raised" | "repeated" | "status"
    body: str                    # canonical JSON of what happened
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True)
class StoredAlerts:
    """What one `raise_alerts` call stored: every alert it raised or repeated, and which of
    them it raised (an alert raised and repeated in the same batch is in both)."""

    alerts: list[Alert]
    raised: frozenset[int]
    matches: int = 0             # alerts passed in (each match, before folding)

    def newly_raised(self) -> list[Alert]:
        return [a for a in self.alerts if a.alert_id in self.raised]


@dataclass(frozen=True)
class BaselineRow:
    model: str
    scope: str                   # agent id, "agent|user", or "*" for the fleet
    key: str
    count: int
    first_ns: int
    last_ns: int
    value: str = ""              # model-specific JSON (running statistics)


@dataclass(frozen=True)
class CustomRule:
    rule_id: str
    yaml: str
    added_ns: int
    actor: str


def canonical(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def log_hash(prev: bytes, seq: int, time_ns: int, alert_id: int, kind: str, body: str) -> bytes:
    return hashlib.sha256(prev + canonical([seq, time_ns, alert_id, kind, body]).encode()).digest()


def raised_body(alert: NewAlert) -> str:
    return canonical({"agent_id": alert.agent_id, "source": alert.source,
                      "rule_id": alert.rule_id, "title": alert.title,
                      "severity": alert.severity, "detail": alert.detail,
                      "dedup_key": alert.dedup_key, "time_ns": alert.time_ns,
                      "event": [alert.event.agent_id, alert.event.seq] if alert.event else None})


def repeated_body(alerts: Sequence[NewAlert]) -> str:
    """One log record for every repeat of an open alert in one stored batch: how many, the
    matching events and the newest event time. (Records written before batching held one
    repeat each, with "event" and "time_ns"; the verifier reads both.)"""
    return canonical({"count": len(alerts),
                      "events": [[a.event.agent_id, a.event.seq] for a in alerts if a.event],
                      "last_event_ns": max(a.time_ns for a in alerts)})


def repeat_count(body: str) -> int:
    """How many repeats a "repeated" log record stands for."""
    return int(json.loads(body).get("count", 1))


def status_body(status: str, reason: str, actor: str) -> str:
    return canonical({"status": status, "reason": reason, "actor": actor})


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else 2


def verify_alert_log(rows: Sequence[AlertLogRow], head: tuple[int, bytes] | None,
                     alerts: Sequence[Alert]) -> int:
    """Recompute the alert log chain, compare its end with the recorded head and check that
    every alert agrees with the log (raised by it, same count and status). Returns the number
    of records verified; raises AlertChainBroken naming the first thing that is wrong."""
    prev = GENESIS
    raised: dict[int, tuple[bytes, dict[str, Any]]] = {}
    counts: dict[int, int] = {}
    status: dict[int, str] = {}
    for expected, row in enumerate(rows, start=1):
        if row.seq != expected:
            raise AlertChainBroken(expected, f"alert log record {expected} is missing "
                                             f"(found {row.seq})")
        if row.prev_hash != prev:
            raise AlertChainBroken(row.seq, f"alert log record {row.seq} does not link to "
                                            f"record {row.seq - 1}")
        if log_hash(prev, row.seq, row.time_ns, row.alert_id, row.kind, row.body) != row.hash:
            raise AlertChainBroken(row.seq, f"alert log record {row.seq} was altered after "
                                            "it was written")
        if row.kind == "raised":
            raised[row.alert_id] = (row.hash, json.loads(row.body))
            counts[row.alert_id] = 1
            status[row.alert_id] = "new"
        elif row.kind == "repeated":
            counts[row.alert_id] = counts.get(row.alert_id, 0) + repeat_count(row.body)
        elif row.kind == "status":
            status[row.alert_id] = json.loads(row.body)["status"]
        prev = row.hash
    last = (rows[-1].seq, rows[-1].hash) if rows else None
    if last != head:
        if head is None:
            raise AlertChainBroken(0, "the alert log head record is missing: the log was "
                                      "tampered with")
        raise AlertChainBroken(head[0], f"the alert log ends at record "
                                        f"{last[0] if last else 0} but record {head[0]} was "
                                        "written: records were deleted from the end")
    for alert in alerts:
        origin = raised.get(alert.alert_id)
        if origin is None or origin[0] != alert.hash:
            raise AlertChainBroken(0, f"alert {alert.alert_id} was not raised by the alert log")
        body = origin[1]
        if (body["agent_id"], body["rule_id"], body["severity"], body["title"]) != (
                alert.agent_id, alert.rule_id, alert.severity, alert.title):
            raise AlertChainBroken(0, f"alert {alert.alert_id} was altered after it was raised")
        if counts[alert.alert_id] != alert.count or status[alert.alert_id] != alert.status:
            raise AlertChainBroken(0, f"alert {alert.alert_id} count or status disagrees with "
                                      "the alert log")
    return len(rows)
