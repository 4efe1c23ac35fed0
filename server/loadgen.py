"""The fleet load simulator behind `ringfence loadgen`: many simulated agents in few processes.

Each simulated agent enrolls for real (token + CSR -> certificate), opens its own mutual-TLS
Session stream, emits realistic process/file/network events chained with
`evidence.chain.link` and covered by Ed25519-signed checkpoints, heartbeats, resumes after the
collector's cumulative ack when a stream breaks, and answers commands: it verifies the server's
signature and the target, and reports isolate/release as succeeded (it changes no firewall).
It is not the agent (no spool, no sensors): it exists to load collectors for benchmarks.

It uses grpc.aio so thousands of streams share one event loop, and splits larger fleets
across worker processes. It is a client of the collector's wire protocol, not part of the
server's own gRPC face (server.rpc), which is why it talks to grpc itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from evidence.chain import GENESIS_HASH, link
from evidence.checkpoint import Checkpoint, sign_checkpoint
from evidence.dsse import COMMAND_TYPE, verify_envelope
from evidence.errors import EvidenceError
from evidence.keys import generate_private_key, public_key_bytes, public_key_from_bytes
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from proto.limits import UNARY_DEADLINE_S, client_options

logger = logging.getLogger(__name__)

LOADGEN_VERSION = "loadgen-0.1"
AGENTS_PER_PROCESS = 2500
MAX_UNACKED = 20_000          # events kept for resending per simulated agent
MAX_BATCH = 2000
CHECKPOINT_NS = 5_000_000_000   # sign a checkpoint at least this often while emitting
# grpc.aio's end-of-stream marker (absent from the type stubs, which describe the sync API).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from the stubs


@dataclass(frozen=True)
class LoadConfig:
    collector: str                       # HOST:PORT of the collector (agents' mTLS port)
    agents: int = 100
    rate: float = 100.0                  # events per second, summed over all agents
    duration_s: float = 30.0
    enroll: str = ""                     # HOST:PORT of enrollment ("" = from data_dir)
    token: str = ""                      # a token with >= agents uses ("" = made in data_dir)
    ca: Path | None = None               # fleet CA ("" = from data_dir)
    data_dir: Path | None = None
    heartbeat_s: float = 30.0
    tls_name: str = "localhost"
    connect_concurrency: int = 64        # enrollments / stream opens in flight per process
    processes: int = 0                   # 0 = one per AGENTS_PER_PROCESS agents
    checkpoint_every: int = 500          # events between signed checkpoints
    batch_interval_s: float = 1.0


class LoadgenError(Exception):
    """The load generator cannot start (no token, no CA, enrollment refused)."""


class _SessionRefused(Exception):
    """The collector ended a new stream without the Ack that must follow Hello."""


@dataclass
class Stats:
    enrolled: int = 0
    connected: int = 0                   # streams up right now
    peak_connected: int = 0
    sessions_opened: int = 0
    events_sent: int = 0
    events_acked: int = 0
    checkpoints_sent: int = 0
    commands_answered: int = 0
    commands_rejected: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def up(self) -> None:
        self.connected += 1
        self.sessions_opened += 1
        self.peak_connected = max(self.peak_connected, self.connected)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "errors"}
        d["errors"] = dict(self.errors)
        return d


@dataclass
class _Identity:
    agent_id: str
    tls_key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    signing_key: Ed25519PrivateKey
    command_key: bytes


def _body(event: pb.Event, seq: int, rng: random.Random) -> None:
    """Fill a realistic body: mostly process launches, some file and network activity."""
    pick = seq % 10
    if pick < 6:
        p = event.process
        p.activity_id, p.source = 1, "netlink"
        proc = p.process
        proc.pid, proc.ppid, proc.uid = 1000 + rng.randrange(60000), 1, rng.choice((0, 1000))
        proc.name = rng.choice(("bash", "python3", "curl", "sshd", "cron", "nginx"))
        proc.exe = b"/usr/bin/" + proc.name.encode()
        proc.argv.extend([proc.exe, b"-c", f"job-{seq}".encode()])
        proc.cwd = b"/var/lib/app"
        proc.start_time_ns = event.time_ns
        proc.exe_sha256 = f"{rng.getrandbits(256):064x}"
        p.parent_process.pid, p.parent_process.name = 1, "systemd"
    elif pick < 8:
        f = event.file
        f.activity_id = rng.choice((1, 3, 4))
        f.path = f"/etc/app/conf-{seq % 50}.yaml".encode()
        f.sha256 = f"{rng.getrandbits(256):064x}"
        f.size, f.mode, f.uid, f.owner = rng.randrange(1, 1 << 20), 0o100644, 0, "root"
        f.inode, f.mtime_ns = rng.getrandbits(32), event.time_ns
    else:
        n = event.network
        n.activity_id, n.protocol, n.direction_id, n.state = 1, "tcp", 2, "ESTABLISHED"
        n.src_endpoint.ip, n.src_endpoint.port = "10.0.0.5", 30000 + rng.randrange(30000)
        n.dst_endpoint.ip = f"198.51.100.{rng.randrange(1, 255)}"
        n.dst_endpoint.port = rng.choice((443, 80, 53, 22))
        n.first_seen_ns = n.last_seen_ns = event.time_ns
        n.bytes_out, n.bytes_in = rng.randrange(1 << 16), rng.randrange(1 << 20)


class _SimAgent:
    """One simulated agent: its chain, its unacknowledged tail and its stream loop."""

    def __init__(self, identity: _Identity, config: LoadConfig, rate: float, stats: Stats,
                 rng: random.Random) -> None:
        self.id = identity
        self.config = config
        self.rate = rate
        self.stats = stats
        self.rng = rng
        self.seq = 0
        self.head = GENESIS_HASH
        self.acked = 0
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.last_checkpoint = 0
        self.last_checkpoint_ns = time.time_ns()
        self.pending_checkpoint: bytes | None = None
        self.command_seq = 0
        self._credit = 0.0

    def _make_events(self, n: int) -> list[bytes]:
        out = []
        now = time.time_ns()
        for _ in range(n):
            self.seq += 1
            event = pb.Event(seq=self.seq, time_ns=now, agent_id=self.id.agent_id,
                             severity_id=1)
            _body(event, self.seq, self.rng)
            data = event.SerializeToString()
            self.head = link(self.head, data)
            self.unacked.append((self.seq, data))
            out.append(data)
        due = (self.seq - self.last_checkpoint >= self.config.checkpoint_every or
               (self.seq > self.last_checkpoint and now - self.last_checkpoint_ns >= CHECKPOINT_NS))
        if due:
            self.last_checkpoint, self.last_checkpoint_ns = self.seq, now
            self.pending_checkpoint = sign_checkpoint(
                Checkpoint(self.id.agent_id, self.seq, self.head, now), self.id.signing_key)
        return out

    def _answer(self, envelope: bytes) -> pb.CommandResult | None:
        try:
            verified = verify_envelope(envelope, COMMAND_TYPE,
                                       [public_key_from_bytes(self.id.command_key)])
            raw = json.loads(verified.payload)
            command_id, action, seq = str(raw["command_id"]), str(raw["action"]), int(raw["seq"])
            target = str(raw["agent_id"])
        except (EvidenceError, ValueError, KeyError, TypeError) as e:
            self.stats.commands_rejected += 1
            logger.warning("simulated agent %s refused a command: %s", self.id.agent_id, e)
            return None
        if target != self.id.agent_id or seq <= self.command_seq:
            self.stats.commands_rejected += 1
            return pb.CommandResult(command_id=command_id, status="rejected",
                                    message="addressed to another agent or replayed")
        self.command_seq = seq
        if action in ("isolate", "release"):
            self.stats.commands_answered += 1
            return pb.CommandResult(command_id=command_id, status="succeeded",
                                    message=f"{action} simulated by the load generator",
                                    detail_json=json.dumps({"simulated": True}))
        self.stats.commands_rejected += 1
        return pb.CommandResult(command_id=command_id, status="rejected",
                                message=f"the load generator does not execute {action}")

    async def run(self, stop: asyncio.Event, gate: asyncio.Semaphore) -> None:
        options: list[tuple[str, Any]] = list(client_options())
        options.append(("grpc.ssl_target_name_override", self.config.tls_name))
        credentials = grpc.ssl_channel_credentials(self.id.ca_pem, self.id.tls_key_pem,
                                                   self.id.cert_pem)
        attempt = 0
        while not stop.is_set():
            async with gate:
                channel = grpc.aio.secure_channel(self.config.collector, credentials,
                                                  options=options)
            try:
                await self._session(channel, stop)
                attempt = 0
            except grpc.aio.AioRpcError as e:
                self.stats.errors[e.code().name] += 1
            except _SessionRefused:
                self.stats.errors["no ack after hello"] += 1
            finally:
                await channel.close(None)
            if stop.is_set():
                return
            attempt += 1
            delay = self.rng.uniform(0.25, min(10.0, 0.5 * 2 ** min(attempt, 5)))
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass

    async def _session(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        stub: Any = pb_grpc.CollectorStub(channel)
        call: Any = stub.Session()
        await call.write(pb.AgentMessage(hello=pb.Hello(
            agent_id=self.id.agent_id, last_acked_seq=self.acked, agent_version=LOADGEN_VERSION,
            last_command_seq=self.command_seq, isolation_state="none",
            sensors={"process": "simulated"})))
        first = await call.read()
        if first is _EOF or first.WhichOneof("msg") != "ack":
            raise _SessionRefused()
        self._on_ack(first.ack.durable_seq)
        self.stats.up()
        writer = asyncio.ensure_future(self._write(call, stop))
        try:
            while True:
                message = await call.read()
                if message is _EOF:
                    return
                kind = message.WhichOneof("msg")
                if kind == "ack":
                    self._on_ack(message.ack.durable_seq)
                elif kind == "command":
                    result = self._answer(bytes(message.command.envelope))
                    if result is not None:
                        await call.write(pb.AgentMessage(result=result))
        finally:
            self.stats.connected -= 1
            writer.cancel()
            call.cancel()

    def _on_ack(self, durable: int) -> None:
        before = self.acked
        while self.unacked and self.unacked[0][0] <= durable:
            self.unacked.popleft()
        self.acked = max(self.acked, min(durable, self.seq))
        self.stats.events_acked += max(0, self.acked - before)

    async def _write(self, call: Any, stop: asyncio.Event) -> None:
        # Resend what the collector has not acknowledged, then emit at this agent's rate.
        tail = [data for seq, data in self.unacked if seq > self.acked]
        for i in range(0, len(tail), MAX_BATCH):
            await call.write(pb.AgentMessage(batch=pb.EventBatch(events=tail[i:i + MAX_BATCH])))
        last_beat = time.monotonic()
        # Spread agents over the interval so batches do not arrive in lockstep.
        await asyncio.sleep(self.rng.uniform(0, self.config.batch_interval_s))
        while not stop.is_set():
            self._credit += self.rate * self.config.batch_interval_s
            n = min(int(self._credit), MAX_BATCH)
            self._credit -= n
            if n and len(self.unacked) + n <= MAX_UNACKED:
                batch = pb.EventBatch(events=self._make_events(n))
                if self.pending_checkpoint is not None:
                    batch.checkpoints.append(self.pending_checkpoint)
                    self.pending_checkpoint = None
                    self.stats.checkpoints_sent += 1
                await call.write(pb.AgentMessage(batch=batch))
                self.stats.events_sent += n
            now = time.monotonic()
            if now - last_beat >= self.config.heartbeat_s:
                await call.write(pb.AgentMessage(heartbeat=pb.Heartbeat(time_ns=time.time_ns())))
                last_beat = now
            await asyncio.sleep(self.config.batch_interval_s)


async def _enroll(stub: Any, config: LoadConfig, token: str, ca_pem: bytes,
                  index: int) -> _Identity:
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringfence-agent")]))
           .sign(tls_key, hashes.SHA256()))
    signing = generate_private_key()
    response = await stub.Enroll(pb.EnrollRequest(
        token=token, csr_pem=csr.public_bytes(serialization.Encoding.PEM),
        host=pb.HostFacts(hostname=f"sim-{index:05d}", os="Debian GNU/Linux 12 (simulated)",
                          kernel="6.1.0-sim", machine_id=f"{random.getrandbits(128):032x}",
                          addresses=[f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"],
                          agent_version=LOADGEN_VERSION),
        identity_public_key=public_key_bytes(signing.public_key())), timeout=UNARY_DEADLINE_S)
    return _Identity(response.agent_id,
                     tls_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
                     bytes(response.certificate_pem), bytes(response.ca_pem) or ca_pem, signing,
                     bytes(response.command_public_key))


async def _run_worker(config: LoadConfig, first: int, count: int, token: str,
                      ca_pem: bytes) -> dict[str, Any]:
    stats = Stats()
    rng = random.Random(first)
    gate = asyncio.Semaphore(config.connect_concurrency)
    options: list[tuple[str, Any]] = list(client_options())
    options.append(("grpc.ssl_target_name_override", config.tls_name))
    enroll_channel = grpc.aio.secure_channel(
        config.enroll, grpc.ssl_channel_credentials(root_certificates=ca_pem), options=options)
    stub = pb_grpc.EnrollmentStub(enroll_channel)

    async def enroll_one(i: int) -> _Identity | None:
        async with gate:
            try:
                identity = await _enroll(stub, config, token, ca_pem, i)
            except grpc.aio.AioRpcError as e:
                stats.errors[f"enroll {e.code().name}"] += 1
                logger.warning("enrollment %d failed: %s", i, e.details())
                return None
            stats.enrolled += 1
            return identity

    started = time.monotonic()
    identities = [i for i in await asyncio.gather(*(enroll_one(first + n) for n in range(count)))
                  if i is not None]
    await enroll_channel.close(None)
    enroll_s = time.monotonic() - started
    per_agent_rate = config.rate / max(config.agents, 1)
    agents = [_SimAgent(identity, config, per_agent_rate, stats, random.Random(rng.random()))
              for identity in identities]
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(a.run(stop, gate)) for a in agents]
    run_started = time.monotonic()
    await asyncio.sleep(config.duration_s)
    stop.set()
    run_s = time.monotonic() - run_started
    # Streams wait in read(); cancelling the tasks ends them (and their calls) at once.
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    report = stats.as_dict()
    report.update(enroll_s=round(enroll_s, 3), run_s=round(run_s, 3),
                  agent_ids=[i.agent_id for i in identities])
    return report


def _worker_main(config: LoadConfig, first: int, count: int, token: str, ca_pem: bytes,
                 out: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    out.put(asyncio.run(_run_worker(config, first, count, token, ca_pem)))


def _prepare(config: LoadConfig) -> tuple[LoadConfig, str, bytes]:
    """Resolve the enrollment address, token and CA, from flags or the server data dir."""
    token, enroll, ca_pem = config.token, config.enroll, b""
    if config.ca is not None:
        ca_pem = config.ca.read_bytes()
    if config.data_dir is not None:
        from server.fleet import create_token
        from server.pki import ServerPaths
        from server.storage import open_server_store

        paths = ServerPaths(config.data_dir)
        ca_pem = ca_pem or paths.ca_cert.read_bytes()
        if not enroll:
            try:
                run = json.loads((paths.root / "run" / "server.json").read_text())
            except FileNotFoundError as e:
                raise LoadgenError(f"no running server found for {paths.root}; give "
                                   "--enroll HOST:PORT") from e
            enroll = f"{config.collector.rsplit(':', 1)[0]}:{run['enroll_port']}"
        if not token:
            store = open_server_store(paths)
            try:
                token = create_token(store, uses=config.agents, ttl_s=3600)
            finally:
                store.close()
    if not (token and enroll and ca_pem):
        raise LoadgenError("loadgen needs --data-dir, or --enroll, --token and --ca")
    return (LoadConfig(**{**config.__dict__, "enroll": enroll, "token": token}), token, ca_pem)


def run_loadgen(config: LoadConfig) -> dict[str, Any]:
    """Run the simulation for `duration_s` and return a JSON-able report."""
    config, token, ca_pem = _prepare(config)
    processes = config.processes or max(1, -(-config.agents // AGENTS_PER_PROCESS))
    shares = [config.agents // processes + (1 if i < config.agents % processes else 0)
              for i in range(processes)]
    started = time.monotonic()
    if processes == 1:
        reports = [asyncio.run(_run_worker(config, 0, config.agents, token, ca_pem))]
    else:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs, first = [], 0
        for share in shares:
            p = ctx.Process(target=_worker_main, args=(config, first, share, token, ca_pem, out),
                            daemon=True)
            p.start()
            procs.append(p)
            first += share
        reports = [out.get(timeout=config.duration_s + 600) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    elapsed = time.monotonic() - started
    total: dict[str, Any] = {"agents": config.agents, "processes": processes,
                             "target_rate": config.rate, "duration_s": config.duration_s}
    for key in ("enrolled", "peak_connected", "sessions_opened", "events_sent", "events_acked",
                "checkpoints_sent", "commands_answered", "commands_rejected"):
        total[key] = sum(int(r[key]) for r in reports)
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    total["errors"] = dict(errors)
    run_s = max(float(r["run_s"]) for r in reports)
    total["events_per_s"] = round(total["events_acked"] / run_s, 1) if run_s else 0.0
    total["enroll_s"] = max(float(r["enroll_s"]) for r in reports)
    total["elapsed_s"] = round(elapsed, 3)
    return total
