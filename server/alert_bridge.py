"""Carries alerts from the detection engine to the incident workflow's AlertHub.

Detection stores alerts; this turns each newly raised one into an AlertNotice (with the host
name and, for process events, the pid the alert concerns) so notifications, playbooks and
`ringfence story` react to it. It decides nothing about what to do with an alert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from collector.store.base import Store
from proto import ringfence_pb2 as pb
from server.alerting import AlertHub, AlertNotice
from server.detection import DetectionError
from server.detection.records import Alert, StoredAlerts
from server.detection.store import DetectionStore

logger = logging.getLogger(__name__)


def notice_for(alert: Alert, store: Store) -> AlertNotice:
    """The AlertNotice of a stored alert; the pid comes from its latest process event."""
    agent = store.get_agent(alert.agent_id)
    seq = alert.events[-1].seq if alert.events else 0
    pid = 0
    if seq:
        row = store.stored_event(alert.agent_id, seq)
        if row is not None and row.kind == "process":
            pid = pb.Event.FromString(row.data).process.process.pid
    return AlertNotice(alert_id=str(alert.alert_id), agent_id=alert.agent_id,
                       rule=alert.rule_id or alert.source, severity=alert.severity,
                       title=alert.title, time_ns=alert.raised_ns, seq=seq,
                       event_time_ns=alert.last_event_ns, pid=pid,
                       hostname=agent.hostname if agent is not None else "")


class AlertBridge:
    """Detection listener: forwards alerts raised by a batch (not repeats) to the hub.

    Repeats of an open alert are folded into it by detection and are not new reactions:
    playbooks and notifications act once per alert.
    """

    def __init__(self, hub: AlertHub, store: Store) -> None:
        self._hub = hub
        self._store = store

    def __call__(self, stored: StoredAlerts) -> None:
        for alert in stored.newly_raised():
            self._hub.alert_raised(notice_for(alert, self._store))


def alert_lookup(dstore: DetectionStore, store: Store) -> Callable[[str], AlertNotice | None]:
    """Find an alert by id in the detection store (for alerts older than the hub's index)."""

    def lookup(alert_id: str) -> AlertNotice | None:
        if not alert_id.isdigit():
            return None
        try:
            return notice_for(dstore.get_alert(int(alert_id)), store)
        except DetectionError:
            return None

    return lookup
