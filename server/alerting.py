"""The hook between whatever raises alerts (server.detection) and what reacts to them
(notifications, playbooks, cases, root-cause stories).

A producer calls `AlertHub.alert_raised(AlertNotice(...))`; the hub remembers recent alerts
(bounded) so they can be looked up by id, and hands each to every registered `AlertSink`. A
sink that raises is logged and skipped: one broken reaction never blocks the others or the
producer. It defines no detection logic and stores nothing durable.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

SEVERITY_ORDER = ("informational", "low", "medium", "high", "critical")
MAX_REMEMBERED = 10_000


def severity_rank(severity: str) -> int:
    """0..4 for the names in SEVERITY_ORDER; unknown names rank as medium."""
    try:
        return SEVERITY_ORDER.index(severity.lower())
    except ValueError:
        return 2


@dataclass(frozen=True)
class AlertNotice:
    """What reactions need to know of an alert."""

    alert_id: str
    agent_id: str
    rule: str
    severity: str                # informational | low | medium | high | critical
    title: str
    time_ns: int                 # when the alert was raised
    seq: int = 0                 # the event that triggered it (0: none)
    event_time_ns: int = 0       # when that event happened on the host
    pid: int = 0                 # the process it concerns (0: none)
    hostname: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AlertSink(Protocol):
    def alert_raised(self, alert: AlertNotice) -> None: ...


class AlertHub:
    """Fan-out of alerts to sinks, plus a bounded index of recent alerts by id."""

    def __init__(self) -> None:
        self._sinks: list[AlertSink] = []
        self._lookup: Callable[[str], AlertNotice | None] | None = None
        self._recent: OrderedDict[str, AlertNotice] = OrderedDict()
        self._lock = threading.Lock()

    def register(self, sink: AlertSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def set_lookup(self, lookup: Callable[[str], AlertNotice | None]) -> None:
        """Where to find alerts older than the recent index (e.g. the detection store)."""
        self._lookup = lookup

    def find(self, alert_id: str) -> AlertNotice | None:
        with self._lock:
            notice = self._recent.get(alert_id)
        if notice is None and self._lookup is not None:
            notice = self._lookup(alert_id)
        return notice

    def alert_raised(self, alert: AlertNotice) -> None:
        with self._lock:
            self._recent[alert.alert_id] = alert
            while len(self._recent) > MAX_REMEMBERED:
                self._recent.popitem(last=False)
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink.alert_raised(alert)
            except Exception:
                logger.exception("alert sink %s failed on alert %s", type(sink).__name__,
                                 alert.alert_id)
