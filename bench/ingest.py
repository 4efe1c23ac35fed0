"""Durable ingest rate of `ringfence server run` against two floors measured in the same run.

N simulated agents (real enrollment, real mutual-TLS Session streams) push batches of valid,
chained events from separate client processes into a real server subprocess (SQLite store,
chain verification, synchronous=FULL commit per batch; detection off, see
bench/detection.py for its cost). Reported:

- durable_eps: events acknowledged as durable per second at steady state;
- grpc_floor_eps: the same batches over the same mTLS streams to a no-op Collector that acks
  without decoding or storing (the transport's ceiling on this machine);
- sqlite_floor_eps: bare executemany inserts of the same rows into the same table layout,
  one synchronous=FULL commit per batch, in one process (the storage ceiling);
- ratio_to_lower_floor: durable_eps / min(floors). Target: 200,000 events/s or >= 0.40.

On a 2-core machine the client processes compete with the server for CPU; that is part of
what is measured. Prints one JSON object. Usage: python bench/ingest.py [--agents 4]
[--seconds 10] [--batch 2000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc

from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc

WINDOW = 4  # batches in flight per stream, like the agent's bounded unacked window


def _events(agent_id: str, first_seq: int, n: int) -> list[bytes]:
    template = pb.Event(agent_id=agent_id, severity_id=1)
    p = template.process
    p.activity_id, p.source = 1, "bench"
    p.process.name, p.process.exe, p.process.uid = "bench", b"/usr/bin/bench", 1000
    p.process.argv.extend([b"/usr/bin/bench", b"--flag", b"value"])
    out = []
    now = time.time_ns()
    for i in range(n):
        template.seq = first_seq + i
        template.time_ns = now + i
        template.process.process.pid = 1000 + i % 30000
        out.append(template.SerializeToString(deterministic=True))
    return out


def _stream_agent(target: str, creds: tuple[bytes, bytes, bytes], agent_id: str, batch: int,
                  batches: list[list[bytes]], stop_at: float, progress: list[int]) -> None:
    ca, key, cert = creds
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=[
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    window = threading.Semaphore(WINDOW)
    done = threading.Event()

    def requests() -> Iterator[pb.AgentMessage]:
        yield pb.AgentMessage(hello=pb.Hello(agent_id=agent_id))
        for events in batches:
            while not window.acquire(timeout=0.2):
                if done.is_set():
                    return
            if time.monotonic() > stop_at:
                return
            yield pb.AgentMessage(batch=pb.EventBatch(events=events))
        done.wait()

    call = channel.stream_stream("/ringfence.v1.Collector/Session",
                                 request_serializer=pb.AgentMessage.SerializeToString,
                                 response_deserializer=pb.ServerMessage.FromString)(
        requests(), timeout=max(stop_at - time.monotonic() + 30, 30))
    first = True
    try:
        for message in call:
            if first:
                first = False
                continue
            progress[0] = message.ack.durable_seq
            window.release()
            if time.monotonic() > stop_at or progress[0] >= len(batches) * batch:
                break
    finally:
        done.set()
        call.cancel()
        channel.close()


def _client(target: str, agents: list[tuple[str, bytes, bytes, bytes]], batch: int,
            per_agent: int, start_at: float, seconds: float,
            out: mp.Queue) -> None:  # type: ignore[type-arg]
    """One client process: pre-built batches, one thread per agent stream, acks sampled."""
    work = []
    for agent_id, ca, key, cert in agents:
        events = _events(agent_id, 1, per_agent)
        work.append((agent_id, (ca, key, cert),
                     [events[i:i + batch] for i in range(0, len(events), batch)]))
    progress = [[0] for _ in work]
    while time.time() < start_at:
        time.sleep(0.01)
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=_stream_agent, args=(target, creds, agent_id, batch, b,
                                                              stop_at, progress[i]), daemon=True)
               for i, (agent_id, creds, b) in enumerate(work)]
    for t in threads:
        t.start()
    samples = []
    while any(t.is_alive() for t in threads):
        samples.append((time.time(), sum(p[0] for p in progress)))
        time.sleep(0.25)
    samples.append((time.time(), sum(p[0] for p in progress)))
    out.put(samples)


def _steady_rate(per_client: list[list[tuple[float, int]]], warm_s: float) -> float:
    """Events/s summed over clients, after a warm-up, up to when the last ack arrived (a
    fast sink can drain the pre-built events before the time is up)."""
    start = min(s[0][0] for s in per_client)
    end = max(next(t for t, n in s if n == s[-1][1]) for s in per_client)
    t0 = start + warm_s if end - (start + warm_s) >= 1.0 else start

    def at(samples: list[tuple[float, int]], t: float) -> int:
        return max((n for ts, n in samples if ts <= t), default=0)
    total = sum(at(s, end) - at(s, t0) for s in per_client)
    return total / max(end - t0, 1e-9)


def _run_clients(target: str, agents: list[tuple[str, bytes, bytes, bytes]], batch: int,
                 seconds: float, processes: int, per_agent: int) -> float:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 3 + len(agents) * per_agent / 400_000
    groups = [agents[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_client, args=(target, g, batch, per_agent, start_at, seconds,
                                               out)) for g in groups if g]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return _steady_rate(results, warm_s=min(2.0, seconds / 4))


class _NoopCollector(pb_grpc.CollectorServicer):
    """Acks every batch as durable without decoding or storing anything."""

    def Session(self, requests: Iterator[pb.AgentMessage],
                context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        acked = 0
        yield pb.ServerMessage(ack=pb.Ack(durable_seq=0))
        for message in requests:
            acked += len(message.batch.events)
            yield pb.ServerMessage(ack=pb.Ack(durable_seq=acked))


def noop_server(data_dir: Path, port_file: Path) -> None:
    from proto.limits import server_options
    from server.pki import ServerPaths
    paths = ServerPaths(data_dir)
    creds = grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.ca_cert.read_bytes(), require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(64), options=server_options())
    pb_grpc.add_CollectorServicer_to_server(_NoopCollector(), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    port_file.write_text(str(port))
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(1)


def sqlite_floor(rows_per_batch: int, batches: int, directory: Path, index: bool) -> float:
    """Bare executemany of the same rows, one synchronous=FULL WAL commit per batch; with
    `index`, into the same table layout and time index the store uses."""
    import hashlib
    db = sqlite3.connect(directory / f"floor-{index}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE events (agent_id TEXT NOT NULL, seq INTEGER NOT NULL, "
               "time_ns INTEGER NOT NULL, kind TEXT NOT NULL, data BLOB NOT NULL, "
               "chain_hash BLOB NOT NULL, received_ns INTEGER NOT NULL, "
               "PRIMARY KEY (agent_id, seq)) WITHOUT ROWID")
    if index:
        db.execute("CREATE INDEX events_time ON events(agent_id, time_ns)")
    events = _events("floor-agent", 1, rows_per_batch * batches)
    rows = [("floor-agent", i + 1, i, "process", e, hashlib.sha256(e).digest(), i)
            for i, e in enumerate(events)]
    started = time.perf_counter()
    for b in range(batches):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                       rows[b * rows_per_batch:(b + 1) * rows_per_batch])
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return len(rows) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--noop-server", nargs=2, metavar=("DATA_DIR", "PORT_FILE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_server:
        noop_server(Path(args.noop_server[0]), Path(args.noop_server[1]))
        return 0

    from agent.enroll import enroll_agent
    from agent.state import AgentPaths
    from collector.store.sqlite import SQLiteStore
    from server.fleet import create_token, init_server
    from server.pki import ServerPaths

    # Enough events that no stream runs dry within the window (bounded: 600k per agent).
    per_agent = min(600_000, int(args.seconds * 400_000 / args.agents) + args.batch)
    with tempfile.TemporaryDirectory(prefix="rf-bench-ingest-") as tmp:
        base = Path(tmp)
        data = base / "server"
        init_server(data, ["localhost", "127.0.0.1"])
        # Storage is measured here; detection's cost is bench/detection.py's. With detection
        # on, ingest is held to the evaluator's pace (docs/adr/0006-detection-holds-ingest.md).
        (data / "detection.json").write_text(json.dumps({"enabled": False}))
        server = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "server", "run", "--data-dir", str(data),
             "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--enroll", "127.0.0.1:0"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        noop = None
        try:
            run_file = data / "run" / "server.json"
            deadline = time.monotonic() + 30
            while not run_file.exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
            ports = json.loads(run_file.read_text())
            ca = ServerPaths(data).ca_cert.read_bytes()
            agents = []
            for i in range(args.agents):
                store = SQLiteStore(ServerPaths(data).database)
                token = create_token(store)
                store.close()
                paths = AgentPaths(base / f"agent{i}")
                enrollment = enroll_agent(paths, f"127.0.0.1:{ports['enroll_port']}", token, ca,
                                          "localhost")
                agents.append((enrollment.agent_id, ca, paths.tls_key.read_bytes(),
                               paths.certificate.read_bytes()))
            print("measuring the server ...", file=sys.stderr, flush=True)
            durable = _run_clients(f"127.0.0.1:{ports['collector_port']}", agents, args.batch,
                                   args.seconds, args.processes, per_agent)
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
            store = SQLiteStore(ServerPaths(data).database)
            alerts = len(store.alerts())
            store.close()

            port_file = base / "noop.port"
            noop = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                     "--noop-server", str(data), str(port_file)], cwd=REPO)
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the no-op server did not start")
                time.sleep(0.05)
            print("measuring the no-op gRPC floor ...", file=sys.stderr, flush=True)
            grpc_floor = _run_clients(f"127.0.0.1:{port_file.read_text()}", agents, args.batch,
                                      args.seconds, args.processes, per_agent)
            n_batches = max(20, int(200_000 / args.batch))
            sqlite_rate = sqlite_floor(args.batch, n_batches, base, index=True)
            sqlite_bare = sqlite_floor(args.batch, n_batches, base, index=False)
        finally:
            for proc in (server, noop):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    lower = min(grpc_floor, sqlite_rate)
    print(json.dumps({
        "benchmark": "ingest", "agents": args.agents, "batch": args.batch, "detection": "off",
        "seconds": args.seconds, "client_processes": args.processes, "cpus": os.cpu_count(),
        "durable_eps": round(durable), "grpc_floor_eps": round(grpc_floor),
        "sqlite_floor_eps": round(sqlite_rate),
        "sqlite_floor_note": "same table, primary key and time index as the store",
        "sqlite_floor_no_index_eps": round(sqlite_bare),
        "ratio_to_no_index_floor": round(durable / min(grpc_floor, sqlite_bare), 3),
        "ratio_to_lower_floor": round(durable / lower, 3),
        "integrity_alerts": alerts, "target": "200000 eps or ratio >= 0.40",
        "meets_target": durable >= 200_000 or durable / lower >= 0.40,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
