"""Responder actions: role checks, the audit trail, and what each admin call does.

Every call names its actor (from the verified responder certificate), is checked against the
actor's role, and is appended to the hash-chained audit log whether allowed, denied or failed.
It is transport-free: server.rpc translates to and from gRPC.

Exceptions:

    AdminError              root
    +-- PermissionDenied    the actor's role does not allow the action
    +-- InvalidRequest      the request is malformed (bad CIDR, empty reason, unknown host)
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collector.rpc import SessionRegistry
from collector.store.base import (
    GENESIS_AUDIT,
    AgentRecord,
    AuditRow,
    CommandRow,
    EventRow,
    IntegrityAlertRow,
    NotFound,
    Store,
    audit_record_hash,
)
from isolation import Policy, PolicyError
from isolation.policy import POLICY_VERSION
from server.commands import CommandQueue

if TYPE_CHECKING:
    from server.detection.service import DetectionAdmin

logger = logging.getLogger(__name__)

ROLES = ("viewer", "responder", "admin")
# The least role each action needs.
REQUIRED_ROLE = {
    "list_hosts": "viewer",
    "query_events": "viewer",
    "integrity": "viewer",
    "get_command": "viewer",
    "console_login": "viewer",
    "list_alerts": "viewer",
    "isolate": "responder",
    "release": "responder",
    "collect": "responder",
    "triage": "responder",
    "create_bundle": "responder",
    "update_alert": "responder",
    "hunt": "responder",
    "list_audit": "admin",
    "revoke_agent": "admin",
    # Incident workflow: targeted containment (server.containment), cases, root cause.
    "kill": "responder",
    "quarantine": "responder",
    "unquarantine": "responder",
    "block": "responder",
    "unblock": "responder",
    "lock_user": "responder",
    "unlock_user": "responder",
    "case_view": "viewer",
    "case_edit": "responder",
    "story": "viewer",
}
MAX_REASON = 1024
MAX_QUERY_LIMIT = 100_000


class AdminError(Exception):
    """Root of responder-facing errors."""


class PermissionDenied(AdminError):
    def __init__(self, actor: str, role: str, action: str) -> None:
        super().__init__(f"{actor} ({role}) may not {action}; it needs the "
                         f"{REQUIRED_ROLE.get(action, 'admin')} role")
        self.actor = actor
        self.role = role
        self.action = action


class InvalidRequest(AdminError):
    pass


@dataclass(frozen=True)
class Actor:
    name: str
    role: str


@dataclass(frozen=True)
class HostView:
    agent: AgentRecord
    online: bool
    last_seq: int
    integrity_alerts: int


@dataclass(frozen=True)
class AllowSpec:
    cidr: str
    protocol: str
    port: int
    direction: str


def verify_audit(rows: list[AuditRow], head: tuple[int, bytes] | None) -> None:
    """Recompute the audit chain and compare its end with the recorded head; raise
    InvalidRequest naming the first bad record (edited, deleted, or cut off the end)."""
    prev = GENESIS_AUDIT
    expected_seq = 1
    for row in rows:
        if row.seq != expected_seq:
            raise InvalidRequest(f"audit record {expected_seq} is missing (found {row.seq})")
        if row.prev_hash != prev:
            raise InvalidRequest(f"audit record {row.seq} does not link to record {row.seq - 1}")
        digest = audit_record_hash(prev, row.seq, row.time_ns, row.actor, row.role, row.action,
                                   row.target, row.reason, row.outcome)
        if digest != row.hash:
            raise InvalidRequest(f"audit record {row.seq} was altered after it was written")
        prev = row.hash
        expected_seq += 1
    last = (rows[-1].seq, rows[-1].hash) if rows else None
    if last != head:
        if head is None:
            raise InvalidRequest("the audit head record is missing: the log was tampered with")
        raise InvalidRequest(f"the audit log ends at record {last[0] if last else 0} but record "
                             f"{head[0]} was written: records were deleted from the end")


class Admin:
    """The admin API's logic, shared by the gRPC service and the web console."""

    # Alerts and hunts (server.detection.service); attached by the composition root.
    detection: DetectionAdmin | None = None

    def __init__(self, store: Store, registry: SessionRegistry, commands: CommandQueue,
                 collector_endpoints: list[tuple[str, int]]) -> None:
        self._store = store
        self._registry = registry
        self._commands = commands
        self._collector_endpoints = collector_endpoints

    # -- authorization and audit ----------------------------------------------------------------
    def authorize(self, actor: Actor, action: str, target: str = "", reason: str = "") -> None:
        needed = REQUIRED_ROLE[action]
        allowed = actor.role in ROLES and ROLES.index(actor.role) >= ROLES.index(needed)
        if not allowed:
            self.audit(actor, action, target, reason, "denied")
            logger.warning("denied %s to %s (%s) on %r", action, actor.name, actor.role, target)
            raise PermissionDenied(actor.name, actor.role, action)

    def audit(self, actor: Actor, action: str, target: str, reason: str, outcome: str) -> AuditRow:
        return self._store.append_audit(time.time_ns(), actor.name, actor.role, action, target,
                                        reason[:MAX_REASON], outcome)

    # -- queries --------------------------------------------------------------------------------
    def list_hosts(self, actor: Actor) -> list[HostView]:
        self.authorize(actor, "list_hosts")
        online = self._registry.online()
        counts = self._store.alert_counts()
        return [HostView(a, a.agent_id in online, self._store.chain_state(a.agent_id).last_seq,
                         counts.get(a.agent_id, 0)) for a in self._store.list_agents()]

    def find_host(self, host: str) -> AgentRecord:
        try:
            return self._store.find_agent(host)
        except NotFound as e:
            raise InvalidRequest(str(e)) from e

    def query_events(self, actor: Actor, host: str, since_ns: int, until_ns: int, kind: str,
                     limit: int, after_seq: int) -> Iterator[EventRow]:
        self.authorize(actor, "query_events", host)
        agent = self.find_host(host)
        limit = min(limit or 1000, MAX_QUERY_LIMIT)
        return self._store.query_events(agent.agent_id, since_ns, until_ns, kind, limit, after_seq)

    def integrity(self, actor: Actor, host: str) -> list[IntegrityAlertRow]:
        self.authorize(actor, "integrity", host)
        agent_id = self.find_host(host).agent_id if host else None
        return self._store.alerts(agent_id)

    def get_command(self, actor: Actor, command_id: str) -> CommandRow:
        self.authorize(actor, "get_command", command_id)
        try:
            return self._store.get_command(command_id)
        except NotFound as e:
            raise InvalidRequest(str(e)) from e

    def list_audit(self, actor: Actor) -> tuple[list[AuditRow], str]:
        self.authorize(actor, "list_audit")
        rows = self._store.audit_rows()
        try:
            verify_audit(rows, self._store.audit_head())
            return rows, ""
        except InvalidRequest as e:
            return rows, str(e)

    # -- actions --------------------------------------------------------------------------------
    def revoke_agent(self, actor: Actor, host: str, reason: str) -> tuple[str, bool]:
        """Revoke an agent: its certificate is refused from now on and a live session ends.

        Returns the agent id and whether a live session was closed.
        """
        if not reason.strip():
            self.audit(actor, "revoke_agent", host, reason, "refused: no reason given")
            raise InvalidRequest("revoking an agent needs a --reason: it goes into the audit log")
        self.authorize(actor, "revoke_agent", host, reason)
        try:
            agent = self.find_host(host)
        except InvalidRequest:
            self.audit(actor, "revoke_agent", host, reason, "failed: unknown host")
            raise
        self._store.revoke_agent(agent.agent_id)
        session = self._registry.get(agent.agent_id)
        if session is not None:
            session.revoke()
        self.audit(actor, "revoke_agent", agent.agent_id, reason,
                   "allowed: revoked" + (", live session closed" if session else ""))
        logger.warning("agent %s revoked by %s", agent.agent_id, actor.name)
        return agent.agent_id, session is not None

    def _command(self, actor: Actor, action: str, host: str, reason: str,
                 params: dict[str, object], expires_s: int = 3600) -> CommandRow:
        if not reason.strip():
            self.audit(actor, action, host, reason, "refused: no reason given")
            raise InvalidRequest(f"{action} needs a --reason: it goes into the audit log")
        self.authorize(actor, action, host, reason)
        try:
            agent = self.find_host(host)
        except InvalidRequest:
            self.audit(actor, action, host, reason, "failed: unknown host")
            raise
        row = self._commands.issue(agent.agent_id, action, params, actor.name, reason, expires_s)
        self.audit(actor, action, agent.agent_id, reason,
                   f"allowed: issued command {row.command_id}")
        return row

    def issue_command(self, actor: Actor, action: str, host: str, reason: str,
                      params: dict[str, object], expires_s: int = 3600) -> CommandRow:
        """Issue a signed command: reason required, role checked, audited like every command."""
        return self._command(actor, action, host, reason, params, expires_s)

    @property
    def collector_endpoints(self) -> list[tuple[str, int]]:
        return list(self._collector_endpoints)

    def isolate(self, actor: Actor, host: str, reason: str, allow: list[AllowSpec],
                dns: list[str], dhcp: bool, confirm_deadline_s: int,
                expires_s: int) -> CommandRow:
        policy = self.isolation_policy(allow, dns, dhcp, confirm_deadline_s)
        row = self._command(actor, "isolate", host, reason, {"policy": policy,
                                                            "reason": reason}, expires_s or 3600)
        self._store.set_isolation(row.agent_id, "pending", reason, time.time_ns())
        return row

    def release(self, actor: Actor, host: str, reason: str) -> CommandRow:
        row = self._command(actor, "release", host, reason, {"reason": reason})
        self._store.set_isolation(row.agent_id, "releasing", reason, time.time_ns())
        return row

    def collect(self, actor: Actor, host: str, paths: list[str], reason: str) -> CommandRow:
        if not paths:
            raise InvalidRequest("collect needs at least one path")
        if any(not p.startswith("/") for p in paths):
            raise InvalidRequest("collect paths must be absolute")
        return self._command(actor, "collect", host, reason or "file collection",
                             {"paths": paths})

    def triage(self, actor: Actor, host: str, reason: str) -> CommandRow:
        return self._command(actor, "triage", host, reason or "triage snapshot", {})

    def isolation_policy(self, allow: list[AllowSpec], dns: list[str], dhcp: bool,
                         confirm_deadline_s: int) -> dict[str, object]:
        """The policy pushed to the agent: collector addresses resolved here, never there."""
        collectors: list[dict[str, object]] = []
        for host, port in self._collector_endpoints:
            for address in resolve(host):
                entry: dict[str, object] = {"address": address, "port": port, "protocol": "tcp"}
                if entry not in collectors:
                    collectors.append(entry)
        if not collectors:
            raise InvalidRequest("no collector address is known: start the server with "
                                 "--advertise ADDRESS so isolated agents can still reach it")
        raw = {"version": POLICY_VERSION, "collectors": collectors,
               "dns_resolvers": list(dns), "dhcp": dhcp,
               "allow": [{"cidr": a.cidr, "protocol": a.protocol, "port": a.port,
                          "direction": a.direction} for a in allow],
               "confirm_deadline_s": confirm_deadline_s or 20}
        try:
            # Validated here with the agent's own rules, so a bad policy never leaves the server.
            policy = Policy.from_dict(raw)
        except PolicyError as e:
            raise InvalidRequest(f"isolation policy rejected: {e}") from e
        return policy.to_dict()


def resolve(host: str) -> list[str]:
    """Addresses of `host` (an address stays itself); resolved on the server only."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def command_summary(row: CommandRow) -> dict[str, object]:
    return {"command_id": row.command_id, "agent_id": row.agent_id, "action": row.action,
            "status": row.status, "message": row.message,
            "detail": json.loads(row.detail_json or "{}")}
