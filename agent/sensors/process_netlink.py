"""Process sensor on the kernel proc connector (netlink): exec/exit (and optionally fork)
events as they happen, with /proc read immediately on exec. It needs CAP_NET_ADMIN; it does not
choose itself (see `agent.sensors.build_sensors`) and does not poll except to resync.

Threads: a receive thread that only recv()s, parses and snapshots /proc (it must keep up with
exec storms), and an enrichment thread (hashing, users, parents, Event building, emit). A
bounded queue sits between them; overflow is counted and reported as a SensorLoss event, and
so is a kernel ENOBUFS overrun, which is followed by a resync scan of /proc.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import threading
import time
from typing import NamedTuple

from agent.sensors import procfs
from agent.sensors.base import Emit, SafeEmitter, Sensor, SensorUnavailable, new_event
from agent.sensors.base import sensor_loss_event
from agent.sensors.config import ProcessSensorConfig
from agent.sensors.process_common import Enricher, ProcInfo, RawSnapshot, launch_event
from agent.sensors.process_common import list_pids, read_snapshot, start_ticks_of

logger = logging.getLogger(__name__)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_STOP_POLL_S = 1.0  # how often idle threads look at the stop flag (bounds stop() latency)


class _Exec(NamedTuple):
    snap: RawSnapshot
    time_ns: int


class _Exit(NamedTuple):
    pid: int
    status: int
    time_ns: int


class _Fork(NamedTuple):
    pid: int
    ppid: int
    time_ns: int


class _Overrun(NamedTuple):
    reason: str


_Item = _Exec | _Exit | _Fork | _Overrun


class NetlinkProcessSensor(Sensor):
    """exec/exit via the proc connector. Construction binds the socket or raises
    SensorUnavailable, which is how the caller detects the capability."""

    name = "process"
    mode = "netlink"

    def __init__(self, config: ProcessSensorConfig = ProcessSensorConfig()) -> None:
        self._config = config
        try:
            sock = _subscribe(config.rcvbuf_bytes)
        except OSError as e:
            # ECONNREFUSED outside the initial network namespace: the kernel serves the proc
            # connector only there, so an agent in a container or lab namespace polls instead.
            raise SensorUnavailable("process", f"proc connector: {e}") from e
        self._sock = sock
        self._enricher = Enricher(config.argv_max_bytes, config.hash_max_bytes,
                                  config.hash_cache_entries, config.pid_cache_entries)
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=config.queue_max)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._counts = {"received": 0, "enobufs": 0, "queue_dropped": 0, "resyncs": 0,
                        "parse_errors": 0, "exec": 0, "exit": 0, "fork": 0}
        self._emitter: SafeEmitter | None = None
        self._queue_drop_reported = 0
        self._seeded = False

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def start(self, emit: Emit) -> None:
        self._emitter = SafeEmitter(emit, "process")
        # The timeout only bounds how long stop() waits for this thread; a short one woke the
        # idle agent five times a second for nothing.
        self._sock.settimeout(_STOP_POLL_S)
        if not self._seeded:
            self._seed()
        self._threads = [
            threading.Thread(target=self._receive_loop, name="rf-proc-recv", daemon=True),
            threading.Thread(target=self._enrich_loop, name="rf-proc-enrich", daemon=True),
        ]
        for t in self._threads:
            t.start()
        logger.info("process sensor started (netlink)")

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.send(procfs.build_mcast_message(self._sock.getsockname()[0],
                                                       procfs.PROC_CN_MCAST_IGNORE))
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout=3.0)
        self._sock.close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
        em = self._emitter
        out["emitted"] = em.emitted if em else 0
        out["emit_errors"] = em.errors if em else 0
        out["lost"] = out["enobufs"] + out["queue_dropped"]
        out["hashes_computed"] = self._enricher.hashes_computed
        out["queued"] = self._queue.qsize()
        return out

    # --- receive thread: keep it minimal ---------------------------------------------------

    def _put(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count("queue_dropped")

    def _receive_loop(self) -> None:
        # The /proc reads race the process's exit, so this thread gets scheduled first when it
        # can (root / CAP_SYS_NICE); the nice value is per thread on Linux.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._config.recv_nice)
        except (OSError, AttributeError):
            pass
        argv_max = self._config.argv_max_bytes
        emit_forks = self._config.emit_forks
        pids = self._enricher.pids
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self._count("enobufs")
                    self._put(_Overrun("ENOBUFS"))
                    continue
                if self._stop.is_set():
                    return
                logger.warning("process sensor: recv failed: %s", e)
                time.sleep(0.1)
                continue
            try:
                events = procfs.parse_netlink(data)
            except procfs.ProcParseError as e:
                self._count("parse_errors")
                logger.debug("process sensor: bad datagram: %s", e)
                continue
            for ev in events:
                if ev.what == procfs.PROC_EVENT_EXEC:
                    snap = read_snapshot(ev.tgid, argv_max)
                    self._put(_Exec(snap, time.time_ns()))
                elif ev.what == procfs.PROC_EVENT_EXIT:
                    if ev.pid == ev.tgid:  # thread exits are not process exits
                        self._put(_Exit(ev.tgid, ev.exit_status, time.time_ns()))
                elif ev.what == procfs.PROC_EVENT_FORK:
                    if ev.pid == ev.tgid:  # a new process, not a thread
                        if emit_forks:
                            self._put(_Fork(ev.tgid, ev.ptgid, time.time_ns()))
                        elif ev.ptgid in pids:
                            parent = pids.get(ev.ptgid)
                            if isinstance(parent, ProcInfo):
                                # The child is a copy of the parent until it execs.
                                pids.put(ev.tgid, parent._replace(ppid=ev.ptgid))
            with self._lock:
                self._counts["received"] += len(events)

    # --- enrichment thread -------------------------------------------------------------------

    def _enrich_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_STOP_POLL_S)
            except queue.Empty:
                self._report_queue_drops()
                continue
            try:
                self._handle(item)
            except Exception:  # one bad record must not end the sensor
                logger.exception("process sensor: failed to handle a record")
            self._report_queue_drops()

    def _seed(self) -> None:
        """Remember the processes that already run (no events), for parents and exits.

        Runs in start() after subscribing, so no process falls between seed and events; a few
        hundred /proc reads take milliseconds.
        """
        for pid in list_pids():
            self._enricher.remember(pid)
        self._seeded = True

    def _report_queue_drops(self) -> None:
        with self._lock:
            dropped = self._counts["queue_dropped"] - self._queue_drop_reported
            self._queue_drop_reported = self._counts["queue_dropped"]
        if dropped > 0 and self._emitter is not None:
            self._emitter(sensor_loss_event("process", "queue full", dropped, False))

    def _handle(self, item: _Item) -> None:
        emitter = self._emitter
        assert emitter is not None
        if isinstance(item, _Exec):
            self._count("exec")
            emitter(launch_event(self._enricher, item.snap, item.time_ns, "netlink"))
        elif isinstance(item, _Exit):
            self._count("exit")
            ev = new_event(item.time_ns)
            act = ev.process
            act.activity_id = 2
            act.source = "netlink"
            act.exit_code = procfs.wait_status_to_exit_code(item.status)
            info = self._enricher.fill_from_cache(item.pid, act.process)
            if info is not None:
                self._enricher.fill_parent(info.ppid, act.parent_process)
            emitter(ev)
        elif isinstance(item, _Fork):
            self._count("fork")
            ev = new_event(item.time_ns)
            act = ev.process
            act.activity_id = 1
            act.source = "netlink"
            act.is_fork = True
            act.process.pid = item.pid
            act.process.ppid = item.ppid
            info = self._enricher.remember(item.pid)
            if info is not None:
                act.process.name, act.process.exe = info.name, info.exe
                act.process.uid, act.process.user = info.uid, info.user
            else:
                act.process.unavailable.extend(["name", "exe", "uid"])
            self._enricher.fill_parent(item.ppid, act.parent_process)
            emitter(ev)
        else:
            emitter(sensor_loss_event("process", item.reason, 0, True))
            self._resync()

    def _resync(self) -> None:
        """After an overrun: launch events (source "resync") for processes we did not know."""
        self._count("resyncs")
        assert self._emitter is not None
        for pid in list_pids():
            if self._stop.is_set():
                return
            known = self._enricher.pids.get(pid)
            ticks = start_ticks_of(pid)
            if ticks is None:
                continue
            if isinstance(known, ProcInfo) and known.start_ticks == ticks:
                continue
            snap = read_snapshot(pid, self._config.argv_max_bytes)
            self._emitter(launch_event(self._enricher, snap, time.time_ns(), "resync"))


def _subscribe(rcvbuf_bytes: int) -> socket.socket:
    """A netlink connector socket bound to CN_IDX_PROC and subscribed (PROC_CN_MCAST_LISTEN).

    Subscribing here rather than in start(): the kernel refuses (ECONNREFUSED) outside the
    initial network namespace, and the caller must learn that while it can still fall back.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         procfs.NETLINK_CONNECTOR)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf_bytes)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        sock.bind((0, procfs.CN_IDX_PROC))
        sock.send(procfs.build_mcast_message(sock.getsockname()[0]))
    except OSError:
        sock.close()
        raise
    return sock
