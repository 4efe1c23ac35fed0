"""Notifications of alert, action and case events to webhooks and e-mail.

`Notifier.publish(Notification)` never blocks the caller: it routes the notification (who is
told depends on its severity, per config) onto a bounded queue that one worker thread drains.
A full queue drops the notification and counts it (logged, never silent). Webhooks get a JSON
POST whose body is signed with HMAC-SHA256 (`X-Ringfence-Signature: sha256=<hex>`); e-mail
goes over SMTP with STARTTLS (required unless `unsafe_plaintext` is set, which warns on every
use) from string.Template templates. Each delivery is retried with exponential backoff. Secrets
(HMAC keys, SMTP passwords) are never logged. Config is built once (`NotifyConfig.from_dict`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import smtplib
import ssl
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from server.alerting import AlertNotice, severity_rank

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Ringfence-Signature"
EVENT_HEADER = "X-Ringfence-Event"
DEFAULT_SUBJECT = "[ringfence] ${severity} ${kind}: ${title}"
DEFAULT_BODY = ("${kind} at ${time}\nseverity: ${severity}\nhost: ${host}\n\n${title}\n\n"
                "${details}\n")


class NotifyConfigError(ValueError):
    """The notification configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class Webhook:
    name: str
    url: str
    secret: bytes                 # HMAC-SHA256 key (from config; never logged)
    min_severity: str = "low"     # notify for this severity and above
    kinds: tuple[str, ...] = ()   # "alert" | "action" | "case"; empty = all
    timeout_s: float = 5.0


@dataclass(frozen=True)
class EmailRoute:
    name: str
    to: tuple[str, ...]
    min_severity: str = "high"
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class SMTPConfig:
    host: str = "localhost"
    port: int = 587
    sender: str = "ringfence@localhost"
    username: str = ""
    password: str = ""            # never logged
    starttls: bool = True
    unsafe_plaintext: bool = False
    ca_file: str = ""             # CA bundle to verify the server certificate ("" = system)
    timeout_s: float = 10.0
    subject_template: str = DEFAULT_SUBJECT
    body_template: str = DEFAULT_BODY


@dataclass(frozen=True)
class NotifyConfig:
    webhooks: tuple[Webhook, ...] = ()
    email: tuple[EmailRoute, ...] = ()
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    queue_size: int = 1000
    retries: int = 4
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NotifyConfig:
        try:
            hooks = tuple(Webhook(name=str(h.get("name", h["url"])), url=str(h["url"]),
                                  secret=str(h["secret"]).encode(),
                                  min_severity=str(h.get("min_severity", "low")),
                                  kinds=tuple(h.get("kinds", ())),
                                  timeout_s=float(h.get("timeout_s", 5.0)))
                          for h in raw.get("webhook", []))
            routes = tuple(EmailRoute(name=str(e.get("name", "email")), to=tuple(e["to"]),
                                      min_severity=str(e.get("min_severity", "high")),
                                      kinds=tuple(e.get("kinds", ())))
                           for e in raw.get("email", []))
            smtp = SMTPConfig(**raw.get("smtp", {}))
            config = cls(hooks, routes, smtp, int(raw.get("queue_size", 1000)),
                         int(raw.get("retries", 4)), float(raw.get("backoff_initial_s", 0.5)),
                         float(raw.get("backoff_max_s", 30.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise NotifyConfigError(f"[notify]: {e}") from e
        for h in hooks:
            if not h.url.startswith(("http://", "https://")) or not h.secret:
                raise NotifyConfigError(f"[notify.webhook] {h.name}: needs an http(s) url and "
                                        "a non-empty secret")
        if routes and not (smtp.starttls or smtp.unsafe_plaintext):
            raise NotifyConfigError("[notify.smtp]: starttls is required; set "
                                    "unsafe_plaintext = true only for a local relay")
        return config


@dataclass(frozen=True)
class Notification:
    kind: str                     # alert | action | case
    event: str                    # e.g. alert.raised, action.kill, case.created
    severity: str
    title: str
    host: str = ""
    time_ns: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"format": "ringfence.notification.v1", "kind": self.kind, "event": self.event,
                "severity": self.severity, "title": self.title, "host": self.host,
                "time_ns": self.time_ns or time.time_ns(), "details": self.details}


def sign_body(secret: bytes, body: bytes) -> str:
    """The signature header value for `body`: receivers recompute and compare in constant time."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def backoff_s(attempt: int, initial: float, maximum: float) -> float:
    return float(min(maximum, initial * (2 ** min(attempt, 30))))


class DeliveryError(Exception):
    """One delivery attempt failed; it may be retried."""


@dataclass
class NotifyStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retried: int = 0


class Notifier:
    """Routes and delivers notifications on a worker thread; also an AlertSink."""

    def __init__(self, config: NotifyConfig,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._config = config
        self._queue: queue.Queue[tuple[str, object, Notification] | None] = queue.Queue(
            config.queue_size)
        self._sleep = sleep
        self.stats = NotifyStats()
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._started = False
        if config.smtp.unsafe_plaintext:
            logger.warning("notify: unsafe_plaintext is set: e-mail may go without TLS")

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._started:
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:
                pass
            self._thread.join(timeout_s)

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued so far was handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    # -- routing ---------------------------------------------------------------------------------
    def publish(self, n: Notification) -> int:
        """Queue `n` for every matching target; returns how many deliveries were queued."""
        rank = severity_rank(n.severity)
        targets: list[tuple[str, object]] = []
        for hook in self._config.webhooks:
            if rank >= severity_rank(hook.min_severity) and (not hook.kinds or
                                                             n.kind in hook.kinds):
                targets.append(("webhook", hook))
        for route in self._config.email:
            if rank >= severity_rank(route.min_severity) and (not route.kinds or
                                                              n.kind in route.kinds):
                targets.append(("email", route))
        queued = 0
        for kind, target in targets:
            try:
                self._queue.put_nowait((kind, target, n))
                queued += 1
            except queue.Full:
                self.stats.dropped += 1
                logger.error("notify: queue full (%d); dropped %s to %s", self._config.queue_size,
                             n.event, getattr(target, "name", "?"))
        return queued

    def alert_raised(self, alert: AlertNotice) -> None:
        self.publish(Notification("alert", "alert.raised", alert.severity,
                                  f"{alert.rule}: {alert.title}", alert.hostname or alert.agent_id,
                                  alert.time_ns, {"alert_id": alert.alert_id, "seq": alert.seq,
                                                  "rule": alert.rule}))

    # -- delivery --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                kind, target, n = item
                self._deliver(kind, target, n)
            finally:
                self._queue.task_done()

    def _deliver(self, kind: str, target: object, n: Notification) -> None:
        name = getattr(target, "name", "?")
        for attempt in range(self._config.retries + 1):
            try:
                if kind == "webhook":
                    assert isinstance(target, Webhook)
                    self._post(target, n)
                else:
                    assert isinstance(target, EmailRoute)
                    self._mail(target, n)
                self.stats.sent += 1
                return
            except DeliveryError as e:
                if attempt == self._config.retries:
                    self.stats.failed += 1
                    logger.error("notify: %s to %s failed after %d attempts: %s", n.event, name,
                                 attempt + 1, e)
                    return
                self.stats.retried += 1
                delay = backoff_s(attempt, self._config.backoff_initial_s,
                                  self._config.backoff_max_s)
                logger.warning("notify: %s to %s failed (%s); retry in %.1f s", n.event, name,
                               e, delay)
                self._sleep(delay)

    @staticmethod
    def _post(hook: Webhook, n: Notification) -> None:
        body = json.dumps(n.payload(), sort_keys=True).encode()
        request = urllib.request.Request(hook.url, data=body, method="POST", headers={
            "Content-Type": "application/json", EVENT_HEADER: n.event,
            SIGNATURE_HEADER: sign_body(hook.secret, body)})
        try:
            with urllib.request.urlopen(request, timeout=hook.timeout_s) as response:
                if not 200 <= response.status < 300:
                    raise DeliveryError(f"HTTP {response.status}")
        except urllib.error.HTTPError as e:
            raise DeliveryError(f"HTTP {e.code}") from e
        except (urllib.error.URLError, OSError) as e:
            raise DeliveryError(str(getattr(e, "reason", e))) from e

    def _mail(self, route: EmailRoute, n: Notification) -> None:
        smtp = self._config.smtp
        fields = {"kind": n.kind, "event": n.event, "severity": n.severity, "title": n.title,
                  "host": n.host or "-",
                  "time": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                        time.gmtime((n.time_ns or time.time_ns()) / 1e9)),
                  "details": json.dumps(n.details, indent=2, sort_keys=True)}
        message = EmailMessage()
        message["From"] = smtp.sender
        message["To"] = ", ".join(route.to)
        message["Subject"] = string.Template(smtp.subject_template).safe_substitute(fields)
        message.set_content(string.Template(smtp.body_template).safe_substitute(fields))
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s) as client:
                if smtp.starttls:
                    context = ssl.create_default_context(cafile=smtp.ca_file or None)
                    client.starttls(context=context)
                elif smtp.unsafe_plaintext:
                    logger.warning("notify: sending e-mail to %s WITHOUT TLS (unsafe_plaintext)",
                                   smtp.host)
                if smtp.username:
                    client.login(smtp.username, smtp.password)
                client.send_message(message)
        except (smtplib.SMTPException, OSError, ssl.SSLError) as e:
            raise DeliveryError(f"SMTP {smtp.host}:{smtp.port}: {type(e).__name__}: {e}") from e
