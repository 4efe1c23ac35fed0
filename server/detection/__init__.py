"""Detection on the server: Sigma rules (parsed by pySigma, evaluated here) and behaviour
baselines over the events the collector stores, raising tamper-evident alerts.

It reads stored events and writes its own records (alerts, baselines, rules) through its own
small store interface (server.detection.store); it never changes evidence and never talks gRPC.

Exceptions:

    DetectionError              root
    +-- RuleError               a Sigma rule cannot be used; `reason` says why (bad data)
    +-- AlertNotFound           no alert has the id the caller named
    +-- InvalidTransition       an alert status change that is not allowed (closing twice ...)
    +-- DetectionStoreError     the detection database failed (disk, lock, connection)
"""

from __future__ import annotations


class DetectionError(Exception):
    """Root of detection errors."""


class RuleError(DetectionError):
    """A rule cannot be loaded or evaluated; `reason` tells the user what is wrong."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class AlertNotFound(DetectionError):
    def __init__(self, alert_id: int) -> None:
        super().__init__(f"no alert with id {alert_id}: list them with `ringfence alerts`")
        self.alert_id = alert_id


class InvalidTransition(DetectionError):
    def __init__(self, alert_id: int, current: str, requested: str) -> None:
        super().__init__(f"alert {alert_id} is {current}; it cannot be set to {requested}")
        self.alert_id = alert_id
        self.current = current
        self.requested = requested


class DetectionStoreError(DetectionError):
    """The detection database failed; nothing was written."""
