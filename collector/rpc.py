"""The collector's gRPC face: the agent Session stream, its asyncio listener, and the one place
collector errors become gRPC status codes.

Sessions run on one asyncio event loop (grpc.aio) in a dedicated thread, so a process holds
thousands of idle streams without a thread each; blocking store work (ingest, the control
plane) runs on a small thread pool, one call in flight per stream so each agent's batches are
verified in order. It authenticates each stream by its verified peer certificate, feeds batches
to the Ingestor, acknowledges what is durable and relays commands from the control plane; it
makes no integrity decisions itself and knows nothing of responders.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from collector.ingest import DecodedEvent, IdentityMismatch, IngestError, Ingestor, MalformedBatch
from collector.peer import PeerIdentity, PeerIdentityError, peer_from_pem
from collector.presence import FLUSH_INTERVAL_S, LastSeen
from collector.store.base import AgentRecord, Store, StoreError, StoreUnavailable
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# Server messages queued for one stream by other threads (commands) before send() refuses;
# the stream's own acks wait for room instead (backpressure on a peer that does not read).
OUTBOX_LIMIT = 1024
# Threads doing blocking store and control-plane work for all streams of the process.
STORE_WORKERS = 4
# At most this long is a session held after one batch while the control plane asks to hold
# ingest, so a stuck consumer slows agents down but never stops evidence from arriving.
MAX_INGEST_HOLD_S = 2.0
# grpc.aio's end-of-stream marker (absent from the type stubs).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from the stubs

_T = TypeVar("_T")


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping of collector errors to gRPC status codes and peer-safe messages."""
    if isinstance(error, IdentityMismatch):
        return grpc.StatusCode.PERMISSION_DENIED, "events must carry the agent id of your certificate"
    if isinstance(error, MalformedBatch):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, IngestError):
        return grpc.StatusCode.INVALID_ARGUMENT, "batch refused"
    if isinstance(error, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, "cannot deserialize the message as an AgentMessage"
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

    def hold_ingest_s(self, agent_id: str) -> float:
        """Seconds to wait before reading the agent's next message after a batch (0: none):
        work downstream of storage (detection) is lagging. Asked again after each wait."""
        ...

    def command_result(self, agent_id: str, result: pb.CommandResult) -> None: ...

    def file_chunk(self, agent_id: str, chunk: pb.FileChunk) -> None: ...


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class AgentSession:
    """One live agent stream: an outbox for server messages and a way to end it.

    Thread-safe: commands are queued from admin threads, cluster notifications and the store
    pool, while the stream's writer drains the outbox on the event loop it is bound to.
    """

    agent_id: str
    fingerprint: str
    outbox: queue.Queue[pb.ServerMessage | _Abort | None] = field(default_factory=queue.Queue)
    connected_ns: int = field(default_factory=time.time_ns)
    closed: threading.Event = field(default_factory=threading.Event)
    # Highest seq this stream has told the agent is durable; heartbeats are answered with it,
    # so an ack never goes backwards within a session.
    durable_seq: int = 0
    _closing: bool = False
    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None
    _room: asyncio.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the session to the event loop whose writer drains the outbox."""
        self._wake, self._room = asyncio.Event(), asyncio.Event()
        self._loop = loop

    def _put(self, item: pb.ServerMessage | _Abort | None) -> None:
        self.outbox.put_nowait(item)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                # The loop is closed: the stream is over and nobody will read this.
                self.closed.set()

    def send(self, message: pb.ServerMessage) -> bool:
        """Queue a message for the agent; False when the session is gone or backed up."""
        if self.closed.is_set() or self._closing:
            return False
        with self._lock:
            if self.outbox.qsize() >= OUTBOX_LIMIT:
                logger.warning("outbox for agent %s is full; message not queued", self.agent_id)
                return False
            self._put(message)
        return True

    def send_command(self, envelope: bytes) -> bool:
        return self.send(pb.ServerMessage(command=pb.Command(envelope=envelope)))

    def acknowledge(self, durable_seq: int) -> None:
        """Queue a cumulative ack (the stream's own reply to a batch, Hello or heartbeat)."""
        with self._lock:
            self.durable_seq = max(self.durable_seq, durable_seq)
            self._put(pb.ServerMessage(ack=pb.Ack(durable_seq=self.durable_seq)))

    def finish(self, end: _Abort | None) -> None:
        """The read side is done: end the stream after what is queued (None = status OK)."""
        with self._lock:
            self._put(end)

    def close(self, code: grpc.StatusCode, message: str) -> None:
        """End the stream with a status (e.g. the agent's certificate was revoked)."""
        with self._lock:
            if self.closed.is_set() or self._closing:
                return
            self._closing = True
            self._put(_Abort(code, message))

    @property
    def closing(self) -> bool:
        return self._closing or self.closed.is_set()

    def revoke(self) -> None:
        """End the stream because the agent's certificate was revoked."""
        self.close(grpc.StatusCode.PERMISSION_DENIED,
                   "this agent's certificate was revoked; re-enroll it with a new token")

    async def next_item(self) -> pb.ServerMessage | _Abort | None:
        """The next thing to write (on the bound loop); waits until there is one."""
        assert self._wake is not None and self._room is not None, "bind() the session first"
        while True:
            try:
                item = self.outbox.get_nowait()
            except queue.Empty:
                # Producers put first and then schedule wake.set on this loop, so clearing
                # here and re-checking cannot miss an item.
                self._wake.clear()
                if self.outbox.empty():
                    await self._wake.wait()
                continue
            self._room.set()
            return item

    async def room(self) -> None:
        """Wait until the outbox has room for the stream's next ack (reader backpressure)."""
        assert self._room is not None, "bind() the session first"
        while self.outbox.qsize() >= OUTBOX_LIMIT:
            self._room.clear()
            if self.outbox.qsize() >= OUTBOX_LIMIT:
                await self._room.wait()


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


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]
                  ) -> PeerIdentity:
    """The verified identity of the caller, from the TLS peer certificate."""
    raw: bytes | Iterable[bytes] = context.auth_context().get("x509_pem_cert") or []
    certs: list[bytes] = [raw] if isinstance(raw, bytes) else list(raw)
    if not certs:
        raise PeerIdentityError("no client certificate")
    return peer_from_pem(bytes(certs[0]))


class CollectorService(pb_grpc.CollectorServicer):
    """Serves the agent Session stream (grpc.aio); blocking work runs on a bounded pool."""

    def __init__(self, store: Store, control: ControlPlane, registry: SessionRegistry,
                 ingestor: Ingestor | None = None, workers: int = STORE_WORKERS) -> None:
        self._store = store
        self._control = control
        self._registry = registry
        self._ingestor = ingestor or Ingestor(store)
        self.last_seen = LastSeen(store)
        self._hold_warned = 0.0
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="collector-store")

    async def _blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        """Wait for blocking work in flight (disconnect bookkeeping too); flush last-seen."""
        self._pool.shutdown(wait=True)
        try:
            self.last_seen.flush()
        except StoreError as e:
            logger.warning("could not record when %d agents were last seen: %s",
                           self.last_seen.pending(), e)

    async def flush_last_seen(self, stop: asyncio.Event) -> None:
        """Write coalesced heartbeat times every FLUSH_INTERVAL_S until `stop`."""
        while True:
            try:
                await asyncio.wait_for(stop.wait(), FLUSH_INTERVAL_S)
                return
            except TimeoutError:
                pass
            if not self.last_seen.pending():
                continue
            try:
                await self._blocking(self.last_seen.flush)
            except StoreError as e:
                logger.warning("could not record when %d agents were last seen (kept for the "
                               "next attempt): %s", self.last_seen.pending(), e)

    async def Session(self, request_iterator: Any,
                      context: grpc.aio.ServicerContext[pb.AgentMessage, pb.ServerMessage]
                      ) -> AsyncIterator[pb.ServerMessage]:
        try:
            peer = peer_identity(context)
        except PeerIdentityError as e:
            logger.warning("refused a session: %s", e)
            await context.abort(*status_for(e))
        if peer.kind != "agent":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only agents may open a session")
        try:
            agent = await self._blocking(self._store.get_agent, peer.name)
        except StoreError as e:
            logger.warning("refused a session for agent %s: %s", peer.name, e)
            await context.abort(*status_for(e))
        if agent is None or agent.revoked or agent.cert_fingerprint != peer.fingerprint:
            logger.warning("refused a session for agent %s: unknown, revoked or superseded "
                           "certificate", peer.name)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "this certificate is revoked or unknown; re-enroll the agent")
        assert agent is not None
        session = AgentSession(agent.agent_id, peer.fingerprint)
        session.bind(asyncio.get_running_loop())
        reader = asyncio.create_task(self._read(agent, session, context),
                                     name=f"session-{agent.agent_id}")
        try:
            while True:
                item = await session.next_item()
                if item is None:
                    return
                if isinstance(item, _Abort):
                    await context.abort(item.code, item.message)
                yield item
        finally:
            session.closed.set()
            reader.cancel()
            self._registry.remove(session)
            # Not awaited: this also runs when the stream is cancelled. shutdown() waits for it.
            self._pool.submit(self._disconnected, agent.agent_id, session)

    def _disconnected(self, agent_id: str, session: AgentSession) -> None:
        try:
            self._control.agent_disconnected(agent_id, session)
        except Exception:
            logger.exception("bookkeeping of agent %s's disconnect failed", agent_id)

    async def _read(self, agent: AgentRecord, session: AgentSession,
                    context: grpc.aio.ServicerContext[pb.AgentMessage, pb.ServerMessage]) -> None:
        agent_id = agent.agent_id
        try:
            first = await context.read()
            if first is _EOF:
                session.finish(None)
                return
            if first.WhichOneof("msg") != "hello":
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be Hello")
            if first.hello.agent_id != agent_id:
                logger.warning("agent %s sent a Hello claiming %r", agent_id, first.hello.agent_id)
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                             "Hello names a different agent than your certificate")
            await self._blocking(self._hello, agent, first.hello, session)
            while True:
                await session.room()
                if session.closing:
                    return
                message = await context.read()
                if message is _EOF:
                    session.finish(None)
                    return
                if session.closing:
                    return
                if message.WhichOneof("msg") == "heartbeat":
                    # No store work: answered from the session, last-seen written in batches.
                    self._heartbeat(agent_id, session)
                else:
                    await self._blocking(self._dispatch, agent, session, message)
                    if message.WhichOneof("msg") == "batch":
                        await self._hold_ingest(agent_id)
        except _Abort as e:
            session.finish(e)
        except (IngestError, StoreError, PeerIdentityError, DecodeError) as e:
            logger.warning("session of agent %s ended: %s", agent_id, e)
            session.finish(_Abort(*status_for(e)))
        except (grpc.RpcError, grpc.aio.UsageError, grpc.aio.AbortError):
            # The agent went away mid-stream or the stream already ended; the writer side
            # cleans up.
            session.finish(None)
        except Exception:
            logger.exception("session of agent %s failed", agent_id)
            session.finish(_Abort(grpc.StatusCode.INTERNAL, "internal error"))

    async def _hold_ingest(self, agent_id: str) -> None:
        """Wait while the control plane asks to hold ingest (the agent spools meanwhile),
        up to MAX_INGEST_HOLD_S; say so when the cap is reached."""
        held = 0.0
        while held < MAX_INGEST_HOLD_S and (step := self._control.hold_ingest_s(agent_id)) > 0:
            await asyncio.sleep(step)
            held += step
        if held >= MAX_INGEST_HOLD_S:
            now = time.monotonic()
            if now - self._hold_warned > 60:
                self._hold_warned = now
                logger.warning("ingest was held %.1f s after a batch of agent %s and goes on: "
                               "detection cannot keep up with ingest (further holds in the "
                               "next minute are not logged)", held, agent_id)

    def _hello(self, agent: AgentRecord, hello: pb.Hello, session: AgentSession) -> None:
        agent_id = agent.agent_id
        self._store.agent_seen(agent_id, time.time_ns(), hello.agent_version, dict(hello.sensors))
        # Tell the agent where its durable chain stands so it resumes from there. The ack is
        # queued before the session is registered, so it is always the stream's first message.
        session.acknowledge(self._store.chain_state(agent_id).last_seq)
        self._registry.add(session)
        self._control.agent_connected(agent, hello, session)

    def _heartbeat(self, agent_id: str, session: AgentSession) -> None:
        self.last_seen.touch(agent_id, time.time_ns())
        # Answered, so the agent can prove its session works (isolation confirm-or-revert).
        session.acknowledge(session.durable_seq)

    def _dispatch(self, agent: AgentRecord, session: AgentSession, message: pb.AgentMessage) -> None:
        """Handle one message after Hello (blocking: runs on the store pool)."""
        kind = message.WhichOneof("msg")
        agent_id = agent.agent_id
        if kind == "batch":
            result, new_events = self._ingestor.ingest(
                agent, message.batch.events, message.batch.checkpoints)
            session.acknowledge(result.chain.last_seq)
            if new_events:
                self._control.events_stored(agent_id, new_events)
        elif kind == "heartbeat":
            self._heartbeat(agent_id, session)
        elif kind == "result":
            self._control.command_result(agent_id, message.result)
        elif kind == "file_chunk":
            self._control.file_chunk(agent_id, message.file_chunk)
        elif kind == "hello":
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "Hello sent twice")
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty or unknown message")


class CollectorListener:
    """The agents' listener: a grpc.aio server with its event loop in a dedicated thread.

    `bind()` returns the bound port, `start()` serves; `stop(grace)` returns a threading.Event set when the
    streams are ended, blocking work has finished and last-seen times are written, like
    grpc.Server.stop.
    """

    def __init__(self, service: CollectorService, address: str,
                 credentials: grpc.ServerCredentials, options: Sequence[tuple[str, Any]],
                 max_sessions: int) -> None:
        self._service = service
        self._address = address
        self._credentials = credentials
        self._options = list(options)
        self._max_sessions = max_sessions
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="collector-loop",
                                        daemon=True)
        self._server: grpc.aio.Server | None = None
        self._stop_flush: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stop_lock = threading.Lock()
        self._stopped: threading.Event | None = None

    def bind(self, timeout_s: float = 30.0) -> int:
        """Start the loop thread and bind the address; return the port. Serves after start()."""
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self._bind(), self._loop).result(timeout_s)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            raise

    async def _bind(self) -> int:
        server = grpc.aio.server(options=self._options,
                                 maximum_concurrent_rpcs=self._max_sessions)
        pb_grpc.add_CollectorServicer_to_server(self._service, server)
        port = server.add_secure_port(self._address, self._credentials)
        if port == 0:
            raise OSError(f"cannot listen on {self._address}: address in use or not available")
        self._server = server
        return port

    def start(self, timeout_s: float = 30.0) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout_s)

    async def _start(self) -> None:
        assert self._server is not None, "bind() first"
        await self._server.start()
        self._stop_flush = asyncio.Event()
        self._flusher = asyncio.create_task(self._service.flush_last_seen(self._stop_flush))

    def stop(self, grace: float | None) -> threading.Event:
        with self._stop_lock:
            if self._stopped is not None:
                return self._stopped
            done = self._stopped = threading.Event()
        if not self._thread.is_alive():
            done.set()
            return done

        def finish() -> None:
            try:
                asyncio.run_coroutine_threadsafe(self._close(grace), self._loop).result()
            except Exception:
                logger.exception("the collector listener did not stop cleanly")
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(30)
                self._service.shutdown()
                done.set()

        threading.Thread(target=finish, name="collector-stop", daemon=True).start()
        return done

    async def _close(self, grace: float | None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._stop_flush is not None and self._flusher is not None:
            self._stop_flush.set()
            await self._flusher
        # Let cancelled streams run their clean-up before the loop stops.
        current = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not current]
        for t in rest:
            t.cancel()
        if rest:
            await asyncio.wait(rest, timeout=5.0)
