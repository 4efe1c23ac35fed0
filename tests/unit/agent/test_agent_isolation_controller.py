"""IsolationController logic against the stateful fake backend (no real firewall)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from agent.actions.isolation import (
    STATE_FILE,
    IsolationController,
    IsolationTransition,
    atomic_write,
)
from isolation import CollectorEndpoint, Policy, StateError, StateStoreError, plan
from isolation.backends import FakeBackend
from isolation.conntrack import Flow

POLICY = Policy(collectors=(CollectorEndpoint("198.18.0.1", 8443),), confirm_deadline_s=1.0)
PRE = "table inet ringfence {\nchain keep {\n}\n}"


class Recorder:
    def __init__(self) -> None:
        self.events: list[IsolationTransition] = []
        self.lock = threading.Lock()

    def __call__(self, t: IsolationTransition) -> None:
        with self.lock:
            self.events.append(t)

    @property
    def names(self) -> list[str]:
        with self.lock:
            return [e.transition for e in self.events]


def make(
    tmp_path: Path, backend: FakeBackend | None = None, healthy: bool = True
) -> tuple[IsolationController, FakeBackend, Recorder]:
    fake = backend or FakeBackend()
    rec = Recorder()
    ctl = IsolationController(fake, tmp_path, rec, lambda: healthy, poll_interval_s=0.02)
    return ctl, fake, rec


def test_success_path(tmp_path: Path) -> None:
    fake = FakeBackend()
    fake.flows = [
        Flow("ip", "tcp", "198.18.0.2", "198.18.0.1", 40000, 8443),
        Flow("ip", "tcp", "198.18.0.9", "198.18.0.2", 41000, 22),
    ]
    ctl, fake, rec = make(tmp_path, fake)
    out = ctl.isolate(POLICY, "cmd-1", "compromised")
    assert out.ok and out.state == "isolated" == ctl.state
    assert rec.names == ["requested", "applied", "verified", "confirmed"]
    applied = rec.events[1]
    rs = plan(POLICY)
    assert applied.ruleset_sha256 == rs.sha256 == out.ruleset_sha256
    assert applied.connections_cut == 1 == out.connections_cut
    assert applied.listing == fake.listing
    assert applied.backend == "fake"
    assert rec.events[0].policy_json == POLICY.to_json()
    assert fake.flows == [Flow("ip", "tcp", "198.18.0.2", "198.18.0.1", 40000, 8443)]
    assert (tmp_path / STATE_FILE).exists()


def test_read_back_mismatch_restores_and_fails(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path, FakeBackend(preexisting=PRE))
    fake.tamper_on_apply = "table inet ringfence {\nsomething else\n}"
    out = ctl.isolate(POLICY, "cmd-2", "r")
    assert not out.ok and ctl.state == "failed"
    assert "read-back mismatch" in out.reason
    assert rec.names == ["requested", "restored", "failed"]
    assert fake.listing == PRE
    assert not (tmp_path / STATE_FILE).exists()


def test_apply_failure_restores_and_fails(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path)
    fake.fail_next("apply", OSError("nft: permission denied"))
    out = ctl.isolate(POLICY, "cmd-3", "r")
    assert not out.ok
    assert "apply failed" in out.reason and "permission denied" in out.reason
    assert fake.listing is None
    assert rec.names[-1] == "failed"


def test_confirm_timeout_reverts_with_reason(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path, FakeBackend(preexisting=PRE), healthy=False)
    start = time.monotonic()
    out = ctl.isolate(POLICY, "cmd-4", "r")
    assert 0.9 <= time.monotonic() - start < 3
    assert not out.ok and ctl.state == "failed"
    assert out.reason == "collector session not re-established within 1 s"
    assert rec.names == ["requested", "applied", "verified", "restored", "failed"]
    assert rec.events[-1].reason == out.reason
    assert fake.listing == PRE
    assert not (tmp_path / STATE_FILE).exists()


def test_confirm_succeeds_once_session_comes_back(tmp_path: Path) -> None:
    calls = {"n": 0}

    def healthy() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    rec = Recorder()
    ctl = IsolationController(FakeBackend(), tmp_path, rec, healthy, poll_interval_s=0.01)
    pending = ctl.apply_isolation(POLICY, "cmd-5", "r")
    assert pending.ok and ctl.state == "pending"
    # Persisted before any confirmation wait: a crash now leaves isolation in force.
    assert json.loads((tmp_path / STATE_FILE).read_text())["command_id"] == "cmd-5"
    out = ctl.confirm()
    assert out.ok and ctl.state == "isolated"
    assert rec.names[-1] == "confirmed"


def test_conntrack_unavailable_is_reported(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path)
    fake.conntrack_available = False
    out = ctl.isolate(POLICY, "cmd-6", "r")
    assert out.ok
    assert out.connections_cut is None
    assert "connections NOT cut" in rec.events[1].reason


def test_release_restores_snapshot(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path, FakeBackend(preexisting=PRE))
    ctl.isolate(POLICY, "cmd-7", "r")
    assert fake.listing != PRE
    out = ctl.release("cmd-8", "all clear")
    assert out.ok and ctl.state == "none"
    assert fake.listing == PRE
    assert rec.names[-1] == "released"
    assert rec.events[-1].command_id == "cmd-8"
    assert not (tmp_path / STATE_FILE).exists()
    with pytest.raises(StateError):
        ctl.release("cmd-9", "again")


def test_isolate_twice_is_refused(tmp_path: Path) -> None:
    ctl, _, _ = make(tmp_path)
    ctl.isolate(POLICY, "cmd-10", "r")
    with pytest.raises(StateError) as e:
        ctl.isolate(POLICY, "cmd-11", "r")
    assert e.value.state == "isolated"


def test_state_survives_new_controller_and_resume_reapplies(tmp_path: Path) -> None:
    fake = FakeBackend(preexisting=PRE)
    ctl, _, _ = make(tmp_path, fake)
    ctl.isolate(POLICY, "cmd-12", "r")
    fake.listing = None  # reboot: the kernel forgot every rule
    ctl2, _, rec2 = make(tmp_path, fake)
    assert ctl2.state == "none"
    out = ctl2.resume_from_disk()
    assert out is not None and out.ok and ctl2.state == "isolated"
    assert rec2.names == ["reapplied"]
    assert rec2.events[0].ruleset_sha256 == plan(POLICY).sha256
    assert ctl2.release("cmd-13", "done").ok
    assert fake.listing == PRE  # the persisted pre-isolation snapshot, not the reboot state


def test_resume_without_state_does_nothing(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path)
    assert ctl.resume_from_disk() is None
    assert fake.calls == [] and rec.names == []


def test_corrupt_state_is_an_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    ctl, _, _ = make(tmp_path)
    with pytest.raises(StateStoreError):
        ctl.resume_from_disk()


def test_drift_reapplied(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path)
    ctl.isolate(POLICY, "cmd-14", "r")
    assert ctl.check_drift() is False
    fake.drift("altered")
    assert ctl.check_drift() is True
    assert rec.names[-2:] == ["drift", "reapplied"]
    assert "ct state established accept" in rec.events[-2].listing
    assert rec.events[-2].reason.startswith("altered")
    assert fake.listing == fake.expected_listing(plan(POLICY))


def test_drift_watch_thread_reapplies_missing_table(tmp_path: Path) -> None:
    ctl, fake, rec = make(tmp_path)
    ctl.isolate(POLICY, "cmd-15", "r")
    ctl.start_drift_watch(interval_s=0.05)
    try:
        fake.drift("missing")
        deadline = time.monotonic() + 5
        while "reapplied" not in rec.names and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "drift" in rec.names and "reapplied" in rec.names
        assert rec.events[rec.names.index("drift")].reason.startswith("missing")
        assert fake.listing is not None
        ctl.release("cmd-16", "r")
        time.sleep(0.2)
        assert fake.listing is None  # the watcher does not re-apply after release
    finally:
        ctl.stop()


def test_atomic_write_leaves_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StateStoreError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_persist_failure_before_apply_changes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ctl, fake, rec = make(blocker / "sub")  # state_dir cannot be created
    out = ctl.isolate(POLICY, "cmd-17", "r")
    assert not out.ok and fake.applied == []
    assert rec.names[-1] == "failed"


def test_emit_failure_does_not_break_isolation(tmp_path: Path) -> None:
    def bad_emit(t: IsolationTransition) -> None:
        raise RuntimeError("chain full")

    ctl = IsolationController(FakeBackend(), tmp_path, bad_emit, lambda: True)
    assert ctl.isolate(POLICY, "cmd-18", "r").ok


def _status(tmp_path: Path) -> str:
    return str(json.loads((tmp_path / STATE_FILE).read_text())["status"])


def test_state_file_says_pending_until_confirmed(tmp_path: Path) -> None:
    ctl, _, _ = make(tmp_path)
    assert ctl.apply_isolation(POLICY, "cmd-19", "r").ok
    assert _status(tmp_path) == "pending"
    assert ctl.confirm().ok
    assert _status(tmp_path) == "isolated"


def test_crash_while_pending_resumes_pending_and_reverts_without_collector(
    tmp_path: Path,
) -> None:
    fake = FakeBackend(preexisting=PRE)
    ctl, _, _ = make(tmp_path, fake)
    assert ctl.apply_isolation(POLICY, "cmd-20", "r").ok  # crash here: never confirmed
    ctl2, _, rec2 = make(tmp_path, fake, healthy=False)
    out = ctl2.resume_from_disk()
    assert out is not None and out.ok and out.state == "pending" == ctl2.state
    assert rec2.names == ["reapplied"] and "unconfirmed" in rec2.events[0].reason
    assert fake.listing == fake.expected_listing(plan(POLICY))  # in force before connecting
    started = time.monotonic()
    confirmed = ctl2.confirm()
    assert time.monotonic() - started < POLICY.confirm_deadline_s + 1.0
    assert not confirmed.ok and confirmed.state == "failed"
    assert confirmed.reason == "collector session not re-established within 1 s"
    assert rec2.names == ["reapplied", "restored", "failed"]
    assert fake.listing == PRE
    assert not (tmp_path / STATE_FILE).exists()


def test_crash_while_pending_resumes_and_confirms_with_collector(tmp_path: Path) -> None:
    ctl, fake, _ = make(tmp_path)
    assert ctl.apply_isolation(POLICY, "cmd-21", "r").ok
    ctl2, _, rec2 = make(tmp_path, fake, healthy=True)
    assert ctl2.resume_from_disk() is not None and ctl2.state == "pending"
    assert ctl2.confirm().ok and ctl2.state == "isolated"
    assert rec2.names == ["reapplied", "confirmed"]
    assert _status(tmp_path) == "isolated"


def test_pending_resume_whose_reapply_fails_is_reverted(tmp_path: Path) -> None:
    fake = FakeBackend(preexisting=PRE)
    ctl, _, _ = make(tmp_path, fake)
    assert ctl.apply_isolation(POLICY, "cmd-22", "r").ok
    fake.fail_next("apply")
    ctl2, _, rec2 = make(tmp_path, fake)
    out = ctl2.resume_from_disk()
    assert out is not None and not out.ok and ctl2.state == "failed"
    assert rec2.names == ["restored", "failed"]
    assert fake.listing == PRE and not (tmp_path / STATE_FILE).exists()


def test_wake_ends_the_confirm_wait_without_polling(tmp_path: Path) -> None:
    healthy = threading.Event()
    ctl = IsolationController(FakeBackend(), tmp_path, Recorder(), healthy.is_set,
                              poll_interval_s=30.0)
    assert ctl.apply_isolation(POLICY, "cmd-23", "r").ok

    def answer() -> None:
        time.sleep(0.05)
        healthy.set()
        ctl.wake()

    threading.Thread(target=answer, daemon=True).start()
    started = time.monotonic()
    assert ctl.confirm(timeout=10.0).ok
    assert time.monotonic() - started < 1.0
