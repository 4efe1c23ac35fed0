"""The running agent: wires sensors, the evidence chain, spool, session, isolation and the
command executor together, in the order that keeps every promise:

1. open the spool (recovering after a crash) and resume the chain from its durable head;
2. record a START event that names the head it resumes from;
3. re-apply a persisted isolation *before* connecting, and watch it for drift;
4. start sensors, the executor and the session.

On stop it records STOP, signs a final checkpoint, gives the session a moment to deliver, and
leaves any isolation in force.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.actions.isolation import IsolationController, IsolationTransition
from agent.actions.response import ResponseActions
from agent.chain import EvidenceChain
from agent.commands import CommandGate
from agent.config import AgentConfig
from agent.executor import Executor
from agent.rpc import Endpoint, SessionTransport
from agent.sensors import Sensor, build_sensors
from agent.session import Session
from agent.spool import Spool
from agent.state import AgentPaths, Enrollment
from evidence.keys import load_private_key, public_key_from_bytes
from isolation import FirewallBackend, IsolationError, select_backend
from isolation.backends.fake import FakeBackend
from proto import ringfence_pb2 as pb

if TYPE_CHECKING:
    from agent.metrics import AgentMetrics, AgentSnapshot

logger = logging.getLogger(__name__)

TRANSITIONS: dict[str, int] = {name.lower(): int(value) for name, value in
                               pb.IsolationActivity.Transition.items()}
DRAIN_ON_STOP_S = 5.0


@dataclass(frozen=True)
class AgentStatus:
    agent_id: str
    seq: int
    acked_seq: int
    connected: bool
    isolation: str
    sensors: dict[str, str]


class Agent:
    def __init__(self, config: AgentConfig, paths: AgentPaths, enrollment: Enrollment) -> None:
        self.config = config
        self.paths = paths
        self.enrollment = enrollment
        self.agent_id = enrollment.agent_id
        key = load_private_key(paths.identity_key)
        self._key: Ed25519PrivateKey = key
        self.spool = Spool(paths.spool, config.spool)
        self.chain = EvidenceChain(self.agent_id, key, self.spool, config.chain)
        transport = SessionTransport(
            [Endpoint(target, enrollment.tls_name) for target in enrollment.collector_targets],
            paths.ca.read_bytes(), paths.tls_key.read_bytes(), paths.certificate.read_bytes())
        self._applied_at = float("inf")
        self.backend = self._backend()
        self.isolation = IsolationController(self.backend, paths.isolation,
                                             emit=self._isolation_event,
                                             session_healthy=self._session_healthy)
        self.gate = CommandGate(self.agent_id,
                                public_key_from_bytes(bytes.fromhex(enrollment.command_public_key)),
                                paths.commands)
        self.sensors: list[Sensor] = build_sensors(config.sensors)
        self.session = Session(transport, self.spool, self._hello, self._on_command,
                               config.session, heartbeat=self._heartbeat,
                               on_server_message=self.isolation.wake)
        self.responses = ResponseActions(paths.root, self.chain.record, config.isolation.netns,
                                         config.max_file_bytes)
        self.executor = Executor(self.agent_id, self.gate, key, self.isolation, self.chain.record,
                                 self._send_result, config.max_file_bytes, self._send_chunk,
                                 make_durable=self.spool.flush,
                                 responses=self.responses)
        self._threads: list[threading.Thread] = []
        self.metrics: AgentMetrics | None = None
        if config.metrics.listen:
            # Imported only when enabled: prometheus_client and its wsgiref server cost ~3 MB
            # resident in every agent that never serves metrics.
            from agent.metrics import AgentMetrics

            self.metrics = AgentMetrics(self._metrics_snapshot)
        self.metrics_port = 0

    def _backend(self) -> FirewallBackend:
        iso = self.config.isolation
        if iso.backend == "fake":
            logger.warning("isolation uses the FAKE backend: no firewall rules will be applied")
            return FakeBackend()
        try:
            return select_backend(iso.backend, iso.netns)
        except IsolationError as e:
            # Loud, and visible to responders: the agent runs, but isolation commands will fail.
            logger.error("no firewall backend available, isolation will fail: %s", e)
            return FakeBackend(is_available=False)

    # -- callbacks ------------------------------------------------------------------------------
    def sensor_modes(self) -> dict[str, str]:
        modes = {s.name: s.mode for s in self.sensors}
        modes["isolation"] = self.backend.name if self.backend.available() else "unavailable"
        return modes

    def _hello(self, acked_seq: int) -> pb.Hello:
        return pb.Hello(agent_id=self.agent_id, last_acked_seq=acked_seq,
                        agent_version=__version__, last_command_seq=self.gate.last_seq,
                        isolation_state=self.isolation.state, sensors=self.sensor_modes())

    def _heartbeat(self) -> pb.Heartbeat:
        stats = self.spool.stats()
        return pb.Heartbeat(time_ns=time.time_ns(), spooled=stats.pending_records,
                            dropped=self.chain.dropped)

    def _on_command(self, envelope: bytes) -> None:
        self.executor.submit(envelope)

    def _send_result(self, result: pb.CommandResult) -> bool:
        return self.session.send(pb.AgentMessage(result=result))

    def _send_chunk(self, chunk: pb.FileChunk) -> bool:
        return self.session.send(pb.AgentMessage(file_chunk=chunk), timeout=60.0)

    def _record_telemetry(self, event: pb.Event) -> None:
        seq = self.chain.record(event)
        if self.metrics is not None:
            self.metrics.recorded(event.WhichOneof("body") or "unknown", seq)

    def _metrics_snapshot(self) -> AgentSnapshot:
        from agent.metrics import AgentSnapshot

        stats = self.spool.stats()
        return AgentSnapshot(stats.bytes_used, stats.pending_records, self.isolation.state,
                             self.session.connected.is_set())

    def _session_healthy(self) -> bool:
        if self.session.healthy_since(self._applied_at):
            return True
        self.session.ping()
        return False

    def _isolation_event(self, t: IsolationTransition) -> None:
        if t.transition in ("applied", "reapplied"):
            # Confirmation needs collector traffic after the rules (re)took effect.
            self._applied_at = time.monotonic()
        self.chain.record(pb.Event(
            severity_id=4 if t.transition in ("failed", "drift") else 2,
            isolation=pb.IsolationActivity(
                transition=TRANSITIONS.get(t.transition, 0),  # type: ignore[arg-type]
                command_id=t.command_id,
                backend=t.backend, ruleset_sha256=t.ruleset_sha256, ruleset=t.listing,
                policy_json=t.policy_json, reason=t.reason,
                connections_cut=t.connections_cut or 0)))

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, stop: threading.Event) -> None:
        if self.metrics is not None and self.config.metrics.listen:
            # First, so a bad or busy address fails the start before anything is recorded.
            self.metrics_port = self.metrics.serve(self.config.metrics.listen)
        seq, head = self.chain.head
        recovery = self.spool.recovery
        self.chain.record(pb.Event(severity_id=1, lifecycle=pb.AgentLifecycle(
            kind=pb.AgentLifecycle.START, agent_version=__version__, prev_head=head.hex(),
            sensors=self.sensor_modes(), hostname=socket.gethostname(), pid=os.getpid(),
            message=f"resuming after seq {seq}")))
        if recovery.corrupt_skipped or recovery.torn_bytes_truncated:
            self.chain.record(pb.Event(severity_id=4, sensor_loss=pb.SensorLoss(
                sensor="spool", reason=f"spool recovery: {recovery.corrupt_skipped} corrupt "
                f"records skipped, {recovery.torn_bytes_truncated} torn bytes truncated",
                lost=recovery.corrupt_skipped)))
        outcome = self.isolation.resume_from_disk()
        try:
            blocked = self.responses.resume_from_disk()
            if blocked:
                logger.warning("re-applied the indicator block table: %d networks", len(blocked))
        except Exception as e:
            logger.error("could not re-apply the indicator block table: %s", e)
            self.chain.record(pb.Event(severity_id=4, lifecycle=pb.AgentLifecycle(
                kind=pb.AgentLifecycle.SENSOR_ERROR, message=f"block table not re-applied: {e}")))
        if outcome is not None:
            logger.warning("re-applied persisted isolation (command %s): %s",
                           outcome.command_id, outcome.state)
        self.isolation.start_drift_watch()
        for sensor in self.sensors:
            try:
                sensor.start(self._record_telemetry)
            except Exception as e:
                logger.error("sensor %s failed to start: %s", sensor.name, e)
                self.chain.record(pb.Event(severity_id=4, lifecycle=pb.AgentLifecycle(
                    kind=pb.AgentLifecycle.SENSOR_ERROR, message=f"{sensor.name}: {e}")))
        self.executor.start()
        for name, target in (("session", self.session.run), ("housekeeping", self._housekeep)):
            thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if outcome is not None and outcome.state == "pending":
            # Died while an isolation awaited confirmation: confirm-or-revert again, now that
            # the session runs (docs/adr/0003-isolation-resume.md).
            thread = threading.Thread(target=self._confirm_resumed, name="isolation-confirm",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("agent %s running; sensors: %s", self.agent_id, self.sensor_modes())

    def _confirm_resumed(self) -> None:
        outcome = self.isolation.confirm()
        logger.warning("resumed isolation (command %s) after confirm-or-revert: %s %s",
                       outcome.command_id, outcome.state, outcome.reason)
        self.executor.finish_resumed(outcome)

    def _housekeep(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.chain.flush_gap()
            self.chain.checkpoint()

    def stop(self, stop: threading.Event) -> None:
        """Record STOP and a final checkpoint, try to deliver them, then shut down."""
        for sensor in self.sensors:
            try:
                sensor.stop()
            except Exception:
                logger.exception("sensor %s did not stop cleanly", sensor.name)
        self.chain.record(pb.Event(severity_id=1, lifecycle=pb.AgentLifecycle(
            kind=pb.AgentLifecycle.STOP, agent_version=__version__)))
        self.chain.checkpoint(force=True)
        self.spool.flush()
        deadline = time.monotonic() + DRAIN_ON_STOP_S
        while (self.session.connected.is_set() and self.spool.acked_seq < self.spool.last_seq
               and time.monotonic() < deadline):
            time.sleep(0.05)
        stop.set()
        self.isolation.stop()
        self.executor.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.spool.close()
        if self.metrics is not None:
            self.metrics.stop()

    def status(self) -> AgentStatus:
        return AgentStatus(self.agent_id, self.chain.seq, self.spool.acked_seq,
                           self.session.connected.is_set(), self.isolation.state,
                           self.sensor_modes())
