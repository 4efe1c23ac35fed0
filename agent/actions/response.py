"""Targeted containment commands (kill, quarantine, unquarantine, block, unblock, lock_user,
unlock_user): parameter checks, the action, and a ResponseActivity event in the chain for
every outcome, success or not.

The executor calls `ResponseActions.run` for the actions in RESPONSE_ACTIONS after the command
was verified; this module does not verify commands and does not talk to the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.actions.errors import ActionError, ActionFailed, ActionRefused
from agent.actions.kill import ProcessIdentity, kill_process
from agent.actions.quarantine import Vault
from agent.actions.users import Accounts
from agent.state import write_atomic
from isolation import IsolationError
from isolation.block import BlockFirewall, plan_block
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

RESPONSE_ACTIONS = frozenset({"kill", "quarantine", "unquarantine", "block", "unblock",
                              "lock_user", "unlock_user"})
BLOCK_STATE = "block.json"


@dataclass(frozen=True)
class ActionResult:
    status: str                  # succeeded | failed
    message: str
    detail: dict[str, Any]


class ResponseActions:
    """Runs containment actions on this host and records each in the chain."""

    def __init__(self, state_dir: Path, record: Callable[[pb.Event], object],
                 netns: str | None = None, max_file_bytes: int = 512 << 20) -> None:
        self._state_dir = state_dir
        self._record = record
        self._vault = Vault(state_dir / "quarantine")
        self._accounts = Accounts(state_dir / "locked-users")
        self._firewall = BlockFirewall(netns)
        self._max_file_bytes = max_file_bytes

    def run(self, command_id: str, action: str, params: dict[str, Any]) -> ActionResult:
        target = _target(action, params)
        try:
            message, detail = self._dispatch(command_id, action, params)
            result = ActionResult("succeeded", message, detail)
            outcome = "succeeded"
        except ActionError as e:
            outcome = "refused" if isinstance(e, ActionRefused) else "failed"
            result = ActionResult("failed", e.message, {**e.detail, "outcome": outcome})
        except IsolationError as e:
            outcome = "failed"
            result = ActionResult("failed", f"firewall: {e}", {"outcome": outcome})
        except (OSError, ValueError, KeyError, TypeError) as e:
            outcome = "failed"
            result = ActionResult("failed", f"{action} failed: {type(e).__name__}: {e}",
                                  {"outcome": outcome})
        self._record(pb.Event(
            severity_id=3 if outcome == "succeeded" else 4,
            response=pb.ResponseActivity(
                command_id=command_id, action=action, target=target, outcome=outcome,
                detail_json=json.dumps({"message": result.message, **result.detail},
                                       sort_keys=True, default=str))))
        return result

    def _dispatch(self, command_id: str, action: str,
                  params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if action == "kill":
            expected = ProcessIdentity(int(params["pid"]), int(params.get("start_time_ns", 0)),
                                       str(params.get("exe", "")))
            report = kill_process(expected, bool(params.get("tree", False)))
            if expected.pid not in report.exited:
                raise ActionFailed(f"pid {expected.pid} was signalled but did not exit",
                                   report.as_dict())
            n = len(report.killed)
            return (f"killed pid {expected.pid} ({report.target.exe})"
                    + (f" and {n - 1} descendants" if n > 1 else ""), report.as_dict())
        if action == "quarantine":
            record = self._vault.quarantine(str(params["path"]), command_id,
                                            self._max_file_bytes)
            return (f"quarantined {record.path} as {record.quarantine_id} "
                    f"(sha256 {record.sha256})", record.summary())
        if action == "unquarantine":
            record = self._vault.restore(str(params["quarantine_id"]))
            return (f"restored {record.path} (sha256 {record.sha256}, owner "
                    f"{record.uid}:{record.gid}, mode {oct(record.mode)})", record.summary())
        if action == "block":
            ruleset = plan_block([str(n) for n in params["networks"]])
            listing = self._firewall.apply(ruleset)
            write_atomic(self._state_dir / BLOCK_STATE, json.dumps(
                {"networks": list(ruleset.networks), "command_id": command_id}).encode())
            return (f"blocking {len(ruleset.networks)} networks",
                    {"networks": list(ruleset.networks), "ruleset_sha256": ruleset.sha256,
                     "ruleset": listing})
        if action == "unblock":
            existed = self._firewall.remove()
            (self._state_dir / BLOCK_STATE).unlink(missing_ok=True)
            return ("block table removed" if existed else "nothing was blocked",
                    {"removed": existed})
        if action == "lock_user":
            detail = self._accounts.lock(str(params["user"]), command_id,
                                         bool(params.get("kill_sessions", False)))
            return f"locked user {params['user']}", detail
        if action == "unlock_user":
            detail = self._accounts.unlock(str(params["user"]))
            return f"unlocked user {params['user']}, restored exactly", detail
        raise ActionRefused(f"unknown containment action {action!r}")

    def resume_from_disk(self) -> list[str]:
        """Re-apply a persisted block table at agent start; returns the networks in force."""
        path = self._state_dir / BLOCK_STATE
        if not path.exists():
            return []
        networks = [str(n) for n in json.loads(path.read_text())["networks"]]
        self._firewall.apply(plan_block(networks))
        return networks


def _target(action: str, params: dict[str, Any]) -> str:
    for key in ("pid", "path", "quarantine_id", "user"):
        if key in params:
            return str(params[key])
    return "indicators" if action in ("block", "unblock") else ""
