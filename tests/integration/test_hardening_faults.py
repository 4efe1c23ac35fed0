"""Hardening, "nothing lost, nothing forged": the collector SIGKILLed under load, the agent
SIGKILLed 50 times, a damaged spool, a full spool, a store that refuses writes, and an
oversized message, each end to end against a real server.

Outage length: RINGFENCE_TEST_OUTAGE_S (default 30 s, the CI value). It may be shortened
locally to iterate faster; CI always runs the default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from agent.chain import EvidenceChain
from agent.spool import Spool, SpoolConfig
from agent.state import AgentPaths, Enrollment
from collector.store.base import StoreUnavailable
from collector.store.sqlite import SQLiteStore
from evidence.keys import load_private_key
from evidence.chain import link
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from proto.limits import MAX_MESSAGE_BYTES
from server.app import RunConfig, start
from server.fleet import create_token, init_server
from server.pki import ServerPaths
from tests.integration.fleet import (
    BIN,
    REPO,
    agent_config,
    running_agent,
    running_fleet,
    wait_for,
)

OUTAGE_S = float(os.environ.get("RINGFENCE_TEST_OUTAGE_S", "30"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _synthetic(i: int) -> pb.Event:
    event = pb.Event(severity_id=1)
    event.process.activity_id = 1
    event.process.source = "synthetic"
    event.process.process.pid = 100_000 + i
    event.process.process.name = "synthetic"
    return event


def _check_chain(store: SQLiteStore, agent_id: str, allowed_alerts: frozenset[str] = frozenset()
                 ) -> list[pb.Event]:
    """The stored chain is contiguous from 1, unforked, each START names the stored head
    before it; returns the decoded events."""
    rows = list(store.events_by_seq(agent_id, 1, 2**62))
    seqs = [r.seq for r in rows]
    assert seqs == list(range(1, len(seqs) + 1)), "stored seqs are not contiguous from 1"
    assert store.forks(agent_id) == []
    events = [pb.Event.FromString(r.data) for r in rows]
    for e in events:
        if e.WhichOneof("body") == "lifecycle" and e.lifecycle.kind == pb.AgentLifecycle.START \
                and e.seq > 1:
            assert e.lifecycle.prev_head == rows[e.seq - 2].chain_hash.hex(), e.seq
    alerts = store.alerts(agent_id)
    assert {a.kind for a in alerts} <= allowed_alerts, alerts
    return events


# -- subprocess helpers -------------------------------------------------------------------------

def _server_proc(data: Path, listen: str = "127.0.0.1:0",
                 enroll: str = "127.0.0.1:0") -> subprocess.Popen[bytes]:
    run_file = data / "run" / "server.json"
    run_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [str(BIN / "ringfence"), "server", "run", "--data-dir", str(data), "--listen", listen,
         "--admin", "127.0.0.1:0", "--enroll", enroll],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wait_for(run_file.exists, timeout=30, what="server to start")
    return proc


def _emitter(state: Path, status: Path, rate: float, duration: float,
             drain_timeout: float = 120.0, spool_max_bytes: int = 0) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "tests.integration.emitter", "--state-dir", str(state),
            "--status", str(status), "--rate", str(rate), "--duration", str(duration),
            "--drain-timeout", str(drain_timeout)]
    if spool_max_bytes:
        args += ["--spool-max-bytes", str(spool_max_bytes)]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _read_status(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def _reaped(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _enroll(data: Path, state: Path) -> Enrollment:
    from agent.enroll import enroll_agent
    ports = json.loads((data / "run" / "server.json").read_text())
    store = SQLiteStore(ServerPaths(data).database)
    try:
        token = create_token(store)
    finally:
        store.close()
    return enroll_agent(AgentPaths(state), f"127.0.0.1:{ports['enroll_port']}", token,
                        ServerPaths(data).ca_cert.read_bytes(), "localhost")


# -- collector SIGKILL under load -----------------------------------------------------------

@pytest.mark.slow
def test_collector_sigkill_under_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    if IN_CI:
        assert OUTAGE_S >= 30, "CI runs the full 30 s outage"
    data, state = tmp_path / "server", tmp_path / "agent"
    init_server(data, ["localhost", "127.0.0.1"])
    server = _server_proc(data)
    ports = json.loads((data / "run" / "server.json").read_text())
    enrollment = _enroll(data, state)
    status = tmp_path / "status.json"
    rate, warm_s = 5000.0, 5.0
    emitter = _emitter(state, status, rate, duration=warm_s + OUTAGE_S + 5.0,
                       drain_timeout=180.0)
    rss: list[tuple[float, int]] = []
    with _reaped(emitter):
        try:
            agent_ps = psutil.Process(emitter.pid)

            def sample() -> None:
                with contextlib.suppress(psutil.Error):
                    rss.append((time.monotonic(), agent_ps.memory_info().rss))
            wait_for(lambda: int(_read_status(status).get("acked", 0)) > 2000, timeout=30,
                     what="acks flowing")
            for _ in range(int(warm_s / 0.25)):
                sample()
                time.sleep(0.25)
            baseline = max(r for _, r in rss)
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            killed_at = int(_read_status(status)["seq"])
            outage_end = time.monotonic() + OUTAGE_S
            while time.monotonic() < outage_end:
                sample()
                time.sleep(0.25)
            # Same data dir, same collector and enrollment ports.
            server = _server_proc(data, listen=f"127.0.0.1:{ports['collector_port']}",
                                  enroll=f"127.0.0.1:{ports['enroll_port']}")

            def done() -> bool:
                sample()
                return emitter.poll() is not None
            wait_for(done, timeout=240, interval=0.25, what="the agent to drain and stop")
            assert emitter.returncode == 0, emitter.stderr.read() if emitter.stderr else ""
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)
    final = _read_status(status)
    assert final.get("done") is True
    assert int(final["seq"]) > killed_at + rate * OUTAGE_S * 0.5, "the agent kept emitting"
    store = SQLiteStore(ServerPaths(data).database)
    try:
        events = _check_chain(store, enrollment.agent_id)
        # Every event exactly once: the stored chain ends at the agent's last seq.
        assert len(events) == int(final["seq"]) == int(final["acked"])
        assert int(final["dropped"]) == 0
        synthetic = sum(1 for e in events if e.WhichOneof("body") == "process")
        assert synthetic == int(final["emitted"])
    finally:
        store.close()
    # Memory stays bounded while ~OUTAGE_S * 5000 events wait in the (on-disk) spool.
    peak = max(r for _, r in rss)
    assert peak - baseline < 64 << 20, f"agent RSS grew {(peak - baseline) >> 20} MiB"


# -- agent SIGKILL at random points ---------------------------------------------------------

@pytest.mark.slow
def test_agent_sigkilled_50_times_never_forks_the_chain(tmp_path: Path) -> None:
    rng = random.Random(1234)
    with running_fleet(tmp_path) as fleet:
        state = tmp_path / "agent"
        enrollment = fleet.enroll(state)
        # Re-point the agent at the in-process collector (fleet.enroll already did).
        status = tmp_path / "status.json"
        kills = 0
        for _ in range(50):
            proc = _emitter(state, status, rate=5000, duration=60)
            with _reaped(proc):
                time.sleep(rng.uniform(0.3, 1.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                kills += 1
        assert kills == 50
        # A last clean run delivers whatever the killed runs left in the spool.
        proc = _emitter(state, status, rate=1000, duration=0.5, drain_timeout=60)
        with _reaped(proc):
            assert proc.wait(timeout=120) == 0
        final = _read_status(status)
        assert final.get("done") is True and final["acked"] == final["seq"]
        events = _check_chain(fleet.store, enrollment.agent_id,
                              allowed_alerts=frozenset({"recorded_loss"}))
        assert len(events) == int(final["seq"])
        starts = [e for e in events if e.WhichOneof("body") == "lifecycle"
                  and e.lifecycle.kind == pb.AgentLifecycle.START]
        # Every run that got as far as recording START left it in the chain.
        assert 10 <= len(starts) <= 51, len(starts)


# -- damaged spool ----------------------------------------------------------------------------

def _spool_offline(state: Path, enrollment: Enrollment, n: int) -> None:
    """Record n events into the agent's spool without a session (the collector never saw
    them), as an agent that ran while the collector was unreachable."""
    paths = AgentPaths(state)
    spool = Spool(paths.spool, SpoolConfig(fsync_interval_s=0.05))
    chain = EvidenceChain(enrollment.agent_id, load_private_key(paths.identity_key), spool)
    for i in range(n):
        chain.record(_synthetic(i))
    spool.flush()
    spool.close()


@pytest.mark.parametrize("damage", ["flipped_bit", "truncated_tail"])
def test_damaged_spool_delivers_intact_records_and_reports_the_loss(tmp_path: Path,
                                                                    damage: str) -> None:
    with running_fleet(tmp_path) as fleet:
        state = tmp_path / "agent"
        enrollment = fleet.enroll(state)
        _spool_offline(state, enrollment, 200)
        segments = sorted(AgentPaths(state).spool.glob("*.seg"))
        assert len(segments) == 1
        raw = bytearray(segments[0].read_bytes())
        if damage == "flipped_bit":
            raw[len(raw) // 2] ^= 0x10
        else:
            del raw[len(raw) - 37:]
        segments[0].write_bytes(bytes(raw))
        with running_agent(agent_config(state)) as agent:
            recovery = agent.spool.recovery
            lost = recovery.corrupt_skipped or 0
            assert lost >= 1 or recovery.torn_bytes_truncated > 0
            wait_for(lambda: agent.spool.acked_seq >= agent.chain.seq, timeout=30,
                     what="everything acknowledged")
        rows = list(fleet.store.events_by_seq(enrollment.agent_id, 1, 2**62))
        events = [pb.Event.FromString(r.data) for r in rows]
        synthetic = [e for e in events if e.WhichOneof("body") == "process"]
        # The intact records are delivered; only the damaged one(s) are missing.
        assert 190 <= len(synthetic) < 200
        assert len(synthetic) == 200 - max(lost, 200 - len(synthetic))
        loss = [e for e in events if e.WhichOneof("body") == "sensor_loss"]
        assert [e.sensor_loss.sensor for e in loss] == ["spool"]
        alerts = fleet.store.alerts(enrollment.agent_id)
        missing = sorted(set(range(1, rows[-1].seq + 1)) - {r.seq for r in rows})
        assert missing, "the loss must show up as missing seqs"
        losses = [a for a in alerts if a.kind in ("gap", "recorded_loss")]
        assert len(losses) == 1, alerts
        assert f"seq {missing[0]}..{missing[-1]}" in losses[0].detail, (missing, losses)
        # A record lost from the *middle* of the spool was already linked into the agent's
        # chain, so the collector cannot verify the events between the gap and the next
        # agent-signed checkpoint; it re-anchors the chain there (recorded as an alert) and
        # every later checkpoint verifies again.
        anchors = [a for a in alerts if a.kind == "chain_reanchored"]
        for a in alerts:
            assert a.kind in ("gap", "recorded_loss", "checkpoint_mismatch",
                              "chain_reanchored"), a
            if a.kind == "checkpoint_mismatch":
                # Only a checkpoint that arrived in a batch without its event, before the
                # chain could be re-anchored, may mismatch.
                assert damage == "flipped_bit" and a.seq > missing[-1], a
                assert anchors and a.seq < anchors[0].seq, (a, anchors)
        if damage == "flipped_bit":
            assert len(anchors) == 1 and anchors[0].seq > missing[-1], alerts
            checkpoints = fleet.store.checkpoints(enrollment.agent_id, anchors[0].seq)
            assert checkpoints and checkpoints[0].seq == anchors[0].seq
            # From the anchor on, the stored chain continues from the agent-signed head.
            head = checkpoints[0].head
            for row in fleet.store.events_by_seq(enrollment.agent_id, anchors[0].seq + 1,
                                                 2**62):
                head = link(head, row.data)
                assert row.chain_hash == head, row.seq
            last = fleet.store.checkpoints(enrollment.agent_id)[-1]
            stored = fleet.store.stored_event(enrollment.agent_id, last.seq)
            assert stored is not None and stored.chain_hash == last.head
        else:
            assert not anchors, alerts


# -- spool full --------------------------------------------------------------------------------

@contextlib.contextmanager
def _collector_down(fleet_server, data: Path) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    """Stop the in-process server, then start it again on the same ports."""
    ports = dict(fleet_server.ports)
    fleet_server.stop(grace_s=0.5)
    holder: dict[str, object] = {}
    yield holder
    holder["server"] = start(RunConfig(
        data_dir=data, listen=f"127.0.0.1:{ports['collector']}", admin="127.0.0.1:0",
        enroll=f"127.0.0.1:{ports['enroll']}"))


def test_spool_full_gap_names_exactly_the_dropped_range(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        state = tmp_path / "agent"
        enrollment = fleet.enroll(state)
        base = agent_config(state)
        config = type(base)(**{**base.__dict__, "spool": SpoolConfig(
            max_bytes=96 << 10, segment_bytes=16 << 10, priority_reserve_bytes=24 << 10,
            fsync_interval_s=0.05)})
        dropped: list[int] = []
        restarted = None
        with running_agent(config) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            with _collector_down(fleet.server, fleet.data_dir) as holder:
                wait_for(lambda: not agent.session.connected.is_set(), what="disconnect")
                for i in range(5000):
                    before = agent.chain.seq
                    if agent.chain.record(_synthetic(i)) == 0:
                        dropped.append(before + 1)
                    if len(dropped) >= 300:
                        break
                    # Let the housekeeping thread run (it writes pending gaps when it can).
                    if i % 200 == 0:
                        time.sleep(0.05)
                assert len(dropped) >= 300
                time.sleep(1.5)  # housekeeping ticks while still full
            restarted = holder["server"]
            try:
                wait_for(lambda: agent.spool.acked_seq >= agent.chain.seq, timeout=30,
                         what="everything acknowledged after the restart")
                # After space returned, the pending gap is written and delivered too.
                wait_for(lambda: agent.chain.dropped == len(dropped) and
                         agent.spool.acked_seq >= agent.chain.seq and
                         any(a.kind == "recorded_loss"
                             for a in restarted.store.alerts(enrollment.agent_id)),
                         timeout=30, what="the gap to be delivered")
            finally:
                pass
        try:
            store = restarted.store
            rows = list(store.events_by_seq(enrollment.agent_id, 1, 2**62))
            events = [pb.Event.FromString(r.data) for r in rows]
            gaps = [e.gap for e in events if e.WhichOneof("body") == "gap"]
            assert dropped == list(range(dropped[0], dropped[-1] + 1)), "drops are one range"
            assert [(g.first_seq, g.last_seq) for g in gaps] == [(dropped[0], dropped[-1])]
            assert gaps[0].reason == "spool full"
            assert sum(gaps[0].dropped_by_kind.values()) == len(dropped)
            alerts = store.alerts(enrollment.agent_id)
            assert [a.kind for a in alerts] == ["recorded_loss"]
            assert f"seq {dropped[0]}..{dropped[-1]}" in alerts[0].detail
            stored = {r.seq for r in rows}
            assert not stored & set(dropped)
            assert stored | set(dropped) == set(range(1, rows[-1].seq + 1))
        finally:
            restarted.stop(grace_s=0.5)


# -- a store that refuses writes -----------------------------------------------------------

def test_store_refusing_writes_gives_unavailable_and_loses_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with running_fleet(tmp_path) as fleet:
        state = tmp_path / "agent"
        enrollment = fleet.enroll(state)
        store = fleet.store
        real_tx = store._tx
        failing = threading.Event()

        @contextlib.contextmanager
        def tx() -> Iterator[object]:
            if failing.is_set():
                raise StoreUnavailable(f"write to {store.path} failed: disk I/O error")
            with real_tx() as db:
                yield db
        store._tx = tx  # type: ignore[method-assign]
        with running_agent(agent_config(state)) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            failing.set()
            for i in range(2000):
                agent.chain.record(_synthetic(i))
            wait_for(lambda: any("UNAVAILABLE" in r.getMessage() and
                                 "keep spooling" in r.getMessage() for r in caplog.records),
                     what="the agent to hear UNAVAILABLE")
            stuck = fleet.store.chain_state(enrollment.agent_id).last_seq
            assert stuck < agent.chain.seq
            assert agent.spool.stats().pending_records > 0
            for i in range(2000, 3000):
                agent.chain.record(_synthetic(i))
            failing.clear()
            wait_for(lambda: agent.spool.acked_seq >= agent.chain.seq, timeout=30,
                     what="delivery after the store recovered")
        events = _check_chain(fleet.store, enrollment.agent_id)
        assert sum(1 for e in events if e.WhichOneof("body") == "process") == 3000


# -- oversized messages ------------------------------------------------------------------------

def test_oversized_messages_are_refused_without_memory_growth(tmp_path: Path) -> None:
    data, state = tmp_path / "server", tmp_path / "agent"
    init_server(data, ["localhost", "127.0.0.1"])
    server = _server_proc(data)
    with _reaped(server):
        enrollment = _enroll(data, state)
        ports = json.loads((data / "run" / "server.json").read_text())
        paths = AgentPaths(state)
        creds = grpc.ssl_channel_credentials(
            root_certificates=ServerPaths(data).ca_cert.read_bytes(),
            private_key=paths.tls_key.read_bytes(), certificate_chain=paths.certificate.read_bytes())
        channel = grpc.secure_channel(f"127.0.0.1:{ports['collector_port']}", creds, options=[
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.max_send_message_length", 64 << 20)])
        stub = pb_grpc.CollectorStub(channel)
        hello = pb.AgentMessage(hello=pb.Hello(agent_id=enrollment.agent_id))
        huge = pb.AgentMessage(batch=pb.EventBatch(events=[b"x" * (MAX_MESSAGE_BYTES + 1)]))
        server_ps = psutil.Process(server.pid)
        samples = []
        for attempt in range(25):
            with pytest.raises(grpc.RpcError) as info:
                for _ in stub.Session(iter([hello, huge]), timeout=20):
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            samples.append(server_ps.memory_info().rss)
        # After warm-up (allocator pools, TLS buffers) the server's RSS stays flat.
        warm = max(samples[:5])
        assert max(samples[5:]) - warm < 24 << 20, [s >> 20 for s in samples]
        # And it still serves the same agent normally.
        first = next(iter(stub.Session(iter([hello]), timeout=10)))
        assert first.WhichOneof("msg") == "ack"
        channel.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
