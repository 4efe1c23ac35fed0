"""Fleet scale of one collector process, measured against targets and floors in the same run.

1. sessions: how many simulated agents (ringfence loadgen: real enrollment, real mTLS Session
   streams, a heartbeat every 30 s) one `ringfence server run` process holds within 2 GB RSS.
   N steps up (fresh server each step) until a step fails (not all online, or RSS over the
   cap) or N reaches --max-agents. Target: 10,000.
2. isolate_100: time from issuing isolate to 100 online simulated agents at once (admin API,
   concurrent calls) until all 100 commands are confirmed succeeded. Target: <= 2 s.
3. pg_ingest: verified ingest (collector.ingest.Ingestor: decode, chain link, checkpoint
   verification, PostgreSQLStore.commit_batch) against a bare binary COPY of the same rows into
   the same table layout, one transaction per batch, same run. Target: >= 40 % of COPY.

Prints one JSON object. Usage: python bench/fleet_scale.py [--max-agents 10000]
[--steps 500,1000,2000,4000,10000] [--skip-sessions]. Needs PostgreSQL for part 3
(RINGFENCE_TEST_PG_DSN, default the local server); loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil

from collector.store import open_store
from proto import ringfence_pb2 as pb
from server.fleet import init_server
from server.pki import Identity, ServerPaths
from server.rpc import AdminClient, ServerAddress

BIN = Path(sys.executable).parent
RSS_CAP = 2 << 30
PORTS = re.compile(r"enroll :(\d+), collector :(\d+), admin [^:]+:(\d+)")
PG_DSN = os.environ.get("RINGFENCE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class Server:
    def __init__(self, data: Path, log: Path, max_sessions: int = 10_000) -> None:
        self.log = log
        out = log.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "ringfence"), "server", "run", "--data-dir", str(data), "--listen",
             "127.0.0.1:0", "--admin", "127.0.0.1:0", "--enroll", "127.0.0.1:0",
             "--max-sessions", str(max_sessions)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = PORTS.search(log.read_text())
            if m:
                self.enroll, self.collector, self.admin = map(int, m.groups())
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def rss(self) -> int:
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def loadgen(server: Server, data: Path, agents: int, duration: float, out: Path,
            rate: float = 0.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "ringfence"), "loadgen", "--server", f"127.0.0.1:{server.collector}",
         "--enroll", f"127.0.0.1:{server.enroll}", "--data-dir", str(data), "--agents",
         str(agents), "--rate", str(rate), "--duration", str(duration), "--heartbeat", "30"],
        stdout=out.open("wb"), stderr=subprocess.DEVNULL, cwd=REPO)


def online(data: Path) -> int:
    store = open_store(str(ServerPaths(data).database))
    try:
        return len(store.session_owners(time.time_ns() - 30 * 10**9))
    finally:
        store.close()


def fresh_fleet(base: Path, name: str) -> Path:
    data = base / name
    init_server(data, ["localhost", "127.0.0.1"])
    return data


# -- 1. sessions per process ---------------------------------------------------------------------

def _tree_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of a process and its children."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the load generator and its worker processes (they would outlive it)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    proc.send_signal(signal.SIGKILL)
    for kid in kids:
        try:
            kid.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)


def seen_since(data: Path, since_ns: int) -> int:
    """Agents whose last-seen time (heartbeats, coalesced by the collector) is >= since_ns."""
    store = open_store(str(ServerPaths(data).database))
    try:
        return sum(1 for a in store.list_agents() if a.last_seen_ns >= since_ns)
    finally:
        store.close()


def sessions_step(base: Path, n: int, hold_s: float, max_sessions: int) -> dict[str, Any]:
    data = fresh_fleet(base, f"sessions-{n}")
    server = Server(data, base / f"server-{n}.log", max_sessions)
    ramp_s = max(60.0, n / 25)
    time.sleep(2.0)
    idle_rss = server.rss()
    sproc = psutil.Process(server.proc.pid)
    server_cpu0 = _tree_cpu_s(sproc)
    peak_rss, held, started = 0, 0, time.monotonic()
    reached_s, held_at_end, seen, gen_cpu = 0.0, 0, 0, 0.0
    try:
        gen = loadgen(server, data, n, duration=ramp_s + hold_s + 30,
                      out=base / f"loadgen-{n}.json")
        gproc = psutil.Process(gen.pid)
        try:
            deadline = time.monotonic() + ramp_s
            while time.monotonic() < deadline and gen.poll() is None:
                gen_cpu = max(gen_cpu, _tree_cpu_s(gproc))
                peak_rss = max(peak_rss, server.rss())
                held = max(held, online(data))
                if held >= n:
                    break
                time.sleep(1.0)
            reached_s = time.monotonic() - started
            # Hold at least one heartbeat interval: every agent must heartbeat in it, and the
            # collector's coalesced last-seen writes must record each of them.
            hold_start_ns = time.time_ns()
            hold_end = time.monotonic() + hold_s
            while time.monotonic() < hold_end and gen.poll() is None:
                gen_cpu = max(gen_cpu, _tree_cpu_s(gproc))
                peak_rss = max(peak_rss, server.rss())
                held = max(held, online(data))
                time.sleep(1.0)
            held_at_end = online(data)
            time.sleep(2.0)   # one more flush of coalesced heartbeats
            seen = seen_since(data, hold_start_ns)
        finally:
            _kill_tree(gen)
        server_threads = sproc.num_threads()
        server_cpu = _tree_cpu_s(sproc) - server_cpu0
    finally:
        server.stop()
    return {"agents": n, "online": held, "online_at_end_of_hold": held_at_end,
            "heartbeats_seen_in_hold": seen, "hold_s": hold_s,
            "rss_mb": peak_rss >> 20, "idle_rss_mb": idle_rss >> 20,
            "kb_per_session": round((peak_rss - idle_rss) / 1024 / max(held, 1), 1),
            "server_threads": server_threads, "server_cpu_s": round(server_cpu, 1),
            "loadgen_cpu_s": round(gen_cpu, 1), "max_sessions": max_sessions,
            "time_to_online_s": round(reached_s, 1),
            "ok": held >= n and held_at_end >= n and peak_rss <= RSS_CAP
            and (hold_s < 30 or seen >= n)}


# -- 2. isolate 100 at once ----------------------------------------------------------------------

def isolate_100(base: Path, agents: int = 100) -> dict[str, Any]:
    data = fresh_fleet(base, "isolate")
    server = Server(data, base / "server-isolate.log")
    try:
        gen = loadgen(server, data, agents, duration=120, out=base / "loadgen-isolate.json")
        try:
            deadline = time.monotonic() + 60
            while online(data) < agents and time.monotonic() < deadline:
                time.sleep(0.5)
            if online(data) < agents:
                return {"error": f"only {online(data)} of {agents} agents came online"}
            store = open_store(str(ServerPaths(data).database))
            ids = [a.agent_id for a in store.list_agents()]
            store.close()
            identity = Identity.from_pem(ServerPaths(data).responder_identity("admin")
                                         .read_bytes())
            clients = [AdminClient(ServerAddress(f"127.0.0.1:{server.admin}", "localhost"),
                                   identity) for _ in range(8)]
            try:
                clients[0].list_hosts()          # warm the channels before timing
                for c in clients[1:]:
                    c.list_hosts()
                started = time.monotonic()
                with futures.ThreadPoolExecutor(len(clients)) as pool:
                    statuses = list(pool.map(
                        lambda i: clients[i % len(clients)].isolate(pb.IsolateRequest(
                            host=ids[i], reason="bench: isolate 100")), range(len(ids))))
                issued_s = time.monotonic() - started
                pending = {s.command_id for s in statuses}
                failed: list[str] = []
                while pending and time.monotonic() - started < 30:
                    for command_id in list(pending):
                        status = clients[0].get_command(command_id)
                        if status.status == "succeeded":
                            pending.discard(command_id)
                        elif status.status in ("failed", "rejected", "expired"):
                            pending.discard(command_id)
                            failed.append(status.status)
                    if pending:
                        time.sleep(0.02)
                confirmed_s = time.monotonic() - started
            finally:
                for c in clients:
                    c.close()
        finally:
            _kill_tree(gen)
    finally:
        server.stop()
    return {"agents": len(ids), "issued_s": round(issued_s, 3),
            "all_confirmed_s": round(confirmed_s, 3), "unconfirmed": len(pending),
            "failed": len(failed), "target_s": 2.0,
            "ok": not pending and not failed and confirmed_s <= 2.0}


# -- 3. PostgreSQL ingest vs bare COPY ------------------------------------------------------------

def pg_ingest(batches: int = 30, batch: int = 2000) -> dict[str, Any]:
    import psycopg

    from collector.ingest import Ingestor
    from collector.store.base import AgentRecord, EventRow
    from evidence.chain import GENESIS_HASH, link
    from evidence.checkpoint import Checkpoint, sign_checkpoint
    from evidence.keys import generate_private_key, public_key_bytes
    from server.loadgen import _body

    schema = f"rf_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_DSN else "?"
    url = f"{PG_DSN}{sep}options=-csearch_path%3D{schema}"
    try:
        store = open_store(url, migrate=True)
        key = generate_private_key()
        agent = AgentRecord("bench-agent", "bench", "linux", "6.1", "m", (), "0",
                            public_key_bytes(key.public_key()), "f" * 64, time.time_ns())
        store.register_agent(agent)
        rng = random.Random(7)
        head, seq, prepared = GENESIS_HASH, 0, []
        for _ in range(batches):
            events = []
            for _ in range(batch):
                seq += 1
                e = pb.Event(seq=seq, time_ns=time.time_ns(), agent_id=agent.agent_id,
                             severity_id=1)
                _body(e, seq, rng)
                data = e.SerializeToString()
                head = link(head, data)
                events.append(data)
            cp = sign_checkpoint(Checkpoint(agent.agent_id, seq, head, time.time_ns()), key)
            prepared.append((events, [cp]))
        ingestor = Ingestor(store)
        started = time.perf_counter()
        for events, cps in prepared:
            ingestor.ingest(agent, events, cps)
        ingest_s = time.perf_counter() - started
        assert store.chain_state(agent.agent_id).last_seq == seq
        assert store.alerts(agent.agent_id) == [], "bench events must verify cleanly"
        store.close()
        # Floor: the same rows (bytes, seqs, heads) by bare binary COPY, one commit per batch.
        rows, head, seq = [], GENESIS_HASH, 0
        now = time.time_ns()
        for events, _ in prepared:
            chunk = []
            for data in events:
                seq += 1
                head = link(head, data)
                chunk.append(EventRow("copy-agent", seq, now, "process", data, head, now))
            rows.append(chunk)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE copy_floor (LIKE events INCLUDING ALL)")
            started = time.perf_counter()
            for chunk in rows:
                with conn.transaction(), conn.cursor() as cur, cur.copy(
                        "COPY copy_floor (agent_id, seq, time_ns, kind, data, chain_hash, "
                        "received_ns) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["text", "int8", "int8", "text", "bytea", "bytea", "int8"])
                    for r in chunk:
                        copy.write_row(r)
            copy_s = time.perf_counter() - started
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    total = batches * batch
    ingest_eps, copy_eps = total / ingest_s, total / copy_s
    return {"events": total, "batch": batch, "ingest_eps": round(ingest_eps),
            "bare_copy_eps": round(copy_eps), "ratio": round(ingest_eps / copy_eps, 3),
            "target_ratio": 0.40, "ok": ingest_eps / copy_eps >= 0.40}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max-agents", type=int, default=10_000)
    p.add_argument("--steps", default="1000,2500,5000,10000")
    p.add_argument("--hold", type=float, default=40.0,
                   help="seconds to hold each step (>= 30: every agent heartbeats in it)")
    p.add_argument("--skip-isolate", action="store_true")
    p.add_argument("--skip-pg", action="store_true")
    p.add_argument("--skip-sessions", action="store_true")
    p.add_argument("--max-sessions", type=int, default=0,
                   help="server run --max-sessions (default: the shipped default, 10,000, or "
                        "N of the step when larger)")
    args = p.parse_args()
    report: dict[str, Any] = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="rf-fleet-scale-") as tmp:
        base = Path(tmp)
        if not args.skip_pg:
            report["pg_ingest"] = pg_ingest()
        if not args.skip_isolate:
            report["isolate_100"] = isolate_100(base)
        if not args.skip_sessions:
            steps, held = [], 0
            for n in (int(s) for s in args.steps.split(",")):
                if n > args.max_agents:
                    break
                step = sessions_step(base, n, args.hold, args.max_sessions or max(n, 10_000))
                steps.append(step)
                if not step["ok"]:
                    break
                held = n
            report["sessions"] = {"steps": steps, "max_agents_held": held,
                                  "rss_cap_mb": RSS_CAP >> 20, "heartbeat_s": 30,
                                  "target": 10_000, "ok": held >= 10_000}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
