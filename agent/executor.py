"""Runs verified commands one at a time, in order, and reports each outcome twice: as a
CommandResult to the server and as a CommandActivity event in the agent's own chain.

Verification is agent.commands'; the actions are agent.actions'. A rejected command (bad
signature, replay, expired, other agent) is reported and recorded, never executed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.actions.collect import collect_file
from agent.actions.isolation import IsolationController, IsolationOutcome
from agent.actions.response import RESPONSE_ACTIONS, ResponseActions
from agent.commands import Command, CommandGate, CommandRejected
from isolation import IsolationError, Policy
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 256


@dataclass(frozen=True)
class Outcome:
    status: str                  # succeeded | failed
    message: str
    detail: dict[str, Any]


class Executor:
    """A single worker thread draining verified commands."""

    def __init__(self, agent_id: str, gate: CommandGate, key: Ed25519PrivateKey,
                 isolation: IsolationController,
                 record: Callable[[pb.Event], int],
                 send_result: Callable[[pb.CommandResult], bool],
                 max_file_bytes: int,
                 send_chunk: Callable[[pb.FileChunk], bool],
                 make_durable: Callable[[], None] | None = None,
                 responses: ResponseActions | None = None) -> None:
        self._agent_id = agent_id
        self._gate = gate
        self._key = key
        self._isolation = isolation
        self._record = record
        self._send_result = send_result
        self._send_chunk = send_chunk
        # Makes recorded events durable (spool fsync) before a final result leaves the agent,
        # so the server never acts on an outcome the agent's chain could lose in a crash.
        self._make_durable = make_durable
        self._max_file_bytes = max_file_bytes
        # Targeted containment (kill, quarantine, block, lock user); None: not offered.
        self._responses = responses
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name="executor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)

    def submit(self, envelope: bytes) -> None:
        """Called by the session for each Command; never blocks the session's reader."""
        try:
            self._queue.put_nowait(envelope)
        except queue.Full:
            logger.error("command queue full: a command was not taken; the server redelivers it")

    def finish_resumed(self, outcome: IsolationOutcome) -> None:
        """Report the outcome of an isolate command whose confirmation was interrupted by an
        agent restart and completed (or reverted) after resuming. Only a command still marked
        started in the gate is reported; anything else was already answered."""
        prior = self._gate.prior_result(outcome.command_id)
        if prior is None or prior.status != "accepted":
            return
        result = _isolation_outcome(outcome, "isolation confirmed after agent restart")
        detail_json = json.dumps(result.detail, sort_keys=True)
        self._gate.finish(outcome.command_id, result.status, result.message, detail_json)
        self._report(outcome.command_id, "isolate", result.status, result.message, result.detail)

    def _run(self) -> None:
        while True:
            envelope = self._queue.get()
            if envelope is None:
                return
            try:
                self._handle(envelope)
            except Exception:
                logger.exception("command handling failed")

    def _report(self, command_id: str, action: str, status: str, message: str,
                detail: dict[str, Any], seq: int = 0) -> None:
        detail_json = json.dumps(detail, sort_keys=True)
        self._record(pb.Event(severity_id=3 if status in ("rejected", "failed") else 1,
                              command=pb.CommandActivity(
                                  command_id=command_id, action=action, outcome=status,
                                  reason=message, command_seq=seq)))
        if self._make_durable is not None and status != "accepted":
            try:
                self._make_durable()
            except Exception:
                logger.exception("could not make the %s record of command %s durable",
                                 status, command_id)
        self._send_result(pb.CommandResult(command_id=command_id, status=status,
                                           message=message, detail_json=detail_json))

    def _handle(self, envelope: bytes) -> None:
        try:
            command = self._gate.verify(envelope)
        except CommandRejected as e:
            prior = self._gate.prior_result(e.command_id) if e.command_id else None
            if prior is not None and prior.status != "accepted":
                # A redelivery of a command we finished: answer again, do not run it again.
                self._send_result(pb.CommandResult(command_id=e.command_id, status=prior.status,
                                                   message=prior.message,
                                                   detail_json=prior.detail_json))
                return
            logger.warning("rejected command %s: %s", e.command_id or "?", e.reason)
            self._report(e.command_id, "", "rejected", e.reason, {}, e.seq)
            return
        self._gate.mark_started(command)
        self._report(command.command_id, command.action, "accepted", "executing", {},
                     command.seq)
        try:
            outcome = self._execute(command)
        except Exception as e:
            logger.exception("command %s (%s) failed", command.command_id, command.action)
            outcome = Outcome("failed", f"agent error: {type(e).__name__}: {e}", {})
        self._gate.mark_done(command, outcome.status, outcome.message,
                             json.dumps(outcome.detail, sort_keys=True))
        self._report(command.command_id, command.action, outcome.status, outcome.message,
                     outcome.detail, command.seq)
        if command.action == "isolate":
            # Volatile state, recorded once the host is contained and the result is out:
            # containment speed comes first, and isolation changes neither the process table
            # nor the local socket table (cut connections stay listed until they time out).
            try:
                _triage_snapshot(command.command_id, self._record)
            except Exception:
                logger.exception("post-isolation triage snapshot failed")

    def _execute(self, command: Command) -> Outcome:
        if command.action == "isolate":
            return self._isolate(command)
        if command.action == "release":
            return _isolation_outcome(self._isolation.release(
                command.command_id, str(command.params.get("reason", ""))), "released")
        if command.action == "collect":
            results = [collect_file(self._agent_id, command.command_id, p.encode(), self._key,
                                    self._send_chunk, self._record, self._max_file_bytes)
                       for p in command.params.get("paths", [])]
            failed = [r for r in results if not r.ok]
            detail = {"files": [r.as_dict() for r in results]}
            if failed and len(failed) == len(results):
                return Outcome("failed", "; ".join(f"{r.path}: {r.error}" for r in failed),
                               detail)
            message = f"collected {len(results) - len(failed)} of {len(results)} files"
            if failed:
                message += "; " + "; ".join(f"{r.path}: {r.error}" for r in failed)
            return Outcome("succeeded", message, detail)
        if command.action == "triage":
            counts = _triage_snapshot(command.command_id, self._record)
            return Outcome("succeeded", "snapshot recorded: " + ", ".join(
                f"{k} {v}" for k, v in counts.items()), {"sections": counts})
        if command.action in RESPONSE_ACTIONS and self._responses is not None:
            result = self._responses.run(command.command_id, command.action, command.params)
            return Outcome(result.status, result.message, result.detail)
        return Outcome("failed", f"unknown action {command.action!r}", {})

    def _isolate(self, command: Command) -> Outcome:
        try:
            policy = Policy.from_dict(command.params.get("policy"))
        except IsolationError as e:
            return Outcome("failed", f"invalid isolation policy: {e}", {})
        outcome = self._isolation.isolate(policy, command.command_id,
                                          str(command.params.get("reason", "")))
        return _isolation_outcome(outcome, "isolation confirmed")


def _isolation_outcome(outcome: IsolationOutcome, success: str) -> Outcome:
    detail = {"state": outcome.state, "ruleset_sha256": outcome.ruleset_sha256,
              "connections_cut": outcome.connections_cut}
    if outcome.ok:
        message = success
        if outcome.connections_cut:
            message += f"; {outcome.connections_cut} connections cut"
        return Outcome("succeeded", message, detail)
    return Outcome("failed", outcome.reason or "isolation failed", detail)


def _triage_snapshot(command_id: str, record: Callable[[pb.Event], int]) -> dict[str, int]:
    """agent.actions.triage, imported on first use: it pulls in psutil (~3 MB resident), which
    the running agent otherwise never needs unless a responder asks for a snapshot."""
    from agent.actions.triage import snapshot

    return snapshot(command_id, record)
