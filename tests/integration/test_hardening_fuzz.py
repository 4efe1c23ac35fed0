"""Fuzzing the collector: >= 100,000 malformed or random messages at the ingest logic
in-process (decode_batch, Ingestor.ingest, the Session dispatch), plus a few thousand raw
messages over a real mutual-TLS stream while another agent keeps being served.

A seeded generator mutates valid Event / AgentMessage bytes (bit flips, truncation,
insertion, splicing, extreme field values) and mixes in random bytes, so every run is the same
and a failure names its seed and index. Only typed errors are allowed: IngestError subclasses
in-process, and deliberate status codes on the wire, never the catch-all "internal error".
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.state import AgentPaths
from collector.ingest import IngestError, Ingestor, decode_batch
from collector.rpc import AgentSession, CollectorService, SessionRegistry, _Abort
from collector.store.base import AgentRecord, StoreError
from collector.store.sqlite import SQLiteStore
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from tests.integration.fleet import Fleet, NullControl, running_fleet, wait_for

SEED = 20240611
AGENT = "0b5c7a52-5d1e-4a0a-9a39-000000000001"
U64 = 2**64 - 1


def _valid_event(rng: random.Random, seq: int, agent_id: str = AGENT) -> pb.Event:
    event = pb.Event(seq=seq, time_ns=rng.randrange(1, 2**62), agent_id=agent_id,
                     severity_id=rng.randrange(0, 7))
    body = rng.randrange(5)
    if body == 0:
        p = event.process.process
        p.pid, p.name = rng.randrange(1, 2**22), "sh"
        p.argv.extend([b"/bin/sh", b"-c", rng.randbytes(rng.randrange(0, 40))])
    elif body == 1:
        event.file.path = rng.randbytes(rng.randrange(1, 60))
        event.file.size = rng.randrange(U64)
    elif body == 2:
        event.gap.first_seq, event.gap.last_seq = rng.randrange(U64), rng.randrange(U64)
    elif body == 3:
        event.lifecycle.kind = rng.choice([1, 2, 3, 4, 99])
        event.lifecycle.prev_head = rng.randbytes(8).hex()
    else:
        event.network.dst_endpoint.ip = "203.0.113.7"
        event.network.pid = rng.randrange(2**32)
    return event


def _mutate(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(7)
    b = bytearray(data)
    if op == 0 and b:                                   # flip bits
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1 and b:                                 # truncate
        del b[rng.randrange(len(b)):]
    elif op == 2:                                       # insert random bytes
        at = rng.randrange(len(b) + 1)
        b[at:at] = rng.randbytes(rng.randrange(1, 16))
    elif op == 3 and b:                                 # overwrite a run
        at = rng.randrange(len(b))
        b[at:at + 4] = rng.randbytes(4)
    elif op == 4:                                       # duplicate a slice (repeated fields)
        at = rng.randrange(len(b) + 1)
        b += b[at:]
    elif op == 5:                                       # pure garbage
        return rng.randbytes(rng.randrange(0, 200))
    # op 6 (or an empty input): leave it valid, so valid events keep moving the chain
    return bytes(b)


def _extreme_event(rng: random.Random, agent_id: str = AGENT) -> bytes:
    """Structurally valid events with values at the edges of their types."""
    event = _valid_event(rng, rng.choice([1, 2**63 - 1, 2**63, U64]), agent_id)
    event.time_ns = rng.choice([-(2**63), 0, 2**63 - 1])
    return event.SerializeToString()


def _batch(rng: random.Random, next_seq: int, p_valid: float = 0.0,
           agent_id: str = AGENT) -> list[bytes]:
    events = []
    for i in range(rng.randrange(1, 6)):
        if rng.random() < 0.05:
            events.append(_extreme_event(rng, agent_id))
        elif rng.random() < p_valid:
            events.append(_valid_event(rng, next_seq + i, agent_id).SerializeToString())
        else:
            events.append(_mutate(rng, _valid_event(rng, next_seq + i,
                                                    agent_id).SerializeToString()))
    return events


def _record(agent_id: str = AGENT) -> AgentRecord:
    from evidence.keys import generate_private_key, public_key_bytes
    return AgentRecord(agent_id=agent_id, hostname="fuzz", os="", kernel="", machine_id="",
                       addresses=(), agent_version="", identity_key=public_key_bytes(
                           generate_private_key().public_key()),
                       cert_fingerprint="00", enrolled_ns=1)


def test_decode_batch_survives_100k_mutated_events() -> None:
    rng = random.Random(SEED)
    accepted = refused = 0
    for i in range(100_000):
        events = _batch(rng, 1 + i % 1000)
        try:
            decode_batch(AGENT, events)
            accepted += 1
        except IngestError:
            refused += 1
        except Exception as e:  # noqa: BLE001 - name what escaped, with seed and index
            pytest.fail(f"seed {SEED} message {i}: {type(e).__name__}: {e}")
    # The generator is useful only if it exercises both sides.
    assert accepted > 5_000 and refused > 50_000, (accepted, refused)


def test_ingestor_and_session_dispatch_survive_mutated_messages(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "fuzz.db")
    # This test is about the decision logic, not durability: skip the fsync per batch.
    store._db.execute("PRAGMA synchronous=OFF")
    agent = _record()
    store.register_agent(agent)
    ingestor = Ingestor(store)
    service = CollectorService(store, NullControl(), SessionRegistry(), ingestor)  # type: ignore[arg-type]
    session = AgentSession(AGENT, "00")
    rng = random.Random(SEED + 1)
    outcomes: dict[str, int] = {}
    agents = [agent]
    for i in range(20_000):
        next_seq = store.chain_state(agent.agent_id).last_seq + 1
        if next_seq > 2**40:
            # An extreme seq was accepted (legal, with a gap alert) and ended this chain's
            # room; go on with a fresh agent so valid batches keep flowing.
            agent = _record(f"{AGENT[:-6]}{len(agents) + 100:06d}")
            store.register_agent(agent)
            agents.append(agent)
            session = AgentSession(agent.agent_id, "00")
            next_seq = 1
        events = _batch(rng, next_seq, p_valid=0.85, agent_id=agent.agent_id)
        checkpoints = [rng.randbytes(rng.randrange(0, 64))] if rng.random() < 0.02 else []
        try:
            if i % 2:
                ingestor.ingest(agent, events, checkpoints)
            else:
                # The Session dispatch, from raw AgentMessage bytes as gRPC would hand them.
                raw = pb.AgentMessage(batch=pb.EventBatch(
                    events=events, checkpoints=checkpoints)).SerializeToString()
                if rng.random() < 0.3:
                    raw = _mutate(rng, raw)
                try:
                    message = pb.AgentMessage.FromString(raw)
                except Exception:  # noqa: BLE001 - any refusal of gRPC's decoder
                    # gRPC's deserializer refuses these before our code runs.
                    outcomes["undecodable"] = outcomes.get("undecodable", 0) + 1
                    continue
                service._dispatch(agent, session, message)
                while not session.outbox.empty():
                    session.outbox.get_nowait()
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except (IngestError, _Abort) as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        except StoreError as e:
            pytest.fail(f"seed {SEED + 1} message {i}: store error {e}")
        except Exception as e:  # noqa: BLE001 - name what escaped, with seed and index
            pytest.fail(f"seed {SEED + 1} message {i}: {type(e).__name__}: {e}")
    assert outcomes.get("ok", 0) > 1000 and outcomes.get("MalformedBatch", 0) > 1000, outcomes
    # Each stored chain is still a chain: it ends at the head it reports, and every stored
    # row links to the stored row before it.
    from evidence.chain import GENESIS_HASH, link
    for a in agents:
        state = store.chain_state(a.agent_id)
        rows = list(store.events_by_seq(a.agent_id, 1, state.last_seq))
        assert rows and rows[-1].seq == state.last_seq and rows[-1].chain_hash == state.head
        head = GENESIS_HASH
        for row in rows:
            head = link(head, row.data)
            assert row.chain_hash == head, (a.agent_id, row.seq)
    store.close()


# -- over a real mutual-TLS stream ----------------------------------------------------------

def _raw_session(fleet: Fleet, state_dir: Path) -> grpc.Channel:
    paths = AgentPaths(state_dir)
    creds = grpc.ssl_channel_credentials(root_certificates=fleet.paths.ca_cert.read_bytes(),
                                         private_key=paths.tls_key.read_bytes(),
                                         certificate_chain=paths.certificate.read_bytes())
    return grpc.secure_channel(fleet.collector_target, creds,
                               options=[("grpc.ssl_target_name_override", "localhost")])


def test_fuzz_over_mtls_while_another_agent_is_served(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with running_fleet(tmp_path) as fleet:
        fuzzer = fleet.enroll(tmp_path / "fuzzer")
        good = fleet.enroll(tmp_path / "good")
        raw_call = _raw_session(fleet, tmp_path / "fuzzer").stream_stream(
            "/ringfence.v1.Collector/Session", request_serializer=lambda b: b,
            response_deserializer=pb.ServerMessage.FromString)
        stop = threading.Event()
        good_acks: list[int] = []
        good_errors: list[str] = []

        def serve_good() -> None:
            """The well-behaved agent: one long stream, a batch every 20 ms, acks checked."""
            stub = pb_grpc.CollectorStub(_raw_session(fleet, tmp_path / "good"))
            outbound: queue.Queue[pb.AgentMessage | None] = queue.Queue()
            outbound.put(pb.AgentMessage(hello=pb.Hello(agent_id=good.agent_id)))

            def requests() -> Iterator[pb.AgentMessage]:
                while (m := outbound.get()) is not None:
                    yield m
            try:
                responses = stub.Session(requests(), timeout=120)
                next(responses)
                seq = 0
                while not stop.is_set():
                    seq += 1
                    ev = pb.Event(seq=seq, time_ns=time.time_ns(), agent_id=good.agent_id,
                                  lifecycle=pb.AgentLifecycle(kind=3, message="ok"))
                    outbound.put(pb.AgentMessage(batch=pb.EventBatch(
                        events=[ev.SerializeToString()])))
                    good_acks.append(next(responses).ack.durable_seq)
                    time.sleep(0.02)
            except grpc.RpcError as e:
                good_errors.append(f"{e.code()}: {e.details()}")
            finally:
                outbound.put(None)

        server_thread = threading.Thread(target=serve_good, daemon=True)
        server_thread.start()
        wait_for(lambda: len(good_acks) >= 3, what="the good agent's first acks")
        rng = random.Random(SEED + 2)
        hello = pb.AgentMessage(hello=pb.Hello(agent_id=fuzzer.agent_id)).SerializeToString()
        codes: dict[str, int] = {}
        sent = 0
        try:
            while sent < 3000:
                messages = [hello]
                for _ in range(rng.randrange(1, 8)):
                    raw = pb.AgentMessage(batch=pb.EventBatch(events=_batch(
                        rng, rng.randrange(1, 50)))).SerializeToString()
                    messages.append(_mutate(rng, raw) if rng.random() < 0.5 else raw)
                if rng.random() < 0.1:
                    messages[0] = _mutate(rng, hello)
                sent += len(messages)
                try:
                    for _ in raw_call(iter(messages), timeout=10):
                        pass
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.RpcError as e:
                    name = e.code().name
                    codes[name] = codes.get(name, 0) + 1
                    if e.code() == grpc.StatusCode.INTERNAL:
                        # Only gRPC's own refusal of undecodable bytes, never our catch-all.
                        assert "deserializ" in (e.details() or "").lower(), e.details()
                    assert e.code() != grpc.StatusCode.UNKNOWN, e.details()
            during = len(good_acks)
            time.sleep(0.5)
            assert len(good_acks) > during, "the good agent stopped being served"
        finally:
            stop.set()
            server_thread.join(timeout=15)
        assert good_errors == []
        assert good_acks == sorted(good_acks) and good_acks[-1] == len(good_acks)
        assert set(codes) <= {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED",
                              "FAILED_PRECONDITION", "INTERNAL"}, codes
        assert codes.get("INVALID_ARGUMENT", 0) > 50, codes
        # The catch-all path never ran.
        assert not [r for r in caplog.records if "failed" in r.getMessage()
                    and r.name == "collector.rpc"]
        # The good agent's chain is intact and alert-free.
        assert fleet.store.alerts(good.agent_id) == []
        state = fleet.store.chain_state(good.agent_id)
        assert state.last_seq == good_acks[-1]
        # And a fresh stream of the fuzzer is still served afterwards.
        stub = pb_grpc.CollectorStub(_raw_session(fleet, tmp_path / "fuzzer"))
        first = next(iter(stub.Session(iter([pb.AgentMessage(hello=pb.Hello(
            agent_id=fuzzer.agent_id))]), timeout=10)))
        assert first.WhichOneof("msg") == "ack"
