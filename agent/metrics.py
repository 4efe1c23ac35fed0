"""Opt-in Prometheus metrics of the agent, served on a local port (`[metrics] listen`).

Counts telemetry by sensor as it is recorded (and dropped, when the spool is full) and reads
the rest (spool bytes, isolation state, session) from the running agent at scrape time. It owns its own registry and
listener; it never exposes event contents, and labels never carry pids or paths. Names follow
Prometheus conventions (`ringfence_agent_` prefix, base units, `_total` counters).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.config import ConfigError

logger = logging.getLogger(__name__)

ISOLATION_STATES = ("none", "pending", "isolated", "failed", "releasing")


class MetricsError(ConfigError):
    """The metrics listener address is malformed or cannot be bound."""


@dataclass(frozen=True)
class AgentSnapshot:
    """What a scrape reads from the agent."""

    spool_bytes: int
    spool_pending_records: int
    isolation_state: str
    connected: bool


class AgentMetrics:
    """The agent's metric families in a registry of their own."""

    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self._events = Counter("ringfence_agent_events_total",
                               "Telemetry events recorded into the evidence chain, by sensor",
                               ["sensor"], registry=self.registry)
        self._dropped = Counter("ringfence_agent_events_dropped_total",
                                "Telemetry events dropped because the spool was full, by "
                                "sensor (each drop is also named by a signed gap event)",
                                ["sensor"], registry=self.registry)
        self.registry.register(_SnapshotCollector(snapshot))
        self._server: WSGIServer | None = None

    def recorded(self, sensor: str, seq: int) -> None:
        """Count one telemetry event; `seq` 0 means the chain dropped it."""
        (self._events if seq else self._dropped).labels(sensor).inc()

    def serve(self, listen: str) -> int:
        """Listen on HOST:PORT (port 0: any free port) and return the bound port."""
        host, sep, port_text = listen.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_text)
            address = ipaddress.ip_address(host)
        except ValueError as e:
            raise MetricsError(f"[metrics] listen must be IP:PORT, e.g. 127.0.0.1:9101, not "
                               f"{listen!r}") from e
        if not sep:
            raise MetricsError(f"[metrics] listen needs a port: {listen!r}")
        if not address.is_loopback:
            logger.warning("agent metrics listen on %s, a non-loopback address: anyone who can "
                           "reach it can read the agent's counters", listen)
        try:
            server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise MetricsError(f"cannot listen for metrics on {listen}: {e}") from e
        self._server = server
        bound = int(server.server_address[1])
        logger.info("agent metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._snapshot()
        yield GaugeMetricFamily("ringfence_agent_spool_bytes",
                                "Bytes held by the durable spool (sent but unacked, and unsent)",
                                value=s.spool_bytes)
        yield GaugeMetricFamily("ringfence_agent_spool_pending_records",
                                "Spooled records the collector has not acknowledged yet",
                                value=s.spool_pending_records)
        yield GaugeMetricFamily("ringfence_agent_collector_connected",
                                "1 while the session to the collector is up", value=int(
                                    s.connected))
        state = GaugeMetricFamily("ringfence_agent_isolation_state",
                                  "1 for the host's current isolation state", labels=["state"])
        for name in ISOLATION_STATES:
            state.add_metric([name], 1 if s.isolation_state == name else 0)
        if s.isolation_state not in ISOLATION_STATES:
            state.add_metric([s.isolation_state], 1)
        yield state
