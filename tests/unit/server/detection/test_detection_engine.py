"""The alert store and its hash chain, and the live engine: dedup, status changes, tamper
detection, queue overflow caught up from the evidence store by seq, restart resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from collector.ingest import DecodedEvent
from collector.store.base import AgentRecord, ChainState, EventRow
from collector.store.sqlite import SQLiteStore
from proto import ringfence_pb2 as pb
from server.detection import InvalidTransition
from server.detection.baselines import BaselineConfig
from server.detection.engine import DetectionConfig, DetectionEngine
from server.detection import DetectionError
from server.detection.evaluation import InProcessEvaluation, Item, ProcessEvaluation
from server.detection.records import (
    MAX_EVENT_REFS,
    AlertChainBroken,
    EventRef,
    NewAlert,
    canonical,
    log_hash,
    verify_alert_log,
)
from server.detection.store import SQLiteDetectionStore

AGENT = "00000000-0000-4000-8000-000000000001"
NS = 1_000_000_000


def _alert(seq: int, rule: str = "r1", tree: str = "t1") -> NewAlert:
    return NewAlert(AGENT, "sigma", rule, f"Rule {rule}", "high", "detail",
                    f"sigma:{rule}:{AGENT}:{tree}", EventRef(AGENT, seq), seq * NS)


def _verify(d: SQLiteDetectionStore) -> int:
    return verify_alert_log(d.alert_log(), d.alert_head(), d.list_alerts(limit=10**6))


def test_dedup_status_and_chain(tmp_path: Path) -> None:
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    now = time.time_ns()
    [first] = d.raise_alerts([_alert(1)], now, 600 * NS).alerts
    [same] = d.raise_alerts([_alert(2)], now + NS, 600 * NS).alerts
    assert same.alert_id == first.alert_id and same.count == 2
    assert same.events == (EventRef(AGENT, 1), EventRef(AGENT, 2))
    [other_tree] = d.raise_alerts([_alert(3, tree="t2")], now + NS, 600 * NS).alerts
    # outside the window:
    [later] = d.raise_alerts([_alert(4)], now + 700 * NS, 600 * NS).alerts
    assert len({first.alert_id, other_tree.alert_id, later.alert_id}) == 3
    assert d.open_alert_counts() == {AGENT: 3}
    d.set_status(first.alert_id, "acknowledged", "looking", "alice", now)
    closed = d.set_status(first.alert_id, "closed", "benign", "alice", now)
    assert (closed.status, closed.status_reason, closed.status_actor) == ("closed", "benign",
                                                                          "alice")
    with pytest.raises(InvalidTransition):
        d.set_status(first.alert_id, "acknowledged", "again", "alice", now)
    # A repeat within the window joins the open alert of its tree.
    [repeat] = d.raise_alerts([_alert(5)], now + 701 * NS, 600 * NS).alerts
    assert (repeat.alert_id, repeat.count) == (later.alert_id, 2)
    # A repeat after closing opens a new alert rather than reviving the closed one.
    d.set_status(other_tree.alert_id, "closed", "benign", "alice", now + 702 * NS)
    [reopened] = d.raise_alerts([_alert(6, tree="t2")], now + 703 * NS, 600 * NS).alerts
    assert reopened.alert_id > later.alert_id and reopened.count == 1
    assert _verify(d) == 9
    d.close()


def test_repeats_in_one_batch_are_one_record_and_the_raise_is_reported(tmp_path: Path) -> None:
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    now = time.time_ns()
    batch = [_alert(seq) for seq in range(1, 61)] + [_alert(61, rule="r2")]
    stored = d.raise_alerts(batch, now, 600 * NS)
    by_rule = {a.rule_id: a for a in stored.alerts}
    assert by_rule["r1"].count == 60 and by_rule["r2"].count == 1
    # Raised in this batch, although already repeated in it: reactions must still see it.
    assert {a.rule_id for a in stored.newly_raised()} == {"r1", "r2"}
    assert len(by_rule["r1"].events) == MAX_EVENT_REFS
    assert by_rule["r1"].events[-1] == EventRef(AGENT, MAX_EVENT_REFS)
    log = d.alert_log()
    assert [r.kind for r in log] == ["raised", "repeated", "raised"]
    assert json.loads(log[1].body)["events"] == [[AGENT, s] for s in range(2, 61)]
    # The next batch repeats an open alert: reported as stored, not as raised.
    later = d.raise_alerts([_alert(62), _alert(63)], now + NS, 600 * NS)
    assert [a.count for a in later.alerts] == [62] and later.newly_raised() == []
    assert _verify(d) == 4
    d.close()


@pytest.mark.parametrize("tamper,message", [
    ("UPDATE alert_log SET body = replace(body, 'high', 'low') WHERE seq = 1", "altered"),
    ("DELETE FROM alert_log WHERE seq = 2", "missing"),
    ("DELETE FROM alert_log WHERE seq = (SELECT MAX(seq) FROM alert_log)", "deleted from"),
    ("UPDATE alerts SET title = 'nothing to see' WHERE alert_id = 1", "altered after"),
    ("UPDATE alerts SET count = 1 WHERE alert_id = 1", "count or status"),
    ("UPDATE alerts SET status = 'closed' WHERE alert_id = 1", "count or status"),
    ("DELETE FROM alert_head", "head record is missing"),
])
def test_tampering_with_alerts_is_detected(tmp_path: Path, tamper: str, message: str) -> None:
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    now = time.time_ns()
    d.raise_alerts([_alert(1), _alert(2), _alert(3, rule="r2")], now, 600 * NS)
    assert _verify(d) == 3
    d.close()
    with sqlite3.connect(tmp_path / "d.sqlite") as db:
        db.execute(tamper)
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    with pytest.raises(AlertChainBroken, match=message):
        _verify(d)
    d.close()


def _event(seq: int, exe: str, *argv: str) -> pb.Event:
    e = pb.Event(seq=seq, time_ns=time.time_ns(), agent_id=AGENT)
    e.process.activity_id = 1
    e.process.process.pid, e.process.process.ppid = 1000 + seq, 1
    e.process.process.session_id = 1000 + seq    # each launch its own process tree
    e.process.process.exe = exe.encode()
    e.process.process.argv.extend(a.encode() for a in argv)
    return e


def _store_events(store: SQLiteStore, events: list[pb.Event]) -> None:
    """Commit `events` as the agent's next stored batch (the chain head at the last one)."""
    rows = [EventRow(AGENT, e.seq, e.time_ns, "process", e.SerializeToString(), bytes(32), 1)
            for e in events]
    store.commit_batch(rows, [], [], [], ChainState(events[-1].seq, bytes(32)))


def _evidence(tmp_path: Path, events: list[pb.Event]) -> SQLiteStore:
    store = SQLiteStore(tmp_path / "events.sqlite")
    store.register_agent(AgentRecord(AGENT, "host-1", "linux", "6.1", "m", (), "1",
                                     bytes(32), "f", 1))
    _store_events(store, events)
    return store


def _wait(engine: DetectionEngine) -> None:
    deadline = time.monotonic() + 20
    while not engine.idle() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.idle()


@pytest.mark.parametrize("separate_process", [True, False])
def test_overflow_is_recorded_and_caught_up_from_the_store(tmp_path: Path,
                                                           separate_process: bool) -> None:
    events = [_event(s, "/usr/bin/base64", "base64", "-d") for s in range(1, 201)]
    store = _evidence(tmp_path, events[:1])
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    config = DetectionConfig(queue_events=50, baselines=BaselineConfig(enabled=False),
                             separate_process=separate_process)
    engine = DetectionEngine(store, d, config)
    engine.start()
    # Everything is stored first, then announced in one go: the queue takes 50 events and
    # the rest overflows, to be read back from the store.
    _store_events(store, events[1:])
    batches = [events[i:i + 25] for i in range(1, 200, 25)]
    for batch in batches:
        engine.submit(AGENT, [DecodedEvent(e.seq, b"", e, "process") for e in batch])
    _wait(engine)
    engine.stop()
    assert engine.stats.overflowed_events > 0
    assert d.overflows() and d.overflows()[0][0] == AGENT
    decoded = [a for a in d.list_alerts(limit=10**6) if a.rule_id != "detection_queue_overflow"]
    # Every event from seq 2 on was evaluated exactly once (seq 1 predates the engine).
    assert sorted(e.seq for a in decoded for e in a.events) == list(range(2, 201))
    loud = [a for a in d.list_alerts(limit=10**6) if a.rule_id == "detection_queue_overflow"]
    assert loud and loud[0].severity == "medium" and "deferred" in loud[0].detail
    assert d.cursors() == {AGENT: 200}
    d.close()
    store.close()


@pytest.mark.parametrize("separate_process", [True, False])
def test_restart_resumes_from_the_saved_cursor(tmp_path: Path, separate_process: bool) -> None:
    events = [_event(s, "/usr/bin/base64", "base64", "-d") for s in range(1, 11)]
    store = _evidence(tmp_path, events[:5])
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    config = DetectionConfig(baselines=BaselineConfig(enabled=False),
                             separate_process=separate_process)
    d.save_state([], {AGENT: 3})                       # evaluated up to seq 3 before
    engine = DetectionEngine(store, d, config)
    engine.start()
    _wait(engine)
    _store_events(store, events[5:])
    engine.submit(AGENT, [DecodedEvent(e.seq, b"", e, "process") for e in events[5:]])
    _wait(engine)
    engine.stop()
    seqs = sorted(e.seq for a in d.list_alerts(limit=100) for e in a.events)
    assert seqs == list(range(4, 11))
    d.close()
    store.close()


def test_a_dead_evaluator_process_is_replaced_and_nothing_is_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events = [_event(s, "/usr/bin/base64", "base64", "-d") for s in range(1, 41)]
    store = _evidence(tmp_path, events[:1])
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    engine = DetectionEngine(store, d, DetectionConfig(baselines=BaselineConfig(enabled=False)))
    engine.start()
    evaluation = engine.evaluation
    assert isinstance(evaluation, ProcessEvaluation)

    def announce(batch: list[pb.Event]) -> None:
        _store_events(store, batch)
        engine.submit(AGENT, [DecodedEvent(e.seq, e.SerializeToString(), e, "process")
                              for e in batch])

    announce(events[1:20])
    _wait(engine)
    os.kill(evaluation._proc.pid, signal.SIGKILL)
    announce(events[20:])
    deadline = time.monotonic() + 60
    while d.cursors().get(AGENT, 0) < 40 or not engine.idle():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    engine.stop()
    assert evaluation.starts == 2
    # Loud: the worker logs the failure, naming the exit code of the killed process.
    assert any("evaluator process" in r.getMessage() and "exit code -9" in r.getMessage()
               for r in caplog.records)
    seqs = sorted(e.seq for a in d.list_alerts(limit=10**6) for e in a.events)
    assert seqs == list(range(2, 41))
    d.close()
    store.close()


class _GatedEvaluation(InProcessEvaluation):
    """Evaluates in process, but each batch waits for the test to open the gate, and the
    collect of the batches listed in `fail` reports a failure (their alerts unstored)."""

    def __init__(self, inner: InProcessEvaluation, fail: Sequence[int] = ()) -> None:
        self.__dict__.update(inner.__dict__)
        self.gate = threading.Event()
        self.fail = set(fail)
        self.submitted: list[tuple[int, int]] = []

    def submit(self, agent_id: str, items: Sequence[Item]) -> None:
        self.gate.wait(20)
        self.submitted.append((items[0][0], items[-1][0]))
        if len(self.submitted) in self.fail:
            self._results.append(DetectionError("evaluator failed on this batch"))
        else:
            super().submit(agent_id, items)


def test_detection_lag_asks_the_collector_to_hold_ingest(tmp_path: Path) -> None:
    events = [_event(s, "/usr/bin/base64", "base64", "-d") for s in range(1, 21)]
    store = _evidence(tmp_path, events[:1])
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    engine = DetectionEngine(store, d, DetectionConfig(
        baselines=BaselineConfig(enabled=False), separate_process=False,
        hold_ingest_after_s=0.2))
    assert isinstance(engine.evaluation, InProcessEvaluation)
    gated = engine.evaluation = _GatedEvaluation(engine.evaluation)
    engine.start()
    assert engine.hold_ingest_s() == 0 and engine.lag_s() == 0
    engine.submit(AGENT, [DecodedEvent(e.seq, b"", e, "process") for e in events[1:]])
    time.sleep(0.4)             # the worker holds the batch at the closed gate
    assert engine.lag_s() >= 0.4 and engine.hold_ingest_s() > 0
    gated.gate.set()
    _wait(engine)
    assert engine.lag_s() == 0 and engine.hold_ingest_s() == 0
    engine.stop()
    assert engine.hold_ingest_s() == 0          # a stopped engine never holds ingest
    d.close()
    store.close()


def test_a_failed_batch_in_flight_is_evaluated_again_and_nothing_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.detection.engine as engine_module
    monkeypatch.setattr(engine_module, "EVALUATE_EVENTS", 10)   # batches are not joined
    events = [_event(s, "/usr/bin/base64", "base64", "-d") for s in range(1, 42)]
    store = _evidence(tmp_path, events[:1])
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    engine = DetectionEngine(store, d, DetectionConfig(
        baselines=BaselineConfig(enabled=False), separate_process=False))
    assert isinstance(engine.evaluation, InProcessEvaluation)
    # The second batch fails while the third is in flight behind it.
    gated = engine.evaluation = _GatedEvaluation(engine.evaluation, fail=[2])
    engine.start()
    _store_events(store, events[1:])
    for i in range(1, 41, 10):
        engine.submit(AGENT, [DecodedEvent(e.seq, b"", e, "process") for e in events[i:i + 10]])
    gated.gate.set()
    _wait(engine)
    engine.stop()
    assert gated.submitted[:3] == [(2, 11), (12, 21), (22, 31)]
    # The failed batch (and the one behind it, whose alerts were stored) were read back from
    # the store: every event is in an alert, the cursor reached the end.
    seqs = {e.seq for a in d.list_alerts(limit=10**6) for e in a.events}
    assert seqs == set(range(2, 42))
    assert any(first == 12 for first, _ in gated.submitted[3:]), gated.submitted
    assert d.cursors() == {AGENT: 41}
    d.close()
    store.close()


@pytest.mark.parametrize("separate_process", [True, False])
def test_baseline_state_is_saved_and_loaded_across_a_restart(tmp_path: Path,
                                                             separate_process: bool) -> None:
    events = [_event(s, "/usr/bin/ls", "ls", "-la") for s in range(1, 31)]
    store = _evidence(tmp_path, events[:1])
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    config = DetectionConfig(pack_dir=None, separate_process=separate_process)
    engine = DetectionEngine(store, d, config)
    engine.start()
    _store_events(store, events[1:])
    engine.submit(AGENT, [DecodedEvent(e.seq, e.SerializeToString(), e, "process")
                          for e in events[1:]])
    _wait(engine)
    engine.stop()
    # The evaluator (the child process, by default) saved what the models learned.
    saved = {(r.model, r.scope): r.count for r in d.baselines()}
    assert saved[("launches", AGENT)] == 29
    # A new engine starts from that state and keeps counting.
    engine = DetectionEngine(store, d, config)
    engine.start()
    more = [_event(s, "/usr/bin/ls", "ls", "-la") for s in range(31, 36)]
    _store_events(store, more)
    engine.submit(AGENT, [DecodedEvent(e.seq, e.SerializeToString(), e, "process")
                          for e in more])
    _wait(engine)
    engine.stop()
    saved = {(r.model, r.scope): r.count for r in d.baselines()}
    assert saved[("launches", AGENT)] == 34
    d.close()
    store.close()


def test_repeat_records_written_one_per_event_by_earlier_builds_still_verify(
        tmp_path: Path) -> None:
    """Before batching, each repeat was its own record ({"event", "time_ns"}, no count)."""
    d = SQLiteDetectionStore(tmp_path / "d.sqlite")
    now = time.time_ns()
    [alert] = d.raise_alerts([_alert(1)], now, 600 * NS).alerts
    head = d.alert_head()
    assert head is not None
    with sqlite3.connect(tmp_path / "d.sqlite") as db:
        prev = head[1]
        for seq, event in ((2, 2), (3, 3)):
            body = canonical({"time_ns": event * NS, "event": [AGENT, event]})
            digest = log_hash(prev, seq, now, alert.alert_id, "repeated", body)
            db.execute("INSERT INTO alert_log VALUES (?, ?, ?, 'repeated', ?, ?, ?)",
                       (seq, now, alert.alert_id, body, prev, digest))
            prev = digest
        db.execute("UPDATE alert_head SET seq = 3, hash = ?", (prev,))
        db.execute("UPDATE alerts SET count = 3")
    assert _verify(d) == 3
    d.close()
