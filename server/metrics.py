"""Prometheus metrics of the server: what the collector ingested, who is connected, what came
of responders' commands. Served at /metrics on the console listener.

Each running server owns its own `CollectorRegistry` (several servers share one process in
tests). Counters are fed by `MeteredControlPlane`, a wrapper around the control plane that
the collector calls on every stored batch and command result; gauges are read from the
session registry and the store at scrape time. Names follow Prometheus conventions: the
`ringfence_` prefix, base units (seconds), `_total` counters, and no labels with unbounded
values (no agent ids, pids or paths).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector.ingest import DecodedEvent
from collector.rpc import AgentSession, ControlPlane, SessionRegistry
from collector.store.base import AgentRecord, NotFound, Store, StoreError
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINAL_OUTCOMES = frozenset({"succeeded", "failed", "rejected", "expired"})
# Event time to durable storage: sub-second on a healthy fleet, hours after an outage.
LATENCY_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                     3600.0)


class DetectionFigures(NamedTuple):
    """What live detection reports at scrape time."""

    lag_s: float            # age of the oldest stored event not evaluated yet
    evaluated: int          # events evaluated since the server started
    matches: int            # rule matches and anomalies stored (before folding into alerts)
    overflowed: int         # events deferred to catch-up because the queue was full


class ServerMetrics:
    """The server's metric families, registered in a registry of their own."""

    def __init__(self, store: Store, sessions: SessionRegistry,
                 console_counts: Callable[[], tuple[int, int]] | None = None,
                 detection: Callable[[], DetectionFigures] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("ringfence_events_ingested_total",
                              "Events verified and stored by the collector, by event kind",
                              ["kind"], registry=self.registry)
        self.latency = Histogram("ringfence_ingest_latency_seconds",
                                 "Time from an event's creation on the agent to its durable "
                                 "storage on the server", buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)
        self.commands = Counter("ringfence_commands_total",
                                "Commands answered by agents, by action and final outcome",
                                ["action", "outcome"], registry=self.registry)
        self.ingest_held = Counter("ringfence_ingest_held_seconds",
                                   "Time agent sessions were held after a batch because "
                                   "detection lagged behind ingest (summed over sessions)",
                                   registry=self.registry)
        self.registry.register(_StateCollector(store, sessions, console_counts))
        if detection is not None:
            self.registry.register(_DetectionCollector(detection))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DetectionCollector(Collector):
    """Live detection's lag and counts, read at scrape time."""

    def __init__(self, figures: Callable[[], DetectionFigures]) -> None:
        self._figures = figures

    def collect(self) -> Iterable[Metric]:
        f = self._figures()
        yield GaugeMetricFamily("ringfence_detection_lag_seconds",
                                "Age of the oldest stored event detection has not evaluated "
                                "yet (ingest is held while it exceeds hold_ingest_after_s)",
                                value=f.lag_s)
        yield CounterMetricFamily("ringfence_detection_events_evaluated",
                                  "Stored events evaluated by live detection", value=f.evaluated)
        yield CounterMetricFamily("ringfence_detection_matches",
                                  "Rule matches and baseline anomalies stored as alerts or "
                                  "repeats", value=f.matches)
        yield CounterMetricFamily("ringfence_detection_events_overflowed",
                                  "Events the detection queue had no room for (evaluated late "
                                  "from the store)", value=f.overflowed)


class _StateCollector(Collector):
    """Gauges read at scrape time, so they can never drift from the truth."""

    def __init__(self, store: Store, sessions: SessionRegistry,
                 console_counts: Callable[[], tuple[int, int]] | None) -> None:
        self._store = store
        self._sessions = sessions
        self._console_counts = console_counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily("ringfence_agents_connected",
                                "Agents with a live collector session",
                                value=len(self._sessions.online()))
        try:
            alerts = sum(self._store.alert_counts().values())
            agents = self._store.list_agents()
        except StoreError as e:
            # A failing store must not break the scrape of everything else; the absent series
            # are the signal, and the log says why.
            logger.warning("metrics: store unavailable: %s", e)
            return
        yield GaugeMetricFamily("ringfence_integrity_alerts",
                                "Integrity alerts recorded (gaps, forks, bad signatures)",
                                value=alerts)
        yield GaugeMetricFamily("ringfence_agents_enrolled", "Agents enrolled and not revoked",
                                value=sum(1 for a in agents if not a.revoked))
        isolation = GaugeMetricFamily("ringfence_hosts_isolation_state",
                                      "Hosts by isolation state", labels=["state"])
        states: dict[str, int] = {}
        for agent in agents:
            states[agent.isolation_state or "none"] = states.get(agent.isolation_state or
                                                                 "none", 0) + 1
        for state, count in sorted(states.items()):
            isolation.add_metric([state], count)
        yield isolation
        if self._console_counts is not None:
            _, sessions = self._console_counts()
            yield GaugeMetricFamily("ringfence_console_sessions", "Live web console sessions",
                                    value=sessions)


class MeteredControlPlane:
    """A `collector.rpc.ControlPlane` that counts what passes through to the real one."""

    def __init__(self, inner: ControlPlane, store: Store, metrics: ServerMetrics,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._inner = inner
        self._store = store
        self._metrics = metrics
        self._clock = clock

    def agent_connected(self, agent: AgentRecord, hello: pb.Hello, session: AgentSession) -> None:
        self._inner.agent_connected(agent, hello, session)

    def agent_disconnected(self, agent_id: str, session: AgentSession) -> None:
        self._inner.agent_disconnected(agent_id, session)

    def events_stored(self, agent_id: str, events: list[DecodedEvent]) -> None:
        now = self._clock()
        kinds: dict[str, int] = {}
        observe = self._metrics.latency.observe
        for d in events:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
            # Clamped at zero: an agent clock ahead of the server's is skew, not negative time.
            observe(max(0, now - d.event.time_ns) / 1e9)
        for kind, count in kinds.items():
            self._metrics.events.labels(kind).inc(count)
        self._inner.events_stored(agent_id, events)

    def hold_ingest_s(self, agent_id: str) -> float:
        hold = self._inner.hold_ingest_s(agent_id)
        if hold > 0:
            self._metrics.ingest_held.inc(hold)
        return hold

    def command_result(self, agent_id: str, result: pb.CommandResult) -> None:
        self._inner.command_result(agent_id, result)
        if result.status in FINAL_OUTCOMES:
            try:
                action = self._store.get_command(result.command_id).action
            except (NotFound, StoreError):
                return
            self._metrics.commands.labels(action, result.status).inc()

    def file_chunk(self, agent_id: str, chunk: pb.FileChunk) -> None:
        self._inner.file_chunk(agent_id, chunk)
