"""Verifying signed commands from the server before the agent acts on any of them.

A command must carry a valid DSSE signature by the pinned server command key (checked before
anything is parsed), name this agent, be unexpired, and have a sequence number above every
command already executed; a command id seen before is a replay. It does not execute commands.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.state import write_atomic
from evidence.dsse import COMMAND_TYPE, verify_envelope
from evidence.errors import EvidenceError

logger = logging.getLogger(__name__)

COMMAND_FORMAT = "ringfence.command.v1"
REMEMBERED_RESULTS = 64
MAX_COMMAND_BYTES = 64 * 1024
CLOCK_SKEW_NS = 300 * 1_000_000_000


class CommandRejected(Exception):
    """The command must not be executed; `reason` is reported to the server and recorded."""

    def __init__(self, reason: str, command_id: str = "", seq: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.seq = seq


@dataclass(frozen=True)
class Command:
    command_id: str
    agent_id: str
    seq: int
    action: str
    params: dict[str, Any]
    issued_ns: int
    expires_ns: int


@dataclass(frozen=True)
class PriorResult:
    status: str
    message: str
    detail_json: str


class CommandGate:
    """Verifies commands and remembers which were executed (persisted under the state dir)."""

    def __init__(self, agent_id: str, server_key: Ed25519PublicKey, state_file: Path,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._agent_id = agent_id
        self._server_key = server_key
        self._file = state_file
        self._clock = clock
        self._last_seq = 0
        self._results: dict[str, PriorResult] = {}
        if state_file.exists():
            raw = json.loads(state_file.read_text())
            self._last_seq = int(raw["last_seq"])
            self._results = {k: PriorResult(**v) for k, v in raw["results"].items()}

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def prior_result(self, command_id: str) -> PriorResult | None:
        """The result of a command already executed (a redelivery, answered again)."""
        return self._results.get(command_id)

    def verify(self, envelope: bytes) -> Command:
        """Return the verified command or raise CommandRejected saying why."""
        try:
            verified = verify_envelope(envelope, COMMAND_TYPE, [self._server_key],
                                       max_size=MAX_COMMAND_BYTES)
        except EvidenceError as e:
            raise CommandRejected(f"signature check failed: {e}") from e
        try:
            raw = json.loads(verified.payload)
            command = Command(str(raw["command_id"]), str(raw["agent_id"]), int(raw["seq"]),
                              str(raw["action"]), dict(raw["params"]), int(raw["issued_ns"]),
                              int(raw["expires_ns"]))
            if raw.get("format") != COMMAND_FORMAT:
                raise ValueError(f"unknown format {raw.get('format')!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise CommandRejected(f"malformed command: {e}") from e
        if command.agent_id != self._agent_id:
            raise CommandRejected("addressed to another agent", command.command_id, command.seq)
        now = self._clock()
        if command.expires_ns <= now:
            raise CommandRejected("expired", command.command_id, command.seq)
        if command.issued_ns > now + CLOCK_SKEW_NS:
            raise CommandRejected("issued in the future (clock skew?)", command.command_id,
                                  command.seq)
        if command.command_id in self._results:
            raise CommandRejected("replayed: this command id was already executed",
                                  command.command_id, command.seq)
        if command.seq <= self._last_seq:
            raise CommandRejected(f"out of sequence: seq {command.seq} is not above the last "
                                  f"executed {self._last_seq} (replay?)", command.command_id,
                                  command.seq)
        return command

    def mark_started(self, command: Command) -> None:
        """Persist that `command` runs, before it has any effect, so it can never run twice."""
        self._last_seq = command.seq
        self._results[command.command_id] = PriorResult("accepted", "started", "{}")
        self._save()

    def mark_done(self, command: Command, status: str, message: str, detail_json: str) -> None:
        self.finish(command.command_id, status, message, detail_json)

    def finish(self, command_id: str, status: str, message: str, detail_json: str) -> None:
        """Persist the final result of a started command (answered again on redelivery)."""
        self._results[command_id] = PriorResult(status, message, detail_json)
        while len(self._results) > REMEMBERED_RESULTS:
            self._results.pop(next(iter(self._results)))
        self._save()

    def _save(self) -> None:
        write_atomic(self._file, json.dumps(
            {"last_seq": self._last_seq,
             "results": {k: v.__dict__ for k, v in self._results.items()}}).encode())
