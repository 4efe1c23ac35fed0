"""Signed commands to agents: building, signing, queueing, delivering and tracking them.

A command is a DSSE envelope (payloadType `application/vnd.ringfence.command.v1+json`) signed
by the server's command key, naming its target agent, a random nonce id, issue and expiry times
and a per-agent sequence number. This module issues and tracks commands; it does not decide who
may issue them (server.admin does) and it does not execute them (the agent does).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.rpc import AgentSession, SessionRegistry
from collector.store.base import CommandRow, Conflict, Store
from evidence.dsse import COMMAND_TYPE, sign_envelope

logger = logging.getLogger(__name__)

COMMAND_FORMAT = "ringfence.command.v1"
DEFAULT_EXPIRY_S = 3600
# Another collector node may take the same per-agent seq at the same moment (the store's unique
# constraint says so with Conflict); re-sign with the next seq this many times at most.
ISSUE_ATTEMPTS = 20
FINAL_STATUSES = frozenset({"succeeded", "failed", "rejected", "expired"})


def command_payload(command_id: str, agent_id: str, seq: int, action: str,
                    params: Mapping[str, Any], issued_ns: int, expires_ns: int) -> bytes:
    """Canonical JSON of a command (sorted keys, compact)."""
    return json.dumps(
        {"format": COMMAND_FORMAT, "command_id": command_id, "agent_id": agent_id, "seq": seq,
         "action": action, "params": dict(params), "issued_ns": issued_ns,
         "expires_ns": expires_ns},
        sort_keys=True, separators=(",", ":")).encode()


class CommandQueue:
    """Issues commands, delivers them to live sessions, and lets callers wait for results."""

    def __init__(self, store: Store, registry: SessionRegistry, key: Ed25519PrivateKey) -> None:
        self._store = store
        self._registry = registry
        self._key = key
        self._changed = threading.Condition()
        # Sequence numbers are per agent and must never repeat, even under concurrent issue:
        # this lock orders issuers in this process, the store's constraint those of all nodes.
        self._issue_lock = threading.Lock()
        # deliver() runs from issue() and from cross-node notifications; one at a time, so a
        # pending command is sent once.
        self._deliver_lock = threading.Lock()
        # Commands sent to an agent on this node and not finally answered yet (agent id ->
        # command id -> expiry); read on the collector's event loop, so kept in memory.
        self._awaiting: dict[str, dict[str, int]] = {}
        self._awaiting_lock = threading.Lock()

    def issue(self, agent_id: str, action: str, params: Mapping[str, Any], actor: str,
              reason: str, expires_s: int = DEFAULT_EXPIRY_S) -> CommandRow:
        now = time.time_ns()
        with self._issue_lock:
            for attempt in range(ISSUE_ATTEMPTS):
                seq = self._store.next_command_seq(agent_id)
                command_id = secrets.token_hex(16)
                expires_ns = now + expires_s * 1_000_000_000
                envelope = sign_envelope(
                    COMMAND_TYPE,
                    command_payload(command_id, agent_id, seq, action, params, now, expires_ns),
                    self._key)
                row = CommandRow(command_id, agent_id, seq, action, envelope, "pending", "",
                                 "{}", now, expires_ns, now, actor, reason)
                try:
                    self._store.add_command(row)
                    break
                except Conflict:
                    if attempt == ISSUE_ATTEMPTS - 1:
                        raise
                    logger.info("command seq %d of agent %s was taken by another node; "
                                "re-signing with the next", seq, agent_id)
        logger.info("command %s (%s) issued for agent %s by %s", command_id, action, agent_id,
                    actor)
        self.deliver(agent_id)
        return self._store.get_command(command_id)

    def deliver(self, agent_id: str) -> None:
        """Send every pending command of an agent if it is connected; the rest wait."""
        session = self._registry.get(agent_id)
        if session is None:
            return
        with self._deliver_lock:
            for row in self._store.open_commands(agent_id, time.time_ns()):
                if row.status == "pending":
                    self._send(session, row)

    def redeliver(self, agent_id: str) -> None:
        """On reconnect: re-send commands the agent has not answered (it drops duplicates)."""
        session = self._registry.get(agent_id)
        if session is None:
            return
        with self._deliver_lock:
            for row in self._store.open_commands(agent_id, time.time_ns()):
                if row.status == "pending":
                    self._send(session, row)
                elif row.status == "sent" and session.send_command(row.envelope):
                    self._await(row)

    def _send(self, session: AgentSession, row: CommandRow) -> None:
        # Marked sent before it is queued: a fast agent's answer ("succeeded") must never be
        # overwritten by a late "sent".
        self.update(row.command_id, "sent", "delivered to the agent", row.detail_json)
        if session.send_command(row.envelope):
            self._await(row)
        else:
            self.update(row.command_id, "pending", "", row.detail_json)

    def _await(self, row: CommandRow) -> None:
        with self._awaiting_lock:
            self._awaiting.setdefault(row.agent_id, {})[row.command_id] = row.expires_ns

    def answered(self, agent_id: str, command_id: str, status: str) -> None:
        """The agent answered a command; a final answer ends the wait for it."""
        if status in FINAL_STATUSES:
            with self._awaiting_lock:
                waiting = self._awaiting.get(agent_id)
                if waiting is not None:
                    waiting.pop(command_id, None)
                    if not waiting:
                        del self._awaiting[agent_id]

    def awaiting_answer(self, agent_id: str) -> bool:
        """Whether a command sent to the agent from this node, not expired, awaits its final
        answer (the collector does not hold such an agent's stream: responders wait for it)."""
        now = time.time_ns()
        with self._awaiting_lock:
            waiting = self._awaiting.get(agent_id)
            if not waiting:
                return False
            for command_id in [c for c, expires_ns in waiting.items() if expires_ns <= now]:
                del waiting[command_id]
            return bool(waiting)

    def update(self, command_id: str, status: str, message: str, detail_json: str) -> None:
        self._store.update_command(command_id, status, message, detail_json, time.time_ns())
        with self._changed:
            self._changed.notify_all()

    def wait(self, command_id: str, until: frozenset[str], timeout_s: float) -> CommandRow:
        """Block until the command reaches one of `until` (or a final status) or time runs out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                row = self._store.get_command(command_id)
                if row.status in until or row.status in FINAL_STATUSES:
                    return row
                if row.expires_ns <= time.time_ns():
                    self.update(command_id, "expired", "the agent did not answer before expiry",
                                row.detail_json)
                    return self._store.get_command(command_id)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return row
                self._changed.wait(min(remaining, 0.5))
