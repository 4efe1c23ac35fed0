"""Alert actions through server.admin: viewers read, responders acknowledge, close and hunt;
every state change and refusal lands in the audit log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from collector.rpc import SessionRegistry
from collector.store.sqlite import SQLiteStore
from server.admin import Actor, Admin, InvalidRequest, PermissionDenied
from server.detection.baselines import BaselineConfig
from server.detection.engine import DetectionConfig
from server.detection.records import EventRef, NewAlert
from server.detection.service import DetectionAdmin, DetectionRuntime
from server.detection.store import SQLiteDetectionStore


def test_roles_and_audit(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "events.sqlite")
    dstore = SQLiteDetectionStore(tmp_path / "detection.sqlite")
    runtime = DetectionRuntime(store, dstore, DetectionConfig(
        pack_dir=None, baselines=BaselineConfig(enabled=False)))
    admin = Admin(store, SessionRegistry(), None, [])  # type: ignore[arg-type]
    detection = DetectionAdmin(admin, runtime)
    [alert] = dstore.raise_alerts([NewAlert("a1", "sigma", "r", "Rule", "high", "d", "k",
                                            EventRef("a1", 7), 1)],
                                  time.time_ns(), 10**12).alerts
    viewer, responder = Actor("vera", "viewer"), Actor("rita", "responder")
    alerts, error, _ = detection.list_alerts(viewer, "", "high", "open", 0, 10, True)
    assert [a.alert_id for a in alerts] == [alert.alert_id] and error == ""
    with pytest.raises(PermissionDenied):
        detection.update_alert(viewer, alert.alert_id, "acknowledged", "mine now")
    with pytest.raises(PermissionDenied):
        detection.hunt(viewer, "r", "", [], 0, 0, 10)
    with pytest.raises(InvalidRequest, match="--reason"):
        detection.update_alert(responder, alert.alert_id, "closed", " ")
    assert detection.update_alert(responder, alert.alert_id, "closed", "benign").status == "closed"
    with pytest.raises(InvalidRequest, match="is closed"):
        detection.update_alert(responder, alert.alert_id, "acknowledged", "again")
    with pytest.raises(InvalidRequest, match="no alert with id 99"):
        detection.update_alert(responder, 99, "closed", "x")
    with pytest.raises(InvalidRequest, match="severity must be"):
        detection.list_alerts(viewer, "", "urgent", "", 0, 10, False)
    outcomes = [(r.actor, r.action, r.outcome) for r in store.audit_rows()]
    assert outcomes == [
        ("vera", "update_alert", "denied"), ("vera", "hunt", "denied"),
        ("rita", "update_alert", "refused: no reason given"),
        ("rita", "update_alert", "allowed: closed"),
        ("rita", "update_alert", (f"refused: alert {alert.alert_id} is closed; it cannot be "
                                  "set to acknowledged")),
        ("rita", "update_alert", "failed: no such alert")]
    assert dstore.open_alert_counts() == {}
    dstore.close()
    store.close()
