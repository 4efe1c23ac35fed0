"""The agent's Session: stream spooled evidence to the collector, apply acks, relay commands.

One connection at a time; on any break it reconnects with full-jitter exponential backoff and
resumes after the collector's cumulative ack, so nothing depends on gRPC retries. Only
fsynced spool records are sent, and at most a bounded window is in flight: a slow collector
pushes back into the spool, never into memory. It does not verify or execute commands.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.rpc import Refused, SessionTransport, TransportError
from agent.spool import RecordKind, Spool
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionConfig:
    batch_max_records: int = 2000
    batch_max_bytes: int = 4 << 20
    max_unacked_records: int = 50_000      # in-flight window beyond the last ack
    heartbeat_interval_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    outbound_queue: int = 64               # messages buffered for the stream
    idle_wait_s: float = 1.0               # longest sleep between spool checks when idle


_END = object()
# 2 ** 30 times any sane initial backoff is far beyond any cap; clamping the exponent keeps a
# collector outage of days from overflowing the float arithmetic.
_MAX_BACKOFF_EXPONENT = 30


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0-based): full jitter between half
    the initial delay and an exponentially growing cap, so many agents reconnecting after a
    collector restart spread out instead of arriving together."""
    cap = min(max_s, initial_s * 2 ** min(attempt, _MAX_BACKOFF_EXPONENT))
    return rng.uniform(initial_s / 2, max(cap, initial_s / 2))


class _Connection:
    """State of one live stream."""

    def __init__(self, depth: int) -> None:
        self.outbound: queue.Queue[object] = queue.Queue(depth)
        self.alive = threading.Event()
        self.alive.set()
        self.ready = threading.Event()        # first Ack received: cursor known
        self.sent_seq = 0
        self.acked_seq = 0
        # The collector holds seqs this agent never wrote (state restored or cloned).
        self.behind_collector = False
        self.window = threading.Condition()

    def messages(self) -> Iterator[pb.AgentMessage]:
        while True:
            item = self.outbound.get()
            if item is _END:
                return
            assert isinstance(item, pb.AgentMessage)
            yield item

    def put(self, message: pb.AgentMessage, timeout: float | None = None) -> bool:
        """Queue a message; False if the stream died or the queue stayed full past timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive.is_set():
            try:
                self.outbound.put(message, timeout=0.2)
                return True
            except queue.Full:
                if deadline is not None and time.monotonic() > deadline:
                    return False
        return False

    def end(self) -> None:
        self.alive.clear()
        with self.window:
            self.window.notify_all()
        try:
            self.outbound.put_nowait(_END)
        except queue.Full:
            # The generator is blocked on a full queue only if gRPC stopped reading; cancel
            # (done by the caller) unblocks it.
            pass


class Session:
    """Keeps one authenticated stream to the collector alive and feeds it from the spool."""

    def __init__(self, transport: SessionTransport, spool: Spool,
                 hello: Callable[[int], pb.Hello], on_command: Callable[[bytes], None],
                 config: SessionConfig = SessionConfig(),
                 heartbeat: Callable[[], pb.Heartbeat] | None = None,
                 rng: random.Random | None = None,
                 on_server_message: Callable[[], None] | None = None) -> None:
        self._transport = transport
        self._rng = rng or random.Random()
        self._spool = spool
        self._hello = hello
        self._on_command = on_command
        self._config = config
        self._heartbeat = heartbeat or (lambda: pb.Heartbeat(time_ns=time.time_ns()))
        # Called after each server message is handled (isolation confirm waits on it).
        self._on_server_message = on_server_message
        self._conn: _Connection | None = None
        self._lock = threading.Lock()
        self._last_server_message = 0.0       # time.monotonic() of the last message received
        self.connected = threading.Event()
        self.refused_reason = ""
        self.connects = 0

    # -- what other parts of the agent use ------------------------------------------------------
    def send(self, message: pb.AgentMessage, timeout: float = 30.0) -> bool:
        """Send a message outside the evidence stream (results, file chunks) if connected."""
        with self._lock:
            conn = self._conn
        return conn is not None and conn.ready.is_set() and conn.put(message, timeout)

    def healthy_since(self, since_monotonic: float) -> bool:
        """Whether the collector answered us after `since_monotonic` (isolation confirm)."""
        return self.connected.is_set() and self._last_server_message > since_monotonic

    def ping(self) -> None:
        """Ask for an answer now (the collector acks a heartbeat)."""
        self.send(pb.AgentMessage(heartbeat=self._heartbeat()), timeout=1.0)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        attempt = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                self._run_once(stop)
                if stop.is_set():
                    return
                logger.warning("collector closed the session; reconnecting")
            except Refused as e:
                self.refused_reason = e.message
                logger.error("collector refused the session (%s): %s", e.code, e.message)
                attempt = max(attempt, 8)
            except TransportError as e:
                logger.warning("session to the collector broke (%s): %s", e.code, e.message)
            if time.monotonic() - started > 30:
                attempt = 0
            delay = backoff_delay(attempt, self._config.backoff_initial_s,
                                  self._config.backoff_max_s, self._rng)
            attempt += 1
            stop.wait(delay)

    def _run_once(self, stop: threading.Event) -> None:
        conn = _Connection(self._config.outbound_queue)
        conn.put(pb.AgentMessage(hello=self._hello(self._spool.acked_seq)))
        responses = self._transport.open(conn.messages())
        with self._lock:
            self._conn = conn
        sender = threading.Thread(target=self._send_loop, args=(conn, stop), daemon=True,
                                  name="session-sender")
        sender.start()
        stopper = threading.Thread(target=self._stop_watch, args=(conn, stop), daemon=True,
                                   name="session-stop")
        stopper.start()
        try:
            for message in responses:
                self._last_server_message = time.monotonic()
                kind = message.WhichOneof("msg")
                if kind == "ack":
                    self._on_ack(conn, message.ack.durable_seq)
                elif kind == "command":
                    self._on_command(bytes(message.command.envelope))
                if self._on_server_message is not None:
                    self._on_server_message()
        finally:
            self.connected.clear()
            with self._lock:
                self._conn = None
            conn.end()
            self._transport.cancel()
            sender.join(timeout=5)

    def _stop_watch(self, conn: _Connection, stop: threading.Event) -> None:
        # stop.wait returns as soon as stop is set; the timeout only bounds how long this
        # watcher outlives a dead connection, so it need not wake the idle agent often.
        while conn.alive.is_set():
            if stop.wait(1.0):
                self._transport.cancel()
                return

    def _on_ack(self, conn: _Connection, durable_seq: int) -> None:
        if not conn.ready.is_set() and durable_seq > self._spool.last_seq:
            # The collector holds seqs this agent never wrote: the agent's state was restored
            # from an older copy (VM snapshot, backup) or cloned. Send our own records anyway so
            # the collector compares the bytes and records the fork, and never let its ack
            # delete records it has not seen: silently dropping them would hide the fork.
            logger.error("collector holds events up to seq %d but this agent only wrote up to "
                         "seq %d: its state was restored or cloned; resending from seq %d so "
                         "the collector records the fork", durable_seq, self._spool.last_seq,
                         self._spool.acked_seq + 1)
            conn.behind_collector = True
        if conn.behind_collector:
            with conn.window:
                spool_ack = min(durable_seq, conn.sent_seq)
        else:
            spool_ack = durable_seq
        if durable_seq < self._spool.acked_seq:
            # The collector knows less than it once acknowledged: its storage lost data we
            # already deleted. Loud, because this evidence now exists nowhere.
            logger.error("collector acknowledges only up to seq %d but earlier acknowledged %d: "
                         "evidence may have been lost on the collector", durable_seq,
                         self._spool.acked_seq)
        else:
            self._spool.ack(spool_ack)
        with conn.window:
            conn.acked_seq = durable_seq
            if not conn.ready.is_set():
                conn.sent_seq = (self._spool.acked_seq if conn.behind_collector
                                 else max(durable_seq, self._spool.acked_seq))
                conn.ready.set()
                self.connected.set()
                self.connects += 1
                logger.info("session established; collector holds events up to seq %d",
                            durable_seq)
            conn.window.notify_all()

    def _send_loop(self, conn: _Connection, stop: threading.Event) -> None:
        config = self._config
        last_heartbeat = time.monotonic()
        while not conn.ready.wait(0.2):
            if not conn.alive.is_set() or stop.is_set():
                return
        while conn.alive.is_set() and not stop.is_set():
            with conn.window:
                while (conn.sent_seq - conn.acked_seq >= config.max_unacked_records
                       and conn.alive.is_set()):
                    conn.window.wait(0.5)
                cursor = conn.sent_seq
            records = self._spool.read_durable(cursor, config.batch_max_records,
                                               config.batch_max_bytes)
            if not records:
                since = time.monotonic() - last_heartbeat
                if since >= config.heartbeat_interval_s:
                    conn.put(pb.AgentMessage(heartbeat=self._heartbeat()), timeout=5)
                    last_heartbeat = time.monotonic()
                    since = 0.0
                # Sleep until the spool's flusher makes something durable (it fsyncs at most
                # fsync_interval_s after an append), rather than polling or forcing fsyncs.
                self._spool.wait_durable(cursor, min(config.idle_wait_s,
                                                     config.heartbeat_interval_s - since))
                continue
            batch = pb.EventBatch()
            for record in records:
                if record.kind == RecordKind.EVENT:
                    batch.events.append(record.data)
                else:
                    batch.checkpoints.append(record.data)
            if not conn.put(pb.AgentMessage(batch=batch)):
                return
            with conn.window:
                conn.sent_seq = max(conn.sent_seq, records[-1].seq)
