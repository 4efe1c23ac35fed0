"""The collector's gRPC face: the agent Session stream, and the one place collector errors
become gRPC status codes.

It authenticates each stream by its verified peer certificate, feeds batches to the Ingestor,
acknowledges what is durable and relays commands from the control plane; it makes no
integrity decisions itself and knows nothing of responders.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from collector.ingest import DecodedEvent, IdentityMismatch, Ingestor, IngestError, MalformedBatch
from collector.peer import PeerIdentity, PeerIdentityError, peer_from_pem
from collector.store.base import AgentRecord, Store, StoreError, StoreUnavailable
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

OUTBOX_LIMIT = 1024


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping of collector errors to gRPC status codes and peer-safe messages."""
    if isinstance(error, IdentityMismatch):
        return grpc.StatusCode.PERMISSION_DENIED, "events must carry the agent id of your certificate"
    if isinstance(error, MalformedBatch):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, IngestError):
        return grpc.StatusCode.INVALID_ARGUMENT, "batch refused"
    if isinstance(error, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "collector storage is failing; keep spooling and retry"
    if isinstance(error, StoreError):
        return grpc.StatusCode.INTERNAL, "collector storage error"
    if isinstance(error, PeerIdentityError):
        return grpc.StatusCode.UNAUTHENTICATED, "client certificate is not a ringfence identity"
    return grpc.StatusCode.INTERNAL, "internal error"


class ControlPlane(Protocol):
    """What the server's control plane hears from agent sessions."""

    def agent_connected(self, agent: AgentRecord, hello: pb.Hello, session: AgentSession) -> None: ...

    def agent_disconnected(self, agent_id: str, session: AgentSession) -> None: ...

    def events_stored(self, agent_id: str, events: list[DecodedEvent]) -> None: ...

    def command_result(self, agent_id: str, result: pb.CommandResult) -> None: ...

    def file_chunk(self, agent_id: str, chunk: pb.FileChunk) -> None: ...


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class AgentSession:
    """One live agent stream: an outbox for server messages and a way to end it."""

    agent_id: str
    fingerprint: str
    outbox: queue.Queue[pb.ServerMessage | _Abort | None] = field(
        default_factory=lambda: queue.Queue(OUTBOX_LIMIT))
    connected_ns: int = field(default_factory=time.time_ns)
    closed: threading.Event = field(default_factory=threading.Event)

    def send(self, message: pb.ServerMessage) -> bool:
        """Queue a message for the agent; False when the session is gone or backed up."""
        if self.closed.is_set():
            return False
        try:
            self.outbox.put_nowait(message)
            return True
        except queue.Full:
            logger.warning("outbox for agent %s is full; message not queued", self.agent_id)
            return False

    def send_command(self, envelope: bytes) -> bool:
        return self.send(pb.ServerMessage(command=pb.Command(envelope=envelope)))

    def close(self, code: grpc.StatusCode, message: str) -> None:
        """End the stream with a status (e.g. the agent's certificate was revoked)."""
        if not self.closed.is_set():
            try:
                self.outbox.put_nowait(_Abort(code, message))
            except queue.Full:
                self.closed.set()


    def revoke(self) -> None:
        """End the stream because the agent's certificate was revoked."""
        self.close(grpc.StatusCode.PERMISSION_DENIED,
                   "this agent's certificate was revoked; re-enroll it with a new token")


class SessionRegistry:
    """Live sessions by agent id; a new session for an agent replaces the old one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, AgentSession] = {}

    def add(self, session: AgentSession) -> None:
        with self._lock:
            old = self._sessions.get(session.agent_id)
            self._sessions[session.agent_id] = session
        if old is not None:
            old.close(grpc.StatusCode.ABORTED, "replaced by a newer session of the same agent")

    def remove(self, session: AgentSession) -> None:
        with self._lock:
            if self._sessions.get(session.agent_id) is session:
                del self._sessions[session.agent_id]

    def get(self, agent_id: str) -> AgentSession | None:
        with self._lock:
            return self._sessions.get(agent_id)

    def online(self) -> set[str]:
        with self._lock:
            return set(self._sessions)


def peer_identity(context: grpc.ServicerContext) -> PeerIdentity:
    """The verified identity of the caller, from the TLS peer certificate."""
    raw: bytes | list[bytes] = context.auth_context().get("x509_pem_cert") or []
    certs: list[bytes] = [raw] if isinstance(raw, bytes) else list(raw)
    if not certs:
        raise PeerIdentityError("no client certificate")
    return peer_from_pem(bytes(certs[0]))


class CollectorService(pb_grpc.CollectorServicer):
    """Serves the agent Session stream."""

    def __init__(self, store: Store, control: ControlPlane, registry: SessionRegistry,
                 ingestor: Ingestor | None = None) -> None:
        self._store = store
        self._control = control
        self._registry = registry
        self._ingestor = ingestor or Ingestor(store)

    def Session(self, request_iterator: Iterator[pb.AgentMessage],
                context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        try:
            peer = peer_identity(context)
        except PeerIdentityError as e:
            logger.warning("refused a session: %s", e)
            context.abort(*status_for(e))
        if peer.kind != "agent":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only agents may open a session")
        agent = self._store.get_agent(peer.name)
        if agent is None or agent.revoked or agent.cert_fingerprint != peer.fingerprint:
            logger.warning("refused a session for agent %s: unknown, revoked or superseded "
                           "certificate", peer.name)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "this certificate is revoked or unknown; re-enroll the agent")
        assert agent is not None
        session = AgentSession(agent.agent_id, peer.fingerprint)
        reader = threading.Thread(target=self._read, name=f"session-{agent.agent_id}",
                                  args=(agent, session, request_iterator), daemon=True)
        context.add_callback(lambda: session.closed.set())
        reader.start()
        try:
            while True:
                item = session.outbox.get()
                if item is None:
                    return
                if isinstance(item, _Abort):
                    context.abort(item.code, item.message)
                yield item
        finally:
            session.closed.set()
            self._registry.remove(session)
            self._control.agent_disconnected(agent.agent_id, session)

    def _read(self, agent: AgentRecord, session: AgentSession,
              requests: Iterator[pb.AgentMessage]) -> None:
        agent_id = agent.agent_id
        try:
            first = next(requests, None)
            if first is None:
                session.outbox.put(None)
                return
            if first.WhichOneof("msg") != "hello":
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be Hello")
            if first.hello.agent_id != agent_id:
                logger.warning("agent %s sent a Hello claiming %r", agent_id, first.hello.agent_id)
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                             "Hello names a different agent than your certificate")
            self._registry.add(session)
            self._store.agent_seen(agent_id, time.time_ns(), first.hello.agent_version,
                                   dict(first.hello.sensors))
            # Tell the agent where its durable chain stands so it resumes from there.
            state = self._store.chain_state(agent_id)
            session.outbox.put(pb.ServerMessage(ack=pb.Ack(durable_seq=state.last_seq)))
            self._control.agent_connected(agent, first.hello, session)
            for message in requests:
                if session.closed.is_set():
                    return
                self._dispatch(agent, session, message)
            session.outbox.put(None)
        except _Abort as e:
            session.outbox.put(e)
        except (IngestError, StoreError, PeerIdentityError) as e:
            logger.warning("session of agent %s ended: %s", agent_id, e)
            session.outbox.put(_Abort(*status_for(e)))
        except grpc.RpcError:
            # The agent went away mid-stream; the generator side cleans up.
            session.outbox.put(None)
        except Exception:
            logger.exception("session of agent %s failed", agent_id)
            session.outbox.put(_Abort(grpc.StatusCode.INTERNAL, "internal error"))

    def _dispatch(self, agent: AgentRecord, session: AgentSession, message: pb.AgentMessage) -> None:
        kind = message.WhichOneof("msg")
        agent_id = agent.agent_id
        if kind == "batch":
            result, new_events = self._ingestor.ingest(
                agent, list(message.batch.events), list(message.batch.checkpoints))
            session.outbox.put(pb.ServerMessage(ack=pb.Ack(durable_seq=result.chain.last_seq)))
            if new_events:
                self._control.events_stored(agent_id, new_events)
        elif kind == "heartbeat":
            self._store.agent_seen(agent_id, time.time_ns(), None, None)
            # Answered, so the agent can prove its session works (isolation confirm-or-revert).
            state = self._store.chain_state(agent_id)
            session.outbox.put(pb.ServerMessage(ack=pb.Ack(durable_seq=state.last_seq)))
        elif kind == "result":
            self._control.command_result(agent_id, message.result)
        elif kind == "file_chunk":
            self._control.file_chunk(agent_id, message.file_chunk)
        elif kind == "hello":
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "Hello sent twice")
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty or unknown message")
