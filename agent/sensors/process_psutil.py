"""Fallback process sensor: diffs the process table every `poll_interval_s` and reports new
processes (launch, source "psutil") and vanished ones (terminate, exit code unavailable). It
misses processes that live shorter than the interval; the netlink sensor does not.
"""

from __future__ import annotations

import logging
import threading
import time

import psutil

from agent.sensors.base import Emit, SafeEmitter, Sensor, new_event
from agent.sensors.config import ProcessSensorConfig
from agent.sensors.process_common import Enricher, launch_event, read_snapshot, start_ticks_of

logger = logging.getLogger(__name__)


class PsutilProcessSensor(Sensor):
    """Polling process sensor; `mode` is "psutil"."""

    name = "process"
    mode = "psutil"

    def __init__(self, config: ProcessSensorConfig = ProcessSensorConfig()) -> None:
        self._config = config
        self._enricher = Enricher(config.argv_max_bytes, config.hash_max_bytes,
                                  config.hash_cache_entries, config.pid_cache_entries)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._emitter: SafeEmitter | None = None
        self._known: dict[int, int] = {}  # pid -> start ticks
        self._polls = 0
        self._launches = 0
        self._exits = 0

    def start(self, emit: Emit) -> None:
        self._emitter = SafeEmitter(emit, "process")
        # The first table is the baseline: processes already running are remembered, not
        # reported, so a restart does not replay the host.
        for pid in psutil.pids():
            ticks = start_ticks_of(pid)
            if ticks is not None:
                self._known[pid] = ticks
                self._enricher.remember(pid)
        self._thread = threading.Thread(target=self._loop, name="rf-proc-poll", daemon=True)
        self._thread.start()
        logger.info("process sensor started (psutil, every %.3f s)", self._config.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3.0)

    def stats(self) -> dict[str, int]:
        em = self._emitter
        return {"emitted": em.emitted if em else 0, "emit_errors": em.errors if em else 0,
                "lost": 0, "polls": self._polls, "exec": self._launches, "exit": self._exits}

    def _loop(self) -> None:
        while not self._stop.wait(self._config.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # a failed poll must not end the sensor
                logger.exception("process sensor: poll failed")

    def poll_once(self) -> None:
        """One diff of the process table against the previous one."""
        emitter = self._emitter
        assert emitter is not None
        self._polls += 1
        now: dict[int, int] = {}
        for pid in psutil.pids():
            ticks = start_ticks_of(pid)
            if ticks is not None:
                now[pid] = ticks
        for pid, ticks in now.items():
            if self._known.get(pid) == ticks:
                continue
            if pid in self._known:  # pid reused: the old process ended in between
                self._emit_exit(pid)
            snap = read_snapshot(pid, self._config.argv_max_bytes)
            self._launches += 1
            emitter(launch_event(self._enricher, snap, time.time_ns(), "psutil"))
        for pid in set(self._known) - set(now):
            self._emit_exit(pid)
        self._known = now

    def _emit_exit(self, pid: int) -> None:
        assert self._emitter is not None
        self._exits += 1
        ev = new_event()
        act = ev.process
        act.activity_id = 2
        act.source = "psutil"
        info = self._enricher.fill_from_cache(pid, act.process)
        act.process.unavailable.append("exit_code")
        if info is not None:
            self._enricher.fill_parent(info.ppid, act.parent_process)
        self._emitter(ev)
