"""The live detection path: every stored event is evaluated against the Sigma rules and the
behaviour baselines off the ingest thread: a worker thread hands batches to the evaluation
(server.detection.evaluation; by default a child process), which stores the alerts it finds,
and tells the alert listeners what was stored.

`submit()` is what ControlPlane.events_stored calls after each committed batch; it only puts
the batch on a bounded queue and never blocks. When the queue is full the batch is not
evaluated live: the overflow is logged as a warning, written to the detection database and
raised as an alert, and the worker later evaluates the missed events from the evidence store
by seq (it keeps a per-agent cursor of the last evaluated seq, which also lets it resume
after a restart). Hunts (retro evaluation over stored history) reuse the same evaluator.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

from google.protobuf.message import DecodeError

from collector.ingest import DecodedEvent
from collector.store.base import Store, StoreError
from proto import ringfence_pb2 as pb
from server.detection import DetectionError
from server.detection.baselines import BaselineConfig, Baselines
from server.detection.evaluation import (
    Evaluation,
    Evaluator,
    InProcessEvaluation,
    Item,
    ProcessEvaluation,
    RuleSet,
    build_ruleset,
)
from server.detection.records import NewAlert, StoredAlerts
from server.detection.sigma import (
    PACK_DIR,
    CompiledRule,
    LoadedRule,
    RuleIndex,
    UnsupportedRule,
    load_pack,
)
from server.detection.store import DetectionStore

logger = logging.getLogger(__name__)

NS = 1_000_000_000
CATCH_UP_CHUNK = 2000
EVALUATE_EVENTS = 5000      # events sent to the evaluator in one round trip, at most
HOLD_STEP_S = 0.05          # one step of holding ingest back while detection lags


@dataclass(frozen=True)
class DetectionConfig:
    enabled: bool = True
    queue_events: int = 200_000          # events waiting for the worker before overflow
    dedup_window_s: float = 600.0        # same rule, same process tree: one alert + count
    rules_reload_s: float = 2.0          # how often the worker looks for rule changes
    flush_interval_s: float = 1.0        # how often baseline state and cursors are saved
    # Hold agents' next batches while detection is this many seconds behind ingest (0: never),
    # so alerts stay timely when agents send faster than the rules can be evaluated.
    hold_ingest_after_s: float = 1.0
    pack_dir: Path | None = PACK_DIR     # None: no shipped pack (custom rules only)
    # Evaluate in a child process: it uses another core and never holds the interpreter lock
    # that ingest needs. False evaluates on the worker thread of the server process.
    separate_process: bool = True
    baselines: BaselineConfig = field(default_factory=BaselineConfig)

    @classmethod
    def from_file(cls, path: Path) -> DetectionConfig:
        """DATA/detection.json: {"dedup_window_s": 600, "baselines": {"learning_s": ...}}."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise DetectionError(f"{path}: not a readable JSON detection config: {e}") from e
        baselines = BaselineConfig.from_dict(raw.pop("baselines", {}))
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise DetectionError(f"{path}: unknown detection settings {sorted(unknown)}")
        if "pack_dir" in raw:
            raw["pack_dir"] = Path(raw["pack_dir"]) if raw["pack_dir"] else None
        return cls(baselines=baselines, **raw)


class _Batch(NamedTuple):
    agent_id: str
    events: list[DecodedEvent]
    queued_at: float            # monotonic time its (oldest) events were queued


@dataclass
class EngineStats:
    evaluated: int = 0
    alerts: int = 0
    overflowed_events: int = 0
    caught_up_events: int = 0


class DetectionEngine:
    """The worker that evaluates stored events live; see the module docstring."""

    def __init__(self, store: Store, dstore: DetectionStore, config: DetectionConfig,
                 on_alerts: Callable[[StoredAlerts], None] | None = None) -> None:
        self._store = store
        self._dstore = dstore
        self.config = config
        self._dedup_window_ns = int(config.dedup_window_s * NS)
        self._listeners: list[Callable[[StoredAlerts], None]] = [on_alerts] if on_alerts else []
        self._pack: list[LoadedRule] = load_pack(config.pack_dir) if config.pack_dir else []
        self._rules_version = dstore.rules_version()
        custom, disabled = dstore.custom_rules(), dstore.disabled_rules()
        self._rules = build_ruleset(self._pack, custom, disabled)
        self.evaluation: Evaluation
        if config.separate_process:
            self.evaluation = ProcessEvaluation(config.pack_dir, config.baselines,
                                                self._rules, custom, disabled,
                                                dstore.baselines, dstore.opener(),
                                                self._dedup_window_ns, config.flush_interval_s)
        else:
            self.evaluation = InProcessEvaluation(
                self._rules, Baselines(config.baselines, dstore.baselines()), dstore,
                self._dedup_window_ns)
        self._cond = threading.Condition()
        self._queue: deque[_Batch] = deque()
        self._queued = 0
        # Agents evaluated from the store (overflow, failure, restart), since when (monotonic).
        self._behind: dict[str, float] = {}
        self._overflows: list[tuple[str, int, int]] = []
        self._cursors: dict[str, int] = dstore.cursors()    # evaluated, alerts stored
        # Worker thread only: batches handed to the evaluation and not collected yet.
        self._submitted: dict[str, int] = {}
        # (agent, last seq, events, when the oldest of them was queued)
        self._pending: deque[tuple[str, int, int, float]] = deque()
        self._failed: set[str] = set()
        self._working = False       # the worker holds events it took (guarded by _cond)
        self._in_hand: float | None = None  # queued_at of the batch being handed over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._announcements: queue.Queue[StoredAlerts | None] = queue.Queue()
        self._announcer: threading.Thread | None = None
        self.stats = EngineStats()

    # -- rules ----------------------------------------------------------------------------------
    @property
    def rules(self) -> RuleSet:
        return self._rules

    def _reload_rules(self) -> None:
        version = self._dstore.rules_version()
        if version != self._rules_version:
            self._drain()       # batches in flight finish under the rules they were sent with
            custom, disabled = self._dstore.custom_rules(), self._dstore.disabled_rules()
            rules = build_ruleset(self._pack, custom, disabled)
            self.evaluation.set_rules(rules, custom, disabled)
            self._rules, self._rules_version = rules, version
            logger.info("detection rules reloaded: %d in force", len(rules.index))

    # -- ingest side ----------------------------------------------------------------------------
    def submit(self, agent_id: str, events: list[DecodedEvent]) -> None:
        """Queue a stored batch for evaluation; never blocks (overflow is deferred, loudly)."""
        if not events:
            return
        with self._cond:
            if agent_id in self._behind:
                return      # the worker reads this agent from the store until it catches up
            if self._queued + len(events) > self.config.queue_events:
                self._behind.setdefault(agent_id, time.monotonic())
                self._overflows.append((agent_id, events[0].seq, events[-1].seq))
                self.stats.overflowed_events += len(events)
                logger.warning("detection queue full (%d events): agent %s seq %d.. deferred "
                               "to catch-up from the store", self._queued, agent_id,
                               events[0].seq)
            else:
                self._queue.append(_Batch(agent_id, events, time.monotonic()))
                self._queued += len(events)
            self._cond.notify()

    # -- worker ---------------------------------------------------------------------------------
    def start(self) -> None:
        for agent in self._store.list_agents():
            last = self._store.chain_state(agent.agent_id).last_seq
            if agent.agent_id not in self._cursors:
                # History before detection existed is for hunts, not live alerts.
                self._cursors[agent.agent_id] = last
            elif self._cursors[agent.agent_id] < last:
                self._behind.setdefault(agent.agent_id, time.monotonic())
        if isinstance(self.evaluation, ProcessEvaluation):
            self.evaluation.start()
        self._announcer = threading.Thread(target=self._announce, name="detection-alerts",
                                           daemon=True)
        self._announcer.start()
        self._thread = threading.Thread(target=self._run, name="detection", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self._flush()
        finally:
            self.evaluation.close()
            if self._announcer is not None:
                self._announcements.put(None)
                self._announcer.join(timeout_s)

    def lag_s(self) -> float:
        """How long the oldest stored event not evaluated yet has been waiting for detection
        (queued, being evaluated, or to be read back from the store)."""
        now = time.monotonic()
        with self._cond:
            waiting = list(self._behind.values())
            if self._queue:
                waiting.append(self._queue[0].queued_at)
            if self._in_hand is not None:
                waiting.append(self._in_hand)
        try:
            waiting.append(self._pending[0][3])     # the worker's; read without its lock
        except IndexError:
            pass
        return max(0.0, now - min(waiting)) if waiting else 0.0

    def hold_ingest_s(self) -> float:
        """How long the collector should wait before reading an agent's next batch: a short
        step while detection lags more than `hold_ingest_after_s` behind ingest, else 0.
        Holding ingest (agents keep their events in their spools meanwhile) is what keeps
        alerts timely when ingest outruns the evaluator; the collector caps each hold."""
        limit = self.config.hold_ingest_after_s
        if limit <= 0 or self._thread is None or not self._thread.is_alive():
            return 0.0
        return HOLD_STEP_S if self.lag_s() > limit else 0.0

    def idle(self) -> bool:
        """Nothing queued, deferred or being evaluated (for tests and benchmarks)."""
        with self._cond:
            return not self._queue and not self._behind and not self._working

    def _run(self) -> None:
        next_flush = next_reload = time.monotonic()
        try:
            while not self._stop.is_set():
                with self._cond:
                    if not self._queue and not self._behind and not self._pending:
                        self._working = False
                        self._cond.wait(0.2)
                    item = self._take_batch()
                    self._in_hand = item.queued_at if item is not None else None
                    behind = (next(iter(self._behind), None)
                              if item is None and not self._pending else None)
                    self._working = bool(item or behind or self._pending)
                try:
                    if item is not None:
                        try:
                            self._submit(item.agent_id, [(d.seq, d.data or d.event)
                                                         for d in item.events], item.queued_at)
                        finally:
                            self._in_hand = None    # in flight now, or behind
                    # One batch stays with the evaluator while this thread collects the one
                    # before it, so the evaluator never waits for this thread (which waits
                    # for the interpreter lock while ingest is busy).
                    while len(self._pending) > (1 if item is not None else 0):
                        self._collect()
                    if behind is not None:
                        self._catch_up(behind)
                    now = time.monotonic()
                    if now >= next_reload:
                        next_reload = now + self.config.rules_reload_s
                        self._reload_rules()
                    if now >= next_flush:
                        next_flush = now + self.config.flush_interval_s
                        self._flush()
                except (DetectionError, StoreError) as e:
                    # Storage trouble: say so and retry from the cursor (nothing is skipped).
                    logger.error("detection worker: %s; retrying in 1 s", e)
                    if item is not None:
                        with self._cond:
                            self._behind.setdefault(item.agent_id, time.monotonic())
                    self._stop.wait(1.0)
        finally:
            try:
                self._drain()
            except (DetectionError, StoreError) as e:
                logger.error("detection worker stopping: %s; evaluated again from the "
                             "cursor at the next start", e)

    def _take_batch(self) -> _Batch | None:
        """The next agent's queued events, several stored batches joined (up to
        EVALUATE_EVENTS). Called with the condition held.

        Each round trip to the evaluator needs this thread to win the interpreter lock from
        the ingest threads a few times; under full ingest that wait, not the work, is what
        limits a round trip, so fewer and larger round trips keep the evaluator busy.
        """
        while self._queue:
            first = self._queue.popleft()
            agent_id = first.agent_id
            self._queued -= len(first.events)
            if agent_id in self._behind:
                # Queued before a failure put the agent behind: the catch-up reads these
                # events from the store. Evaluating them now would move the cursor past the
                # events that failed, which would never be evaluated.
                continue
            joined, others = list(first.events), deque[_Batch]()
            while self._queue:
                other = self._queue[0]
                if other.agent_id != agent_id:
                    others.append(self._queue.popleft())
                elif len(joined) + len(other.events) <= EVALUATE_EVENTS:
                    joined.extend(self._queue.popleft().events)
                    self._queued -= len(other.events)
                else:
                    break       # this agent's next batch waits, in its place (seq order)
            others.extend(self._queue)
            self._queue = others
            return _Batch(agent_id, joined, first.queued_at)
        return None

    def _submit(self, agent_id: str, events: list[Item],
                queued_at: float | None = None) -> None:
        """Hand the events after the agent's cursor (and after those already handed over) to
        the evaluation; `_collect` takes the result."""
        done = max(self._cursors.get(agent_id, 0), self._submitted.get(agent_id, 0))
        # Batches arrive in seq order: only a batch that overlaps what was handed over
        # (catch-up racing live batches) needs filtering.
        fresh = events if events and events[0][0] > done else [
            (seq, e) for seq, e in events if seq > done]
        if not fresh:
            return
        try:
            self.evaluation.submit(agent_id, fresh)
        except DetectionError:
            with self._cond:
                self._behind.setdefault(agent_id, time.monotonic())
            raise
        self._submitted[agent_id] = fresh[-1][0]
        self._pending.append((agent_id, fresh[-1][0], len(fresh),
                              time.monotonic() if queued_at is None else queued_at))

    def _collect(self) -> None:
        """Take the oldest submitted batch's stored alerts, move its agent's cursor and tell
        the listeners. If it failed, the agent is evaluated again from its cursor (from the
        store), and later batches of that agent still in flight do not move the cursor."""
        agent_id, last_seq, n, _ = self._pending.popleft()
        try:
            stored = self.evaluation.collect()
        except DetectionError:
            self._failed.add(agent_id)
            self._submitted[agent_id] = self._cursors.get(agent_id, 0)
            with self._cond:
                self._behind.setdefault(agent_id, time.monotonic())
            if not self._pending:
                self._failed.clear()
            raise
        if agent_id not in self._failed:
            self._cursors[agent_id] = last_seq
        if not self._pending:
            self._failed.clear()
        self.stats.evaluated += n
        if stored.alerts:
            self.stats.alerts += stored.matches
            for a in stored.newly_raised():
                logger.info("alert %d raised: %s %s on agent %s (event #%d)", a.alert_id,
                            a.severity, a.title, a.agent_id,
                            a.events[0].seq if a.events else 0)
            if self._listeners:
                self._announcements.put(stored)

    def _announce(self) -> None:
        """The alert listeners' thread: reactions (notifications, playbooks, the story) look
        things up in the stores, which must not hold up evaluation."""
        while (stored := self._announcements.get()) is not None:
            for listener in list(self._listeners):
                try:
                    listener(stored)
                except Exception:
                    # A failing reaction (notification, playbook) must not stop detection;
                    # the alerts are stored already.
                    logger.exception("alert listener failed; the alerts are stored")

    def _drain(self) -> None:
        """Collect every batch in flight (before rules change, before a catch-up, at stop)."""
        while self._pending:
            self._collect()

    def _evaluate_batch(self, agent_id: str, events: list[Item]) -> None:
        self._submit(agent_id, events)
        self._drain()

    def add_alert_listener(self, listener: Callable[[StoredAlerts], None]) -> None:
        """Call `listener` with every batch of alerts stored (raised or repeated)."""
        self._listeners.append(listener)

    def _catch_up(self, agent_id: str) -> None:
        """Evaluate an agent's stored events after its cursor, then return it to live."""
        last = self._store.chain_state(agent_id).last_seq
        cursor = self._cursors.get(agent_id, 0)
        if cursor < last:
            rows = list(self._store.events_by_seq(agent_id, cursor + 1,
                                                  min(last, cursor + CATCH_UP_CHUNK)))
            before = self.stats.evaluated
            # Events that do not decode are logged and skipped by the evaluation.
            self._evaluate_batch(agent_id, [(row.seq, row.data) for row in rows])
            self.stats.caught_up_events += self.stats.evaluated - before
            self._cursors[agent_id] = max(self._cursors.get(agent_id, 0),
                                          min(last, cursor + CATCH_UP_CHUNK))
            return
        with self._cond:
            # Batches stored from now on go through the queue; any stored between the read
            # above and this point are read once more below (the cursor skips duplicates).
            self._behind.pop(agent_id, None)
        last = self._store.chain_state(agent_id).last_seq
        if self._cursors.get(agent_id, 0) < last:
            rows = list(self._store.events_by_seq(agent_id, self._cursors[agent_id] + 1, last))
            self._evaluate_batch(agent_id, [(r.seq, r.data) for r in rows])
        logger.info("detection caught up with agent %s at seq %d", agent_id,
                    self._cursors.get(agent_id, 0))

    def _flush(self) -> None:
        with self._cond:
            overflows, self._overflows = self._overflows, []
        now = time.time_ns()
        for agent_id, first, last in overflows:
            self._dstore.record_overflow(agent_id, first, last, now)
            stored = self._dstore.raise_alerts([NewAlert(
                agent_id, "engine", "detection_queue_overflow",
                "Detection queue overflow: events evaluated late from the store", "medium",
                f"the live detection queue was full ({self.config.queue_events} events); "
                f"events from seq {first} were deferred and are evaluated from the store by "
                "seq, so alerts for them come late", f"engine:overflow:{agent_id}", None, now)],
                now, self._dedup_window_ns)
            if self._listeners:
                self._announcements.put(stored)     # responders hear of it like any alert
        self.evaluation.save_baselines()
        self._dstore.save_state([], dict(self._cursors))


def hunt(store: Store, rule: CompiledRule, agent_ids: Sequence[str], since_ns: int,
         until_ns: int, limit: int) -> tuple[list[tuple[NewAlert, pb.Event]], int, bool]:
    """Run one rule over stored history: (matches with their events, events scanned,
    truncated). Baselines are not consulted (they judge the live stream)."""
    evaluator = Evaluator(RuleSet(((rule, False),), RuleIndex([rule])), None)
    matches: list[tuple[NewAlert, pb.Event]] = []
    scanned = 0
    for agent_id in agent_ids:
        after = 0
        while True:
            rows = list(store.query_events(agent_id, since_ns, until_ns, "", 5000, after))
            if not rows:
                break
            for row in rows:
                after = max(after, row.seq)
                try:
                    event = pb.Event.FromString(row.data)
                except DecodeError:
                    continue
                scanned += 1
                for alert in evaluator.evaluate(agent_id, row.seq, event):
                    matches.append((alert, event))
                    if len(matches) >= limit:
                        return matches, scanned, True
    return matches, scanned, False


__all__ = ["DetectionConfig", "DetectionEngine", "Evaluator", "RuleSet", "UnsupportedRule",
           "build_ruleset", "hunt"]
