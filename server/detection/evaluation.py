"""Evaluating events against the rules in force and the behaviour baselines.

`Evaluator` judges one event at a time (the live path and hunts share it). The live path runs
it behind the `Evaluation` seam, which evaluates a batch and stores the alerts it finds (raised
or folded into open ones) in the detection store: in the server process
(`InProcessEvaluation`), or in a child process (`ProcessEvaluation`, the default) that uses
another core and never competes with ingest for the interpreter lock. Storing alerts there
too matters: every SQLite call hands the interpreter lock back and forth, and under full
ingest each handover in the server process waits for the ingest threads. Neither reads the
evidence store: callers pass events, rules and baseline rows in and take stored alerts and
changed baseline rows out.
"""

from __future__ import annotations

import abc
import logging
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from proto import ringfence_pb2 as pb
from server.detection import DetectionError, RuleError
from server.detection.baselines import BaselineConfig, Baselines
from server.detection.fields import DNSCache, Fields, event_fields
from server.detection.records import BaselineRow, CustomRule, EventRef, NewAlert, StoredAlerts
from server.detection.sigma import (
    CompiledRule,
    LoadedRule,
    RuleIndex,
    facts_of_fields,
    load_pack,
    load_yaml,
)
from server.detection.store import DetectionStore

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0      # spawning the evaluator process and loading the pack
POLL_S = 0.5                 # how often a waiting caller checks that the process still lives

# One event to evaluate: its seq and its stored bytes (or the decoded message).
Item = tuple[int, "bytes | pb.Event"]


@dataclass(frozen=True)
class RuleSet:
    """Rules in force: the pack and custom rules, minus the disabled ones."""

    loaded: tuple[tuple[LoadedRule, bool], ...]     # (rule, disabled)
    index: RuleIndex

    def find(self, ident: str) -> LoadedRule:
        """A rule by id, title or file name (case-insensitive); RuleError if none or several."""
        wanted = ident.lower()
        hits = [r for r, _ in self.loaded
                if wanted in (r.info.rule_id.lower(), r.info.title.lower(),
                              Path(r.info.source).name.lower(), Path(r.info.source).stem.lower())]
        if len(hits) != 1:
            raise RuleError(ident, "no such rule; see `ringfence rules list`" if not hits else
                            f"{len(hits)} rules have that name; use the rule id")
        return hits[0]


def build_ruleset(pack: Sequence[LoadedRule], custom: Iterable[CustomRule],
                  disabled: set[str]) -> RuleSet:
    loaded: list[tuple[LoadedRule, bool]] = [(r, r.info.rule_id in disabled) for r in pack]
    for c in custom:
        try:
            rules = load_yaml(c.yaml, f"custom:{c.rule_id}")
        except RuleError as e:
            logger.error("custom rule %s no longer loads: %s", c.rule_id, e.reason)
            continue
        loaded.extend((r, r.info.rule_id in disabled) for r in rules)
    index = RuleIndex(r for r, off in loaded if isinstance(r, CompiledRule) and not off)
    return RuleSet(tuple(loaded), index)


def _tree(category: str, raw: Fields) -> str:
    """The dedup scope of a match: the process tree (session, else parent) or the object."""
    if category == "process_creation":
        session = raw["process.session_id"]
        return f"sid{session}" if session not in (None, "0") else f"ppid{raw.get('process.ppid', 0)}"
    if category == "network_connection":
        return f"pid{raw.get('process.pid', 0)}"
    return raw.get("file.path") or raw.get("query.hostname") or ""


def _what(raw: Fields) -> str:
    for key in ("process.cmd_line", "file.path", "dst_endpoint.hostname", "dst_endpoint.ip",
                "query.hostname"):
        text = raw[key]
        if text:
            if key == "dst_endpoint.ip":
                text += f":{raw.get('dst_endpoint.port', '')}"
            return text[:300]
    return ""


class Evaluator:
    """Rules + baselines over single events: what the live path and hunts share."""

    def __init__(self, rules: RuleSet, baselines: Baselines | None) -> None:
        self.rules = rules
        self.baselines = baselines
        self._dns: dict[str, DNSCache] = {}

    def evaluate(self, agent_id: str, seq: int, event: pb.Event) -> list[NewAlert]:
        dns = self._dns.get(agent_id)
        if dns is None:
            dns = self._dns[agent_id] = DNSCache()
        found = event_fields(event, dns)
        if found is None:
            if self.baselines is not None:
                self.baselines.seen(agent_id, event.time_ns)
            return []
        category, raw = found
        out: list[NewAlert] = []
        matched = self.rules.index.match(category, facts_of_fields(raw))
        if matched:
            ref = EventRef(agent_id, seq)
            tree, what = _tree(category, raw), _what(raw)
            for rule in matched:
                i = rule.info
                out.append(NewAlert(
                    agent_id, "sigma", i.rule_id, i.title, i.severity,
                    f"Sigma rule \"{i.title}\" ({i.level}; by {i.author}) matched "
                    f"{category} event #{seq}: {what}",
                    f"sigma:{i.rule_id}:{agent_id}:{tree}", ref, event.time_ns))
        if self.baselines is not None:
            for a in self.baselines.observe(agent_id, category, raw, event.time_ns):
                out.append(NewAlert(agent_id, "baseline", a.model, a.title, a.severity,
                                    a.detail, f"baseline:{a.dedup_key}",
                                    EventRef(agent_id, seq), event.time_ns))
        return out


def _decoded(agent_id: str, items: Iterable[Item]) -> Iterator[tuple[int, pb.Event]]:
    for seq, event in items:
        if isinstance(event, bytes):
            try:
                event = pb.Event.FromString(event)
            except DecodeError:
                logger.error("stored event %s #%d does not decode; skipped by detection",
                             agent_id, seq)
                continue
        yield seq, event


def evaluate_items(evaluator: Evaluator, agent_id: str, items: Iterable[Item]) -> list[NewAlert]:
    out: list[NewAlert] = []
    evaluate = evaluator.evaluate
    for seq, event in _decoded(agent_id, items):
        found = evaluate(agent_id, seq, event)
        if found:
            out.extend(found)
    return out


NO_ALERTS = StoredAlerts([], frozenset())


def store_found(dstore: DetectionStore, alerts: Sequence[NewAlert],
                dedup_window_ns: int) -> StoredAlerts:
    return dstore.raise_alerts(alerts, time.time_ns(), dedup_window_ns) if alerts else NO_ALERTS


class Evaluation(abc.ABC):
    """Where the live path evaluates batches of one agent's events, in seq order, and stores
    the alerts found. Batches are submitted and their results collected in the same order,
    so one can be evaluated while the caller handles the result of another. `collect`
    raises DetectionError when that batch's evaluation or storing failed (the caller
    retries from its cursor). Rules, state and close are for when nothing is in flight."""

    @abc.abstractmethod
    def submit(self, agent_id: str, items: Sequence[Item]) -> None: ...

    @abc.abstractmethod
    def collect(self) -> StoredAlerts:
        """The stored alerts of the oldest submitted batch not collected yet."""

    def evaluate(self, agent_id: str, items: Sequence[Item]) -> StoredAlerts:
        self.submit(agent_id, items)
        return self.collect()

    @abc.abstractmethod
    def set_rules(self, rules: RuleSet, custom: Sequence[CustomRule],
                  disabled: set[str]) -> None:
        """Rules in force from now on (`rules` is built from the pack, custom and disabled)."""

    @abc.abstractmethod
    def save_baselines(self) -> None:
        """Save the baseline rows changed since the last save in the detection store."""

    @abc.abstractmethod
    def close(self) -> None: ...


class InProcessEvaluation(Evaluation):
    """Evaluation on the calling thread (for tests and single-core hosts)."""

    def __init__(self, rules: RuleSet, baselines: Baselines, dstore: DetectionStore,
                 dedup_window_ns: int) -> None:
        self.evaluator = Evaluator(rules, baselines)
        self._dstore = dstore
        self._dedup_window_ns = dedup_window_ns
        self._results: deque[StoredAlerts | DetectionError] = deque()

    def submit(self, agent_id: str, items: Sequence[Item]) -> None:
        try:
            self._results.append(store_found(
                self._dstore, evaluate_items(self.evaluator, agent_id, items),
                self._dedup_window_ns))
        except DetectionError as e:
            self._results.append(e)

    def collect(self) -> StoredAlerts:
        result = self._results.popleft()
        if isinstance(result, DetectionError):
            raise result
        return result

    def set_rules(self, rules: RuleSet, custom: Sequence[CustomRule],
                  disabled: set[str]) -> None:
        self.evaluator.rules = rules

    def save_baselines(self) -> None:
        save_baselines(self.evaluator, self._dstore)

    def close(self) -> None:
        pass


class _ForwardLogs(logging.Handler):
    """In the evaluator process: keeps log records to send with the next reply, so they are
    logged by the server (the child has no log configuration of its own)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.name, record.getMessage()))

    def take(self) -> list[tuple[int, str, str]]:
        out, self.records = self.records, []
        return out


def save_baselines(evaluator: Evaluator, dstore: DetectionStore) -> None:
    if evaluator.baselines is not None:
        rows = evaluator.baselines.dirty_rows()
        if rows:
            dstore.save_state(rows, {})


def _evaluator_main(conn: Connection, pack_dir: Path | None, config: BaselineConfig,
                    custom: list[CustomRule], disabled: set[str],
                    rows: list[BaselineRow], open_store: Callable[[], DetectionStore],
                    dedup_window_ns: int, save_interval_s: float) -> None:
    """The evaluator process: answer requests from the server until told to stop or until
    the server goes away (end of the pipe). Signals are for the server, which stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs = _ForwardLogs()
    root = logging.getLogger()
    root.addHandler(logs)
    root.setLevel(logging.INFO)
    try:
        pack = load_pack(pack_dir) if pack_dir else []
        evaluator = Evaluator(build_ruleset(pack, custom, disabled), Baselines(config, rows))
        dstore = open_store()
    except Exception as e:  # noqa: BLE001 - whatever it is, the server must hear of it
        conn.send(("error", f"cannot load rules, baselines or the detection store: {e!r}",
                   logs.take()))
        return
    conn.send(("ready", len(evaluator.rules.index), logs.take()))
    next_save = time.monotonic() + save_interval_s
    while True:
        try:
            # Baselines are saved here, between batches, so the server never waits for it.
            if time.monotonic() >= next_save or not conn.poll(save_interval_s):
                next_save = time.monotonic() + save_interval_s
                try:
                    save_baselines(evaluator, dstore)
                except DetectionError as e:
                    logger.error("baseline state not saved (kept, saved at the next try): %s",
                                 e)
                continue
            request = conn.recv()
        except (EOFError, OSError):
            return
        op = request[0]
        if op == "stop":
            try:
                save_baselines(evaluator, dstore)
            except DetectionError as e:
                logger.error("baseline state not saved at stop: %s", e)
            dstore.close()
            conn.send(("ok", None, logs.take()))
            return
        try:
            reply: Any
            if op == "eval":
                reply = store_found(dstore, evaluate_items(evaluator, request[1], request[2]),
                                    dedup_window_ns)
            elif op == "rules":
                evaluator.rules = build_ruleset(pack, request[1], request[2])
                reply = len(evaluator.rules.index)
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as e:
            # Reported to the server, which logs it and retries from its cursor.
            logger.exception("detection evaluator failed on %s", op)
            conn.send(("error", f"{op}: {e!r}", logs.take()))
            continue
        conn.send(("ok", reply, logs.take()))


class ProcessEvaluation(Evaluation):
    """Evaluation in a child process (spawned, not forked: the server runs gRPC threads).

    Batches go over a pipe in order, the next one while the process evaluates the one before.
    The process stores the alerts it finds and saves its baseline state (every save
    interval, between batches, and when it stops) through its own connection to the
    detection store (`open_store`). If the process dies, the batches in flight fail with a
    DetectionError naming the exit code (the engine evaluates them again from the store),
    and the next batch starts a new process from the last saved baseline state
    (`saved_rows`). What the models learned since that save from batches already collected
    is lost (at most one save interval): a first sighting among them may be alerted once
    more, folded into the open alert while it is open.
    """

    def __init__(self, pack_dir: Path | None, config: BaselineConfig, rules: RuleSet,
                 custom: Sequence[CustomRule], disabled: set[str],
                 saved_rows: Callable[[], list[BaselineRow]],
                 open_store: Callable[[], DetectionStore], dedup_window_ns: int,
                 save_interval_s: float) -> None:
        self._pack_dir = pack_dir
        self._save_interval_s = save_interval_s
        self._open_store = open_store
        self._dedup_window_ns = dedup_window_ns
        self._config = config
        self._custom = list(custom)
        self._disabled = set(disabled)
        self._saved_rows = saved_rows
        self._lock = threading.Lock()
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self._ready = False
        self._submitted = 0         # batches submitted and not collected
        self._in_flight = 0         # of those, sent to the current process
        self.starts = 0

    def start(self) -> None:
        """Start the process now (it loads the pack while the server starts)."""
        with self._lock:
            if self._proc is None:
                self._spawn()

    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_evaluator_main, name="ringfence-detection", daemon=True,
            args=(child, self._pack_dir, self._config, self._custom, self._disabled,
                  self._saved_rows(), self._open_store, self._dedup_window_ns,
                  self._save_interval_s))
        proc.start()
        child.close()
        self._proc, self._conn, self._ready = proc, parent, False
        self.starts += 1
        logger.info("detection evaluator process %d started", proc.pid)

    def _discard(self) -> str:
        proc, self._proc = self._proc, None
        self._in_flight = 0         # their replies are lost with the process
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return "not running"
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        return f"exit code {proc.exitcode}"

    def _receive(self, timeout_s: float | None) -> Any:
        assert self._conn is not None and self._proc is not None
        waited = 0.0
        try:
            while not self._conn.poll(POLL_S):
                waited += POLL_S
                if not self._proc.is_alive() or (timeout_s is not None and waited >= timeout_s):
                    raise EOFError
            status, payload, logs = self._conn.recv()
        except (EOFError, OSError) as e:
            how = self._discard()
            raise DetectionError(f"the detection evaluator process stopped answering ({how});"
                                 " a new one is started for the next batch") from e
        for level, name, text in logs:
            logging.getLogger(name).log(level, "%s", text)
        if status == "error":
            raise DetectionError(f"detection evaluator: {payload}")
        return payload

    def _send(self, request: tuple[Any, ...]) -> None:
        """Send a request (with the lock held), starting the process if needed."""
        if self._proc is None:
            self._spawn()
        assert self._conn is not None
        if not self._ready:
            self._receive(START_TIMEOUT_S)
            self._ready = True
        try:
            self._conn.send(request)
        except (OSError, ValueError) as e:
            how = self._discard()
            raise DetectionError(f"cannot reach the detection evaluator process ({how})"
                                 ) from e

    def _call(self, *request: Any) -> Any:
        with self._lock:
            if self._in_flight:
                raise DetectionError(f"{request[0]} asked of the evaluator while "
                                     f"{self._in_flight} batches are in flight")
            self._send(request)
            return self._receive(None)

    def submit(self, agent_id: str, items: Sequence[Item]) -> None:
        # The process decodes the stored bytes itself; decoded messages (tests) are
        # serialized again.
        wire = [(seq, e if isinstance(e, bytes) else e.SerializeToString())
                for seq, e in items]
        with self._lock:
            self._send(("eval", agent_id, wire))
            self._submitted += 1
            self._in_flight += 1

    def collect(self) -> StoredAlerts:
        with self._lock:
            if self._submitted == 0:
                raise AssertionError("collect() without a submitted batch")
            self._submitted -= 1
            if self._in_flight == 0:
                # Its submit failed, or the process died with it: it was never evaluated.
                raise DetectionError("the batch did not reach the detection evaluator "
                                     "process; it is evaluated again from the store")
            self._in_flight -= 1
            stored: StoredAlerts = self._receive(None)
            return stored

    def set_rules(self, rules: RuleSet, custom: Sequence[CustomRule],
                  disabled: set[str]) -> None:
        self._custom, self._disabled = list(custom), set(disabled)
        self._call("rules", self._custom, self._disabled)

    def save_baselines(self) -> None:
        """Nothing to do here: the process saves its baselines itself every save interval
        (between batches) and when it stops."""

    def close(self) -> None:
        with self._lock:
            if self._proc is None:
                return
            try:
                # Replies of batches still in flight come first; their alerts are stored, and
                # the caller's cursors do not cover them, so they are evaluated again later.
                for _ in range(self._in_flight):
                    self._receive(10.0)
                self._in_flight = 0
                if self._ready and self._conn is not None:
                    self._conn.send(("stop",))
                    self._receive(10.0)
                    self._proc.join(10)
            except (DetectionError, OSError, ValueError) as e:
                logger.warning("detection evaluator process did not stop cleanly: %s", e)
            self._discard()


__all__ = ["Evaluation", "Evaluator", "InProcessEvaluation", "ProcessEvaluation", "RuleSet",
           "build_ruleset"]
