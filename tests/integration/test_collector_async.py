"""The asyncio Session servicer: a blocked store call does not stall other streams, commands
and closes arrive from foreign threads, heartbeats are answered without store work and their
last-seen times are written in batches."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.state import AgentPaths
from collector.presence import LastSeen
from collector.rpc import (
    MAX_INGEST_HOLD_S,
    CollectorListener,
    CollectorService,
    SessionRegistry,
)
from collector.store.base import StoreUnavailable
from collector.store.sqlite import SQLiteStore
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from proto.limits import server_options
from tests.integration.fleet import Fleet, NullControl, running_fleet, wait_for


class _Stream:
    """A raw agent stream: messages go out through a queue, replies come back in order."""

    def __init__(self, fleet: Fleet, state_dir: Path, agent_id: str,
                 target: str | None = None) -> None:
        paths = AgentPaths(state_dir)
        creds = grpc.ssl_channel_credentials(fleet.paths.ca_cert.read_bytes(),
                                             paths.tls_key.read_bytes(),
                                             paths.certificate.read_bytes())
        self.channel = grpc.secure_channel(target or fleet.collector_target, creds,
                                           options=[("grpc.ssl_target_name_override",
                                                     "localhost")])
        self.outbound: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        self.outbound.put(pb.AgentMessage(hello=pb.Hello(agent_id=agent_id)))

        def requests() -> Iterator[pb.AgentMessage]:
            while (m := self.outbound.get()) is not None:
                yield m
        self.responses = pb_grpc.CollectorStub(self.channel).Session(requests(), timeout=60)

    def send(self, message: pb.AgentMessage) -> None:
        self.outbound.put(message)

    def next(self) -> pb.ServerMessage:
        return next(self.responses)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.outbound.put(None)
        self.responses.cancel()
        self.channel.close()


class _HoldingControl(NullControl):
    """Asks the collector to hold ingest, always (a consumer that never catches up)."""

    def __init__(self) -> None:
        self.asked = 0

    def hold_ingest_s(self, agent_id: str) -> float:
        self.asked += 1
        return 0.05


@contextlib.contextmanager
def _own_listener(fleet: Fleet, control: object | None = None
                  ) -> Iterator[tuple[str, SessionRegistry]]:
    """A second collector listener on the fleet's store, with a registry the test holds."""
    registry = SessionRegistry()
    creds = grpc.ssl_server_credentials(
        [(fleet.paths.server_key.read_bytes(), fleet.paths.server_cert.read_bytes())],
        root_certificates=fleet.paths.ca_cert.read_bytes(), require_client_auth=True)
    service = CollectorService(fleet.store, control or NullControl(), registry)  # type: ignore[arg-type]
    listener = CollectorListener(service,
                                 "127.0.0.1:0", creds, server_options(), 10)
    port = listener.bind()
    listener.start()
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        assert listener.stop(0.5).wait(10)


def _heartbeat() -> pb.AgentMessage:
    return pb.AgentMessage(heartbeat=pb.Heartbeat(time_ns=time.time_ns()))


def _batch(agent_id: str, seq: int) -> pb.AgentMessage:
    ev = pb.Event(seq=seq, time_ns=time.time_ns(), agent_id=agent_id,
                  lifecycle=pb.AgentLifecycle(kind=3, message="ok"))
    return pb.AgentMessage(batch=pb.EventBatch(events=[ev.SerializeToString()]))


def test_blocked_ingest_of_one_stream_does_not_stall_another(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        slow = fleet.enroll(tmp_path / "slow")
        fast = fleet.enroll(tmp_path / "fast")
        store = fleet.store
        real_commit = store.commit_batch
        release = threading.Event()

        def commit_batch(events, *rest):  # type: ignore[no-untyped-def]
            if events and events[0].agent_id == slow.agent_id:
                release.wait(10)
            return real_commit(events, *rest)

        store.commit_batch = commit_batch  # type: ignore[method-assign]
        a = _Stream(fleet, tmp_path / "slow", slow.agent_id)
        b = _Stream(fleet, tmp_path / "fast", fast.agent_id)
        try:
            assert a.next().ack.durable_seq == 0 and b.next().ack.durable_seq == 0
            a.send(_batch(slow.agent_id, 1))            # parks in the store
            time.sleep(0.2)
            started = time.monotonic()
            for i in range(5):
                b.send(_heartbeat())
                assert b.next().WhichOneof("msg") == "ack"
                b.send(_batch(fast.agent_id, i + 1))
                assert b.next().ack.durable_seq == i + 1
            assert time.monotonic() - started < 3.0, "the other stream was stalled"
            release.set()
            assert a.next().ack.durable_seq == 1
            # The parked stream keeps its order: its heartbeat ack follows the batch's ack.
            a.send(_heartbeat())
            assert a.next().ack.durable_seq == 1
        finally:
            release.set()
            a.close()
            b.close()


def test_a_lagging_consumer_holds_the_next_batch_but_never_stops_ingest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    control = _HoldingControl()
    with running_fleet(tmp_path) as fleet, _own_listener(fleet, control) as (target, _):
        agent = fleet.enroll(tmp_path / "a")
        stream = _Stream(fleet, tmp_path / "a", agent.agent_id, target)
        try:
            assert stream.next().ack.durable_seq == 0
            stream.send(_batch(agent.agent_id, 1))
            assert stream.next().ack.durable_seq == 1   # stored and acknowledged at once
            stream.send(_batch(agent.agent_id, 2))
            time.sleep(0.5)
            # Held after batch 1: batch 2 waits in the stream (the agent keeps it spooled).
            assert fleet.store.chain_state(agent.agent_id).last_seq == 1
            assert control.asked >= 5
            # ... but only up to MAX_INGEST_HOLD_S per batch: evidence keeps arriving.
            assert stream.next().ack.durable_seq == 2
            assert control.asked >= MAX_INGEST_HOLD_S / 0.05
        finally:
            stream.close()
    assert any("detection cannot keep up" in r.getMessage() for r in caplog.records)


def test_commands_and_close_from_foreign_threads(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        with _own_listener(fleet) as (target, registry):
            _commands_and_close(fleet, tmp_path, enrollment.agent_id, target, registry)


def _commands_and_close(fleet: Fleet, tmp_path: Path, agent_id: str, target: str,
                        registry: SessionRegistry) -> None:
    s = _Stream(fleet, tmp_path / "agent", agent_id, target)
    try:
        assert s.next().WhichOneof("msg") == "ack"
        wait_for(lambda: registry.get(agent_id) is not None, what="registered")
        session = registry.get(agent_id)
        assert session is not None
        sent: list[bool] = []
        threads = [threading.Thread(target=lambda i=i: sent.append(
            session.send_command(f"envelope-{i}".encode()))) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sent == [True] * 20
        got = {bytes(s.next().command.envelope) for _ in range(20)}
        assert got == {f"envelope-{i}".encode() for i in range(20)}
        threading.Thread(target=session.close, args=(
            grpc.StatusCode.PERMISSION_DENIED, "closed from another thread")).start()
        with pytest.raises(grpc.RpcError) as e:
            s.next()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "closed from another thread"
        wait_for(lambda: registry.get(agent_id) is None, what="unregistered")
        assert not session.send_command(b"late")
    finally:
        s.close()


def test_heartbeats_are_answered_and_last_seen_written_in_batches(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        store = fleet.store
        batches: list[int] = []
        real = store.agents_seen

        def agents_seen(seen):  # type: ignore[no-untyped-def]
            batches.append(len(seen))
            return real(seen)

        store.agents_seen = agents_seen  # type: ignore[method-assign]
        s = _Stream(fleet, tmp_path / "agent", enrollment.agent_id)
        try:
            s.next()
            before = store.get_agent(enrollment.agent_id)
            assert before is not None
            for _ in range(50):
                s.send(_heartbeat())
                assert s.next().WhichOneof("msg") == "ack"
            wait_for(lambda: (a := store.get_agent(enrollment.agent_id)) is not None
                     and a.last_seen_ns > before.last_seen_ns, what="last seen written")
            # Fifty heartbeats within well under a second or two: a handful of writes.
            assert 1 <= len(batches) <= 5 and all(n == 1 for n in batches), batches
        finally:
            s.close()


def test_last_seen_keeps_times_when_the_store_fails(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    seen = LastSeen(store)
    seen.touch("a", 10)
    seen.touch("a", 5)          # older: ignored
    seen.touch("b", 7)
    real = store.agents_seen

    def failing(batch):  # type: ignore[no-untyped-def]
        raise StoreUnavailable("disk full")

    store.agents_seen = failing  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        seen.flush()
    assert seen.pending() == 2
    written: list[dict[str, int]] = []
    store.agents_seen = lambda batch: written.append(dict(batch))  # type: ignore[method-assign]
    seen.touch("a", 12)
    assert seen.flush() == 2 and written == [{"a": 12, "b": 7}]
    assert seen.flush() == 0 and seen.pending() == 0
    store.agents_seen = real  # type: ignore[method-assign]
    store.close()
