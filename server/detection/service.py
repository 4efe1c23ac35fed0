"""Detection in the running server: its lifecycle (DetectionRuntime: database, engine) and its
part of the admin API (DetectionAdmin: list, acknowledge and close alerts, hunt), with role
checks and audit entries through server.admin.Admin. Transport-free: server.rpc adapts it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from collector.ingest import DecodedEvent
from collector.store.base import Store
from proto import ringfence_pb2 as pb
from server.admin import Actor, Admin, InvalidRequest
from server.detection import AlertNotFound, DetectionError, InvalidTransition, RuleError
from server.detection.engine import DetectionConfig, DetectionEngine, hunt
from server.detection.records import (
    SEVERITIES,
    STATUSES,
    Alert,
    AlertChainBroken,
    NewAlert,
    verify_alert_log,
)
from server.detection.sigma import CompiledRule, load_yaml
from server.detection.store import DetectionStore, SQLiteDetectionStore
from server.metrics import DetectionFigures

logger = logging.getLogger(__name__)

MAX_ALERTS = 10_000
MAX_HUNT_MATCHES = 10_000
DEFAULT_HUNT_MATCHES = 1000


def detection_database(data_dir: Path) -> Path:
    return data_dir / "detection.sqlite"


def open_detection_store(data_dir: Path) -> DetectionStore:
    return SQLiteDetectionStore(detection_database(data_dir))


class DetectionRuntime:
    """The detection database and live engine of one server process."""

    def __init__(self, store: Store, dstore: DetectionStore, config: DetectionConfig) -> None:
        self.store = store
        self.dstore = dstore
        self.config = config
        self.engine = DetectionEngine(store, dstore, config)

    @classmethod
    def open(cls, store: Store, data_dir: Path,
             config: DetectionConfig | None = None) -> DetectionRuntime:
        config = config or DetectionConfig.from_file(data_dir / "detection.json")
        return cls(store, open_detection_store(data_dir), config)

    def start(self) -> None:
        if self.config.enabled:
            self.engine.start()
            logger.info("detection running: %d Sigma rules in force, baselines %s",
                        len(self.engine.rules.index),
                        "on" if self.config.baselines.enabled else "off")

    def submit(self, agent_id: str, events: list[DecodedEvent]) -> None:
        if self.config.enabled:
            self.engine.submit(agent_id, events)

    def figures(self) -> DetectionFigures:
        stats = self.engine.stats
        return DetectionFigures(self.engine.lag_s() if self.config.enabled else 0.0,
                                stats.evaluated, stats.alerts, stats.overflowed_events)

    def hold_ingest_s(self) -> float:
        return self.engine.hold_ingest_s() if self.config.enabled else 0.0

    def stop(self) -> None:
        if self.config.enabled:
            self.engine.stop()
        self.dstore.close()


@dataclass(frozen=True)
class HuntResult:
    rule_id: str
    title: str
    matches: list[tuple[NewAlert, pb.Event]]
    scanned: int
    truncated: bool


class DetectionAdmin:
    """Alerts and hunts for responders: viewer reads, responder acknowledges, closes, hunts."""

    def __init__(self, admin: Admin, runtime: DetectionRuntime) -> None:
        self._admin = admin
        self._runtime = runtime

    def open_alert_counts(self) -> dict[str, int]:
        return self._runtime.dstore.open_alert_counts()

    def list_alerts(self, actor: Actor, host: str, min_severity: str, status: str,
                    after_id: int, limit: int, verify: bool) -> tuple[list[Alert], str, int]:
        """Alerts matching the filters, plus (verify error or "", log records verified)."""
        self._admin.authorize(actor, "list_alerts", host)
        if min_severity and min_severity not in SEVERITIES:
            raise InvalidRequest(f"severity must be one of {', '.join(SEVERITIES)}")
        if status and status not in STATUSES + ("open",):
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)} or open")
        agent_id = self._admin.find_host(host).agent_id if host else ""
        dstore = self._runtime.dstore
        alerts = dstore.list_alerts(agent_id, min_severity, status, after_id,
                                    min(limit or 1000, MAX_ALERTS))
        error, records = "", 0
        if verify:
            try:
                records = verify_alert_log(dstore.alert_log(), dstore.alert_head(),
                                           dstore.list_alerts(limit=2**62))
            except AlertChainBroken as e:
                error = str(e)
        return alerts, error, records

    def update_alert(self, actor: Actor, alert_id: int, status: str, reason: str) -> Alert:
        action = "update_alert"
        target = f"alert {alert_id}"
        if status not in ("acknowledged", "closed"):
            raise InvalidRequest("an alert can be set to acknowledged or closed")
        if not reason.strip():
            self._admin.audit(actor, action, target, reason, "refused: no reason given")
            raise InvalidRequest(f"setting an alert {status} needs a --reason: it goes into "
                                 "the alert log and the audit log")
        self._admin.authorize(actor, action, target, reason)
        try:
            alert = self._runtime.dstore.set_status(alert_id, status, reason, actor.name,
                                                    time.time_ns())
        except AlertNotFound as e:
            self._admin.audit(actor, action, target, reason, "failed: no such alert")
            raise InvalidRequest(str(e)) from e
        except InvalidTransition as e:
            self._admin.audit(actor, action, target, reason, f"refused: {e}")
            raise InvalidRequest(str(e)) from e
        self._admin.audit(actor, action, target, reason, f"allowed: {status}")
        return alert

    def hunt(self, actor: Actor, rule: str, rule_yaml: str, hosts: list[str], since_ns: int,
             until_ns: int, limit: int) -> HuntResult:
        target = rule or "rule document"
        self._admin.authorize(actor, "hunt", target)
        compiled = self._hunt_rule(rule, rule_yaml)
        agents = ([self._admin.find_host(h).agent_id for h in hosts] if hosts else
                  [a.agent_id for a in self._runtime.store.list_agents()])
        matches, scanned, truncated = hunt(self._runtime.store, compiled, agents, since_ns,
                                           until_ns, min(limit or DEFAULT_HUNT_MATCHES,
                                                         MAX_HUNT_MATCHES))
        self._admin.audit(actor, "hunt", f"{compiled.info.rule_id} on {len(agents)} hosts", "",
                          f"allowed: {len(matches)} matches in {scanned} events")
        return HuntResult(compiled.info.rule_id, compiled.info.title, matches, scanned,
                          truncated)

    def _hunt_rule(self, rule: str, rule_yaml: str) -> CompiledRule:
        try:
            if rule_yaml:
                loaded = load_yaml(rule_yaml, "hunt rule")
                compiled = [r for r in loaded if isinstance(r, CompiledRule)]
                if not compiled:
                    raise RuleError("hunt rule", f"unsupported: {loaded[0].reason}"  # type: ignore[union-attr]
                                    if loaded else "no rule")
                return compiled[0]
            found = self._runtime.engine.rules.find(rule)
        except RuleError as e:
            raise InvalidRequest(str(e)) from e
        if not isinstance(found, CompiledRule):
            raise InvalidRequest(f"rule {rule} is unsupported: {found.reason}")
        return found


__all__ = ["DetectionAdmin", "DetectionError", "DetectionRuntime", "HuntResult"]
