"""Automatic response playbooks: opt-in reactions to alerts (collect triage, isolate, kill the
matching process), with safeguards.

A playbook names the host group it covers (hostname globs), the alerts it reacts to (rule
names and/or a minimum severity) and its actions. Safeguards, checked for every alert: hosts
on the `never` list are never acted on automatically; a global rate limit caps automatic
actions per hour; a kill needs the alert to name a process. Every action runs through
server.admin as the actor `playbook:<name>` (role responder), so it is signed, audited and
attributed like a responder's; every skip is audited too. Alerts are handled on a worker
thread behind a bounded queue, so the detection engine is never blocked.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.admin import Actor, Admin, AdminError
from server.alerting import AlertNotice, severity_rank
from server.containment import Containment, KillSpec

logger = logging.getLogger(__name__)

ACTIONS = ("triage", "isolate", "kill")
QUEUE_SIZE = 1000


class PlaybookConfigError(ValueError):
    """A playbook definition is invalid; the message names the playbook and key."""


@dataclass(frozen=True)
class Playbook:
    name: str
    actions: tuple[str, ...]
    hosts: tuple[str, ...] = ("*",)          # hostname / agent id globs (the host group)
    rules: tuple[str, ...] = ()              # rule names; empty = any rule
    min_severity: str = "high"
    enabled: bool = True

    def matches(self, alert: AlertNotice) -> bool:
        if not self.enabled or severity_rank(alert.severity) < severity_rank(self.min_severity):
            return False
        # Rules are named by id or by title, whichever the operator wrote.
        if self.rules and alert.rule not in self.rules and alert.title not in self.rules:
            return False
        return _matches_any(self.hosts, alert)


@dataclass(frozen=True)
class PlaybookConfig:
    playbooks: tuple[Playbook, ...] = ()
    never: tuple[str, ...] = ()              # hosts never acted on automatically (globs)
    max_actions_per_hour: int = 20

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PlaybookConfig:
        books = []
        for entry in raw.get("playbook", []):
            name = str(entry.get("name", "")).strip()
            if not name:
                raise PlaybookConfigError("[[playbooks.playbook]] needs a name")
            actions = tuple(str(a) for a in entry.get("actions", ()))
            bad = [a for a in actions if a not in ACTIONS]
            if not actions or bad:
                raise PlaybookConfigError(f"playbook {name}: actions must be some of "
                                          f"{', '.join(ACTIONS)} (got {list(actions)})")
            books.append(Playbook(name, actions, tuple(entry.get("hosts", ("*",))),
                                  tuple(entry.get("rules", ())),
                                  str(entry.get("min_severity", "high")),
                                  bool(entry.get("enabled", True))))
        limit = int(raw.get("max_actions_per_hour", 20))
        if limit < 0:
            raise PlaybookConfigError("max_actions_per_hour must be >= 0")
        return cls(tuple(books), tuple(raw.get("never", ())), limit)


def _matches_any(patterns: tuple[str, ...], alert: AlertNotice) -> bool:
    names = [n for n in (alert.hostname, alert.agent_id) if n]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


class PlaybookEngine:
    """An AlertSink that runs matching playbooks with safeguards."""

    def __init__(self, config: PlaybookConfig, admin: Admin, containment: Containment,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._admin = admin
        self._containment = containment
        self._clock = clock
        self._recent: collections.deque[float] = collections.deque()
        self._queue: queue.Queue[AlertNotice | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="playbooks", daemon=True)
        self._started = False

    def start(self) -> None:
        if self._config.playbooks and not self._started:
            self._started = True
            self._thread.start()

    def stop(self) -> None:
        if self._started:
            self._queue.put(None)
            self._thread.join(5)

    def drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def alert_raised(self, alert: AlertNotice) -> None:
        if not self._config.playbooks:
            return
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            logger.error("playbooks: queue full; alert %s gets no automatic response",
                         alert.alert_id)

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            try:
                if alert is None:
                    return
                self.handle(alert)
            except Exception:
                logger.exception("playbooks: handling alert failed")
            finally:
                self._queue.task_done()

    def _allow_one(self) -> bool:
        now = self._clock()
        while self._recent and now - self._recent[0] >= 3600:
            self._recent.popleft()
        if len(self._recent) >= self._config.max_actions_per_hour:
            return False
        self._recent.append(now)
        return True

    def handle(self, alert: AlertNotice) -> list[str]:
        """Run every matching playbook for `alert`; returns the outcome of each action."""
        outcomes: list[str] = []
        for book in self._config.playbooks:
            if not book.matches(alert):
                continue
            actor = Actor(f"playbook:{book.name}", "responder")
            named = f"{alert.title} [{alert.rule}]" if alert.title else alert.rule
            reason = f"playbook {book.name}: alert {alert.alert_id} ({named}, {alert.severity})"
            host = alert.agent_id
            if _matches_any(self._config.never, alert):
                self._admin.audit(actor, "playbook", host, reason,
                                  "skipped: host is on the never-act-automatically list")
                outcomes.append(f"{book.name}: skipped (protected host)")
                continue
            for action in book.actions:
                if not self._allow_one():
                    self._admin.audit(actor, action, host, reason,
                                      f"skipped: rate limit of "
                                      f"{self._config.max_actions_per_hour} automatic actions "
                                      "per hour reached")
                    outcomes.append(f"{book.name}: {action} rate-limited")
                    continue
                try:
                    outcomes.append(f"{book.name}: {action} " + self._act(actor, action, host,
                                                                          reason, alert))
                except AdminError as e:
                    self._admin.audit(actor, action, host, reason, f"failed: {e}")
                    outcomes.append(f"{book.name}: {action} failed: {e}")
        return outcomes

    def _act(self, actor: Actor, action: str, host: str, reason: str,
             alert: AlertNotice) -> str:
        if action == "triage":
            return "issued " + self._admin.triage(actor, host, reason).command_id
        if action == "isolate":
            return "issued " + self._admin.isolate(actor, host, reason, [], [], True, 20,
                                                   3600).command_id
        if not alert.pid:
            self._admin.audit(actor, "kill", host, reason,
                              "skipped: the alert names no process")
            return "skipped (no process in the alert)"
        return "issued " + self._containment.kill(actor, host, reason,
                                                  KillSpec(alert.pid)).command_id
