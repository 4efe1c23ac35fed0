"""The sensor interface: an abstract `Sensor` that observes the host and hands `pb.Event`s to an
`Emit` callback. It does not pick implementations (see `agent.sensors.build_sensors`) and does
not assign `seq`/`agent_id` (the agent's chain does).

Errors::

    SensorError                 root of this package's exceptions
    +-- SensorUnavailable       the OS lacks what the sensor needs (no CAP_NET_ADMIN, ...)
    +-- SensorConfigError       a sensors config table is malformed (also a ValueError)
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable

from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

Emit = Callable[[pb.Event], None]


class SensorError(Exception):
    """Root of the sensor package's exceptions."""


class SensorUnavailable(SensorError):
    """The host lacks a capability the sensor needs; the caller picks a fallback."""

    def __init__(self, sensor: str, reason: str) -> None:
        super().__init__(f"{sensor}: {reason}")
        self.sensor = sensor
        self.reason = reason


class SensorConfigError(SensorError, ValueError):
    """A sensors configuration table is invalid (unknown key, wrong type)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"sensors config {key}: {reason}")
        self.key = key
        self.reason = reason


class Sensor(abc.ABC):
    """One source of evidence. `start` returns quickly; the work runs on daemon threads."""

    name: str
    mode: str

    @abc.abstractmethod
    def start(self, emit: Emit) -> None:
        """Start observing; every observation is passed to `emit`."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop observing and join the sensor's threads (bounded wait)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: at least `emitted`, `lost` and `emit_errors`."""


class SafeEmitter:
    """Wraps an `Emit` so a raising callback is counted, never fatal to a sensor thread."""

    def __init__(self, emit: Emit, sensor: str) -> None:
        self._emit = emit
        self._sensor = sensor
        self._lock = threading.Lock()
        self.emitted = 0
        self.errors = 0

    def __call__(self, event: pb.Event) -> bool:
        try:
            self._emit(event)
        except Exception as e:  # the agent's backpressure may raise anything; never crash
            with self._lock:
                self.errors += 1
            logger.warning("%s sensor: emit failed: %s", self._sensor, type(e).__name__)
            return False
        with self._lock:
            self.emitted += 1
        return True


def new_event(time_ns: int | None = None) -> pb.Event:
    """An Event stamped with the observation time; seq and agent_id stay empty."""
    return pb.Event(time_ns=time.time_ns() if time_ns is None else time_ns, severity_id=1)


def sensor_loss_event(sensor: str, reason: str, lost: int, resynced: bool) -> pb.Event:
    """A SensorLoss event: the sensor overran and says so in the chain."""
    ev = new_event()
    ev.severity_id = 3
    ev.sensor_loss.sensor = sensor
    ev.sensor_loss.reason = reason
    ev.sensor_loss.lost = lost
    ev.sensor_loss.resynced = resynced
    return ev
