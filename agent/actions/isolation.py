"""Agent-side isolation controller: isolate with confirm-or-revert, release, resume after a
restart, and a drift watcher that re-applies the rules if anything removes or alters them.

It drives an `isolation` backend and persists state under `state_dir`; it does not talk to
the collector: the caller passes `emit` (transitions, to be chained as events) and
`session_healthy` (whether the collector session works through the new rules).

Waiting for confirmation: `isolate()` = `apply_isolation()` + `confirm()`, and blocks at most
the policy's confirm deadline (bounded to 600 s by policy validation). Callers that must not
block call `apply_isolation()` (returns a pending outcome with the rules in force) and then
`confirm()` from a worker thread; `stop()` interrupts a waiting `confirm()`, leaving the
isolation in force exactly like a crash would.

States: none -> pending (rules applied, awaiting confirmation) -> isolated -> releasing ->
none; failed when the last isolation attempt was rolled back. The state file says `pending`
until the collector confirmed the new rules and `isolated` after. After a restart persisted
isolation is re-applied before the agent connects (an agent crash leaves isolation in force);
a confirmed isolation resumes as isolated, but one that crashed while pending resumes as
pending and must pass confirm-or-revert again, so a policy that blocks the collector cannot
lock the responder out across a crash (docs/adr/0003-isolation-resume.md). `wake()` lets the
caller end a confirmation wait early when the session hears from the collector, so
confirmation is event-driven rather than paced by `poll_interval_s`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from isolation import (
    DriftError,
    FirewallBackend,
    IsolationError,
    Policy,
    RuleSet,
    Snapshot,
    StateError,
    StateStoreError,
    plan,
)

logger = logging.getLogger(__name__)

STATE_FILE = "isolation.json"
STATE_VERSION = 1

TRANSITIONS = frozenset(
    {
        "requested",
        "applied",
        "verified",
        "confirmed",
        "drift",
        "restored",
        "released",
        "failed",
        "reapplied",
    }
)
STATES = ("none", "pending", "isolated", "failed", "releasing")


@dataclass(frozen=True)
class IsolationTransition:
    """One step of an isolation's life, for the agent to record as a chained event."""

    transition: str
    command_id: str
    backend: str
    ruleset_sha256: str = ""
    listing: str = ""
    policy_json: str = ""
    reason: str = ""
    connections_cut: int | None = None

    def __post_init__(self) -> None:
        if self.transition not in TRANSITIONS:
            raise ValueError(f"unknown isolation transition {self.transition!r}")


@dataclass(frozen=True)
class IsolationOutcome:
    """The result of isolate/confirm/release/resume: `ok` and the controller state after it."""

    ok: bool
    state: str
    command_id: str
    ruleset_sha256: str = ""
    reason: str = ""
    connections_cut: int | None = None


@dataclass(frozen=True)
class _Active:
    policy: Policy
    ruleset: RuleSet
    command_id: str
    reason: str
    snapshot: Snapshot
    connections_cut: int | None = None


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old or the new file, never a mix:
    write a temporary file, fsync it, rename it over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not remove temporary state file %s", tmp)
        raise StateStoreError(f"cannot write isolation state: {e}", path=str(path)) from e


class IsolationController:
    """Isolates this host through `backend` and keeps it isolated until released.

    `clock` measures deadlines (monotonic seconds); `poll_interval_s` is how often
    `session_healthy()` is polled while waiting for confirmation. `session_healthy` must only
    return True once the collector session has exchanged traffic after the rules were applied.
    """

    def __init__(
        self,
        backend: FirewallBackend,
        state_dir: Path,
        emit: Callable[[IsolationTransition], None],
        session_healthy: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        *,
        poll_interval_s: float = 0.25,
    ) -> None:
        self._backend = backend
        self._state_dir = Path(state_dir)
        self._emit_cb = emit
        self._session_healthy = session_healthy
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._lock = threading.RLock()
        self._state = "none"
        self._active: _Active | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watch_stop = threading.Event()
        self._watch_thread: threading.Thread | None = None

    # ---- public API -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def state_path(self) -> Path:
        return self._state_dir / STATE_FILE

    def isolate(self, policy: Policy, command_id: str, reason: str) -> IsolationOutcome:
        """Apply, verify, cut connections, then wait (at most the policy's confirm deadline)
        for the collector session; revert and report failure if it does not come back."""
        outcome = self.apply_isolation(policy, command_id, reason)
        if not outcome.ok:
            return outcome
        return self.confirm()

    def apply_isolation(self, policy: Policy, command_id: str, reason: str) -> IsolationOutcome:
        """Everything up to confirmation: returns a pending outcome with the rules in force and
        the state persisted, or a failed outcome with the previous state restored."""
        with self._lock:
            if self._state in ("pending", "isolated", "releasing"):
                raise StateError(
                    f"cannot isolate while {self._state}; release first",
                    state=self._state,
                    action="isolate",
                )
            ruleset = plan(policy)
            base = {
                "command_id": command_id,
                "ruleset_sha256": ruleset.sha256,
                "policy_json": policy.to_json(),
            }
            self._emit("requested", reason=reason, **base)
            self._state = "pending"
            try:
                snapshot = self._backend.snapshot()
            except IsolationError as e:
                return self._fail(command_id, ruleset, f"snapshot failed: {e}")
            active = _Active(policy, ruleset, command_id, reason, snapshot)
            try:
                self._persist(active, "pending")
                self._backend.apply(ruleset)
                verified = self._backend.verify(ruleset)
            except IsolationError as e:
                what = "read-back mismatch" if isinstance(e, DriftError) else "apply failed"
                return self._revert(active, f"{what}: {e}")
            cut: int | None
            note = ""
            try:
                cut = self._backend.cut_connections(ruleset)
            except IsolationError as e:
                cut = None
                note = f"connections NOT cut: {e}"
                logger.error("isolation %s: %s", command_id, note)
            active = replace(active, connections_cut=cut)
            self._emit(
                "applied",
                listing=verified.listing,
                connections_cut=cut,
                reason=note or reason,
                **base,
            )
            self._emit("verified", listing=verified.listing, **base)
            # The state file keeps saying "pending" until confirm(): a crash before the
            # collector answered must lead to confirm-or-revert again, not to trust.
            self._active = active
            self._stop.clear()
            return IsolationOutcome(True, self._state, command_id, ruleset.sha256, note, cut)

    def confirm(self, timeout: float | None = None) -> IsolationOutcome:
        """Wait for `session_healthy()` up to `timeout` (default: the policy's deadline).

        Healthy -> confirmed and isolated. Otherwise the snapshot is restored, persisted state
        removed, and restored + failed are emitted with the reason. Returns immediately when
        nothing is pending; `stop()` ends the wait early, leaving isolation in force.
        """
        with self._lock:
            active = self._active
            if active is None or self._state != "pending":
                return IsolationOutcome(
                    self._state == "isolated", self._state, active.command_id if active else ""
                )
            deadline_s = active.policy.confirm_deadline_s if timeout is None else timeout
        end = self._clock() + deadline_s
        healthy = False
        while True:
            # Cleared before the check, so a wake() between check and wait is not lost.
            self._wake.clear()
            if self._safe_healthy():
                healthy = True
                break
            remaining = end - self._clock()
            if remaining <= 0 or self._stop.is_set():
                break
            self._wake.wait(min(self._poll_interval_s, remaining))
            if self._stop.is_set():
                break
        with self._lock:
            if self._active is not active or self._state != "pending":
                return IsolationOutcome(self._state == "isolated", self._state, active.command_id)
            if healthy:
                self._state = "isolated"
                try:
                    self._persist(active, "isolated")
                except StateStoreError as e:
                    # The rules are in force and the collector answers through them; the file
                    # still says pending, so a restart would re-confirm: safe, but say so.
                    logger.error("isolation %s confirmed but not persisted as such: %s",
                                 active.command_id, e)
                self._emit(
                    "confirmed",
                    command_id=active.command_id,
                    ruleset_sha256=active.ruleset.sha256,
                    reason=active.reason,
                )
                return IsolationOutcome(
                    True,
                    "isolated",
                    active.command_id,
                    active.ruleset.sha256,
                    active.reason,
                    active.connections_cut,
                )
            if self._stop.is_set():
                logger.warning(
                    "confirmation wait stopped; isolation %s stays in force", active.command_id
                )
                return IsolationOutcome(
                    False,
                    self._state,
                    active.command_id,
                    active.ruleset.sha256,
                    "stopped before confirmation",
                )
            return self._revert(
                active,
                f"collector session not re-established within {deadline_s:g} s",
            )

    def release(self, command_id: str, reason: str) -> IsolationOutcome:
        """Restore exactly the pre-isolation state, remove persisted state, emit released."""
        with self._lock:
            active = self._active
            if active is None or self._state not in ("pending", "isolated", "failed"):
                raise StateError(
                    f"cannot release while {self._state}", state=self._state, action="release"
                )
            previous = self._state
            self._state = "releasing"
            try:
                self._backend.restore(active.snapshot)
                self._delete_state()
            except IsolationError as e:
                self._state = previous
                self._emit(
                    "failed",
                    command_id=command_id,
                    ruleset_sha256=active.ruleset.sha256,
                    reason=f"release failed: {e}",
                )
                return IsolationOutcome(
                    False, previous, command_id, active.ruleset.sha256, f"release failed: {e}"
                )
            self._active = None
            self._state = "none"
            self._stop.set()  # wake a pending confirm(); it sees the release and returns
            self._wake.set()
            self._emit(
                "released",
                command_id=command_id,
                ruleset_sha256=active.ruleset.sha256,
                reason=reason,
            )
            return IsolationOutcome(True, "none", command_id, active.ruleset.sha256, reason)

    def resume_from_disk(self) -> IsolationOutcome | None:
        """At agent start, before connecting: re-apply persisted isolation, if any.

        Returns None when nothing was persisted. A confirmed isolation resumes as isolated; if
        re-applying it fails the isolation stays intended (state failed) and the drift watcher
        keeps retrying. An isolation that was still pending (the agent died while waiting for
        confirmation) is re-applied and resumes as pending: the caller must run `confirm()`
        once the session is started, which reverts it if the collector does not answer within
        the policy's deadline. If re-applying a pending isolation fails it is reverted now.
        """
        with self._lock:
            loaded = self._load_state()
            if loaded is None:
                return None
            active, status = loaded
            self._active = active
            self._stop.clear()
            try:
                self._backend.apply(active.ruleset)
                verified = self._backend.verify(active.ruleset)
            except IsolationError as e:
                if status == "pending":
                    self._state = "pending"
                    return self._revert(
                        active, f"re-applying unconfirmed isolation after restart failed: {e}"
                    )
                self._state = "failed"
                self._emit(
                    "failed",
                    command_id=active.command_id,
                    ruleset_sha256=active.ruleset.sha256,
                    policy_json=active.policy.to_json(),
                    reason=f"re-applying persisted isolation failed: {e}",
                )
                return IsolationOutcome(
                    False, "failed", active.command_id, active.ruleset.sha256, str(e)
                )
            if status == "pending":
                reason = (
                    "resumed from disk unconfirmed: confirming within "
                    f"{active.policy.confirm_deadline_s:g} s or reverting"
                )
            else:
                reason = "resumed from disk"
            self._state = "pending" if status == "pending" else "isolated"
            self._emit(
                "reapplied",
                command_id=active.command_id,
                ruleset_sha256=active.ruleset.sha256,
                listing=verified.listing,
                policy_json=active.policy.to_json(),
                reason=reason,
            )
            return IsolationOutcome(
                True, self._state, active.command_id, active.ruleset.sha256, reason
            )

    def check_drift(self) -> bool:
        """Verify once; on drift emit drift (with what was found), re-apply, emit reapplied.
        Returns whether drift was found. The drift watcher calls this every interval."""
        with self._lock:
            active = self._active
            if active is None or self._state == "releasing":
                return False
            try:
                self._backend.verify(active.ruleset)
                return False
            except DriftError as d:
                drift = d
            except IsolationError as e:
                logger.warning("drift check could not read rules: %s", e)
                return False
            logger.warning("isolation drift (%s); re-applying", drift.kind)
            self._emit(
                "drift",
                command_id=active.command_id,
                ruleset_sha256=active.ruleset.sha256,
                listing=drift.found or "",
                reason=f"{drift.kind}: {drift.diff}"[:4000],
            )
            try:
                self._backend.apply(active.ruleset)
                verified = self._backend.verify(active.ruleset)
            except IsolationError as e:
                self._emit(
                    "failed",
                    command_id=active.command_id,
                    ruleset_sha256=active.ruleset.sha256,
                    reason=f"re-applying after drift failed: {e}",
                )
                return True
            if self._state == "failed":
                self._state = "isolated"
            self._emit(
                "reapplied",
                command_id=active.command_id,
                ruleset_sha256=active.ruleset.sha256,
                listing=verified.listing,
                reason=f"re-applied after drift ({drift.kind})",
            )
            return True

    def start_drift_watch(self, interval_s: float = 1.0) -> None:
        """Start a daemon thread that calls `check_drift()` every `interval_s` until
        `stop()`. It idles while nothing is isolated. Starting twice is a no-op."""
        if not 0.05 <= interval_s <= 60:
            raise ValueError("interval_s must be within 0.05..60")
        with self._lock:
            if self._watch_thread is not None and self._watch_thread.is_alive():
                return
            self._watch_stop.clear()
            thread = threading.Thread(
                target=self._watch, args=(interval_s,), name="ringfence-drift-watch", daemon=True
            )
            self._watch_thread = thread
            thread.start()

    def wake(self) -> None:
        """Re-check `session_healthy()` now (call when the collector sent something)."""
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the drift watcher and any confirmation wait. Isolation stays in force."""
        self._watch_stop.set()
        self._stop.set()
        self._wake.set()
        thread = self._watch_thread
        if thread is not None:
            thread.join(timeout_s)
            self._watch_thread = None

    # ---- internals --------------------------------------------------------------------------

    def _watch(self, interval_s: float) -> None:
        while not self._watch_stop.wait(interval_s):
            try:
                self.check_drift()
            except Exception:  # the watcher must survive anything a backend or emit does
                logger.exception("drift check crashed")

    def _safe_healthy(self) -> bool:
        try:
            return bool(self._session_healthy())
        except Exception:
            logger.exception("session_healthy() raised; treating as unhealthy")
            return False

    def _emit(self, transition: str, **fields: Any) -> None:
        event = IsolationTransition(transition=transition, backend=self._backend.name, **fields)
        logger.info("isolation %s: %s %s", event.command_id, transition, event.reason)
        try:
            self._emit_cb(event)
        except Exception:  # recording must never undo or block the isolation itself
            logger.exception("emit(%s) failed", transition)

    def _fail(self, command_id: str, ruleset: RuleSet, reason: str) -> IsolationOutcome:
        self._state = "failed"
        self._active = None
        self._emit("failed", command_id=command_id, ruleset_sha256=ruleset.sha256, reason=reason)
        return IsolationOutcome(False, "failed", command_id, ruleset.sha256, reason)

    def _revert(self, active: _Active, reason: str) -> IsolationOutcome:
        """Restore the pre-isolation snapshot and forget the isolation; emit restored+failed."""
        try:
            self._backend.restore(active.snapshot)
            restored = True
        except IsolationError as e:
            logger.error("restoring snapshot failed (%s); removing ringfence rules", e)
            restored = False
            try:
                self._backend.remove()
            except IsolationError as e2:
                logger.critical("removing ringfence rules failed too: %s", e2)
                reason = f"{reason}; restore AND remove failed: {e2}"
        try:
            self._delete_state()
        except StateStoreError as e:
            logger.error("%s", e)
        if restored:
            self._emit(
                "restored",
                command_id=active.command_id,
                ruleset_sha256=active.ruleset.sha256,
                reason=reason,
            )
        return self._fail(active.command_id, active.ruleset, reason)

    def _persist(self, active: _Active, status: str) -> None:
        record = {
            "version": STATE_VERSION,
            "status": status,
            "command_id": active.command_id,
            "reason": active.reason,
            "backend": self._backend.name,
            "policy_json": active.policy.to_json(),
            "ruleset_sha256": active.ruleset.sha256,
            "snapshot": active.snapshot.to_dict(),
        }
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateStoreError(f"cannot create state dir: {e}", path=str(self._state_dir)) from e
        atomic_write(self.state_path, json.dumps(record, sort_keys=True).encode())

    def _delete_state(self) -> None:
        try:
            self.state_path.unlink(missing_ok=True)
        except OSError as e:
            raise StateStoreError(
                f"cannot delete isolation state: {e}", path=str(self.state_path)
            ) from e

    def _load_state(self) -> tuple[_Active, str] | None:
        path = self.state_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateStoreError(f"cannot read isolation state: {e}", path=str(path)) from e
        try:
            record = json.loads(raw)
            if record.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported state version {record.get('version')!r}")
            policy = Policy.from_json(record["policy_json"])
            snapshot = Snapshot.from_dict(record["snapshot"])
            command_id = str(record["command_id"])
            reason = str(record.get("reason", ""))
            status = record["status"]
            if status not in ("pending", "isolated"):
                raise ValueError(f"unknown status {status!r}")
        except (ValueError, KeyError, TypeError, AttributeError, IsolationError) as e:
            raise StateStoreError(f"corrupt isolation state: {e}", path=str(path)) from e
        return _Active(policy, plan(policy), command_id, reason, snapshot), status
