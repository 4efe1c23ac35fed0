"""Targeted containment requests: turn a responder's kill / quarantine / block / lock-user
request into the parameters of one signed command, checked on the server first.

For kill, the process identity (start time, executable) comes from the host's stored launch
event for that pid unless the responder gives it; without one the request is refused, so the
agent can always refuse a reused pid. For block, domains are resolved here (never on the
compromised host), and addresses that would cut the agent off from its collector are refused.
Authorization, audit and signing are server.admin's; the agent does the work.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector.store.base import CommandRow, Store
from isolation.block import normalize_networks
from isolation.errors import PolicyError
from server.admin import Actor, Admin, InvalidRequest, resolve
from server.codec import parse_event

logger = logging.getLogger(__name__)

MAX_BLOCK_NETWORKS = 1000        # keeps the signed command under the agent's 64 KiB limit
MAX_PROCESS_SCAN = 500_000
MAX_USER = 32


@dataclass(frozen=True)
class KillSpec:
    pid: int
    tree: bool = False
    start_time_ns: int = 0
    exe: str = ""


@dataclass(frozen=True)
class LaunchIdentity:
    start_time_ns: int
    exe: str
    seq: int                     # the launch event it came from (0: given by the responder)


def launch_identity(store: Store, agent_id: str, pid: int) -> LaunchIdentity | None:
    """The identity of `pid` from the host's latest stored process event naming it; None when
    there is none or the latest says the process exited."""
    found: LaunchIdentity | None = None
    for row in store.query_events(agent_id, kind="process", limit=MAX_PROCESS_SCAN):
        activity = parse_event(row.data).process
        if activity.process.pid != pid:
            continue
        if activity.activity_id == 1 and activity.process.start_time_ns:
            found = LaunchIdentity(activity.process.start_time_ns,
                                   activity.process.exe.decode("utf-8", "surrogateescape"),
                                   row.seq)
        elif activity.activity_id == 2:
            found = None
    return found


class Containment:
    """Builds and issues containment commands; optional `link` ties each to a case."""

    def __init__(self, admin: Admin, store: Store,
                 link: Callable[[Actor, str, str, str, dict[str, Any]], object] | None = None,
                 require_case: Callable[[str], None] | None = None,
                 resolver: Callable[[str], list[str]] = resolve,
                 on_action: Callable[[Actor, CommandRow, str], None] | None = None) -> None:
        self._admin = admin
        self._on_action = on_action
        self._resolve = resolver
        self._store = store
        self._link = link
        self._require_case = require_case

    def authorize(self, actor: Actor, action: str, host: str, reason: str) -> None:
        """Check the actor's role for `action` (audited when denied) before any validation."""
        self._admin.authorize(actor, action, host, reason)

    def _issue(self, actor: Actor, action: str, host: str, reason: str,
               params: dict[str, object], case_id: str) -> CommandRow:
        if case_id and self._require_case is not None:
            self._require_case(case_id)
        row = self._admin.issue_command(actor, action, host, reason,
                                        {**params, "reason": reason})
        if case_id and self._link is not None:
            self._link(actor, case_id, "command", row.command_id,
                       {"action": action, "agent_id": row.agent_id, "reason": reason})
        if self._on_action is not None:
            self._on_action(actor, row, case_id)
        return row

    def kill(self, actor: Actor, host: str, reason: str, spec: KillSpec,
             case_id: str = "") -> CommandRow:
        if not reason.strip():
            self._admin.audit(actor, "kill", host, reason, "refused: no reason given")
            raise InvalidRequest("kill needs a --reason: it goes into the audit log")
        self._admin.authorize(actor, "kill", host, reason)
        if spec.pid <= 1:
            raise InvalidRequest(f"pid {spec.pid} cannot be killed")
        start, exe, seq = spec.start_time_ns, spec.exe, 0
        if not start or not exe:
            agent = self._admin.find_host(host)
            known = launch_identity(self._store, agent.agent_id, spec.pid)
            if known is None and not (start or exe):
                raise InvalidRequest(
                    f"no stored launch event for pid {spec.pid} on {host} (or it has exited): "
                    "give --start-time and --exe so the agent can check it is the same process")
            if known is not None:
                start, exe, seq = start or known.start_time_ns, exe or known.exe, known.seq
        return self._issue(actor, "kill", host, reason,
                           {"pid": spec.pid, "tree": spec.tree, "start_time_ns": start,
                            "exe": exe, "launch_seq": seq}, case_id)

    def quarantine(self, actor: Actor, host: str, reason: str, path: str,
                   case_id: str = "") -> CommandRow:
        if not path.startswith("/") or "\0" in path:
            raise InvalidRequest("quarantine needs an absolute path")
        return self._issue(actor, "quarantine", host, reason, {"path": path}, case_id)

    def unquarantine(self, actor: Actor, host: str, reason: str, quarantine_id: str,
                     case_id: str = "") -> CommandRow:
        if not quarantine_id or not all(c in "0123456789abcdef" for c in quarantine_id):
            raise InvalidRequest("give the quarantine id the quarantine command reported")
        return self._issue(actor, "unquarantine", host, reason,
                           {"quarantine_id": quarantine_id}, case_id)

    def block(self, actor: Actor, host: str, reason: str, ips: list[str], domains: list[str],
              case_id: str = "") -> CommandRow:
        resolved: dict[str, list[str]] = {}
        for name in domains:
            addresses = self._resolve(name)
            if not addresses:
                raise InvalidRequest(f"{name} does not resolve on the server; block its "
                                     "addresses with --ip instead")
            resolved[name] = addresses
        wanted = list(ips) + [a for addrs in resolved.values() for a in addrs]
        try:
            networks = normalize_networks(wanted)
        except PolicyError as e:
            raise InvalidRequest(f"cannot block: {e}") from e
        if len(networks) > MAX_BLOCK_NETWORKS:
            raise InvalidRequest(f"at most {MAX_BLOCK_NETWORKS} networks per block command")
        self._refuse_collector(networks)
        return self._issue(actor, "block", host, reason,
                           {"networks": list(networks), "ips": list(ips),
                            "domains": resolved}, case_id)

    def _refuse_collector(self, networks: tuple[str, ...]) -> None:
        collectors = {a for host, _ in self._admin.collector_endpoints for a in resolve(host)}
        for text in networks:
            net = ipaddress.ip_network(text, strict=False)
            for address in collectors:
                ip = ipaddress.ip_address(address)
                if ip.version == net.version and ip in net:
                    raise InvalidRequest(f"{text} contains the collector address {address}: "
                                         "blocking it would cut the agent off")

    def unblock(self, actor: Actor, host: str, reason: str, case_id: str = "") -> CommandRow:
        return self._issue(actor, "unblock", host, reason, {}, case_id)

    def lock_user(self, actor: Actor, host: str, reason: str, user: str, kill_sessions: bool,
                  case_id: str = "") -> CommandRow:
        _check_user(user)
        return self._issue(actor, "lock_user", host, reason,
                           {"user": user, "kill_sessions": kill_sessions}, case_id)

    def unlock_user(self, actor: Actor, host: str, reason: str, user: str,
                    case_id: str = "") -> CommandRow:
        _check_user(user)
        return self._issue(actor, "unlock_user", host, reason, {"user": user}, case_id)


def _check_user(user: str) -> None:
    if not user or len(user) > MAX_USER or user in ("root",) or ":" in user or "/" in user:
        raise InvalidRequest(f"{user!r} cannot be locked: give a local user name (not root)")
