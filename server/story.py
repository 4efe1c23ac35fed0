"""Root cause: reconstruct what led to an alert or an event from the host's stored evidence.

Starting from one event (the alert's trigger, or `--seq N`), it walks the process ancestry
through stored launch events (pid -> ppid, each the latest launch of that pid before the
child started), with command lines; then gathers the network flows and DNS of those
processes and the files they touched, and puts everything in time order. File events carry
no writer pid (inotify does not say who wrote), so a file is attributed to the story when its
path is the executable or appears in the command line of a process in the ancestry, and the
attribution says so. Read-only; rendering to text is `render_text`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from collector.store.base import EventRow, Store
from proto import ringfence_pb2 as pb
from server.admin import Admin, InvalidRequest
from server.alerting import AlertNotice
from server.codec import parse_event
from server.export import summary

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 24 * 3600
MAX_WINDOW_S = 30 * 24 * 3600
MAX_EVENTS_PER_KIND = 200_000
MAX_DEPTH = 64


class AlertLookup(Protocol):
    def find(self, alert_id: str) -> AlertNotice | None: ...


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class StoryItem:
    time_ns: int
    seq: int
    kind: str
    summary: str
    pid: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"time_ns": self.time_ns, "seq": self.seq, "kind": self.kind,
                "summary": self.summary, "pid": self.pid, "note": self.note}


@dataclass
class StoryDocument:
    agent_id: str
    hostname: str
    anchor: StoryItem
    alert: dict[str, Any] | None
    ancestry: list[dict[str, Any]] = field(default_factory=list)   # root first
    timeline: list[StoryItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "hostname": self.hostname,
                "anchor": self.anchor.as_dict(), "alert": self.alert,
                "ancestry": self.ancestry,
                "timeline": [i.as_dict() for i in self.timeline], "notes": self.notes}


def _process_dict(row: EventRow, p: pb.Process) -> dict[str, Any]:
    return {"pid": p.pid, "ppid": p.ppid, "exe": _text(p.exe), "user": p.user or str(p.uid),
            "cmd_line": " ".join(_text(a) for a in p.argv), "start_time_ns": p.start_time_ns,
            "exe_sha256": p.exe_sha256, "seq": row.seq, "time_ns": row.time_ns}


def reconstruct(anchor_row: EventRow, process_rows: list[EventRow],
                other_rows: list[EventRow]) -> tuple[list[dict[str, Any]], list[StoryItem],
                                                     list[str]]:
    """The pure core: ancestry (root first), time-ordered items, and notes. `process_rows`
    and `other_rows` are the host's events in the window, in seq order."""
    anchor = parse_event(anchor_row.data)
    kind = anchor.WhichOneof("body") or ""
    notes: list[str] = []
    pid = 0
    if kind == "process":
        pid = anchor.process.process.pid
    elif kind == "network":
        pid = anchor.network.pid
    elif kind == "dns":
        pid = anchor.dns.pid
    # Latest launch of each pid before a given time: pid -> [(time, row, process)].
    launches: dict[int, list[tuple[int, EventRow, pb.Process]]] = {}
    for row in process_rows:
        activity = parse_event(row.data).process
        if activity.activity_id == 1:
            launches.setdefault(activity.process.pid, []).append(
                (activity.process.start_time_ns or row.time_ns, row, activity.process))

    def launch_of(p: int, before_ns: int) -> tuple[EventRow, pb.Process] | None:
        best = None
        for started, row, proc in launches.get(p, []):
            if started <= before_ns and (best is None or started >= best[0]):
                best = (started, row, proc)
        return (best[1], best[2]) if best else None

    chain: list[tuple[EventRow, pb.Process]] = []
    if pid:
        at = anchor_row.time_ns
        current = pid
        seen: set[int] = set()
        while current > 0 and current not in seen and len(chain) < MAX_DEPTH:
            seen.add(current)
            found = launch_of(current, at)
            if found is None:
                if current != 1:
                    notes.append(f"no stored launch event for pid {current}: the ancestry "
                                 "stops there (it started before the window or the agent)")
                break
            chain.append(found)
            at = found[1].start_time_ns or found[0].time_ns
            current = found[1].ppid
    else:
        notes.append(f"a {kind or 'unknown'} event names no process; only events around it "
                     "are shown")
    chain.reverse()
    ancestry = [_process_dict(row, proc) for row, proc in chain]
    pids = {proc.pid for _, proc in chain}
    words: dict[str, int] = {}
    for _, proc in chain:
        words[_text(proc.exe)] = proc.pid
        for arg in proc.argv:
            if arg.startswith(b"/"):
                words.setdefault(_text(arg), proc.pid)
    items = [StoryItem(row.time_ns, row.seq, "process", summary(parse_event(row.data)),
                       proc.pid, "ancestor" if proc.pid != pid else "subject")
             for row, proc in chain]
    flows: set[str] = set()
    for row in other_rows:
        if row.seq == anchor_row.seq or row.time_ns > anchor_row.time_ns:
            continue
        event = parse_event(row.data)
        body = event.WhichOneof("body")
        if body == "network" and event.network.pid in pids:
            flows.add(event.network.dst_endpoint.ip)
            items.append(StoryItem(row.time_ns, row.seq, "network", summary(event),
                                   event.network.pid, "flow of a process in the ancestry"))
        elif body == "dns" and event.dns.pid and event.dns.pid in pids:
            items.append(StoryItem(row.time_ns, row.seq, "dns", summary(event), event.dns.pid,
                                   "query of a process in the ancestry"))
        elif body == "file":
            path = _text(event.file.path)
            owner = words.get(path) or words.get(_text(event.file.new_path))
            if owner:
                items.append(StoryItem(row.time_ns, row.seq, "file", summary(event), owner,
                                       "path named by a process in the ancestry (inotify "
                                       "gives no writer pid)"))
    # DNS without a pid: attributed when one of its answers is a flow destination above.
    for row in other_rows:
        if row.time_ns > anchor_row.time_ns:
            continue
        event = parse_event(row.data)
        if event.WhichOneof("body") == "dns" and not event.dns.pid and \
                flows.intersection(event.dns.answers):
            items.append(StoryItem(row.time_ns, row.seq, "dns", summary(event), 0,
                                   "answer is the destination of a flow above"))
    items.append(StoryItem(anchor_row.time_ns, anchor_row.seq, kind, summary(anchor), pid,
                           "the event the story explains"))
    unique = {(i.seq, i.kind): i for i in items}
    return ancestry, sorted(unique.values(), key=lambda i: (i.time_ns, i.seq)), notes


class Story:
    def __init__(self, admin: Admin, store: Store, alerts: AlertLookup | None = None) -> None:
        self._admin = admin
        self._store = store
        self.alerts = alerts

    def build(self, host: str, alert_id: str = "", seq: int = 0,
              window_s: int = 0) -> StoryDocument:
        agent = self._admin.find_host(host)
        alert: dict[str, Any] | None = None
        if alert_id:
            notice = self.alerts.find(alert_id) if self.alerts is not None else None
            if notice is None:
                raise InvalidRequest(f"no alert {alert_id} is known to this server; give the "
                                     "event with --seq N instead")
            if notice.agent_id != agent.agent_id or not notice.seq:
                raise InvalidRequest(f"alert {alert_id} is not about an event of {host}")
            seq, alert = notice.seq, notice.as_dict()
        if not seq:
            raise InvalidRequest("name an alert id or an event with --seq N")
        anchor = self._store.stored_event(agent.agent_id, seq)
        if anchor is None:
            raise InvalidRequest(f"{host} has no stored event with seq {seq}")
        window = min(window_s or DEFAULT_WINDOW_S, MAX_WINDOW_S)
        since = max(anchor.time_ns - window * 1_000_000_000, 1)
        processes = list(self._rows(agent.agent_id, since, anchor.time_ns, "process"))
        others = [r for k in ("network", "dns", "file")
                  for r in self._rows(agent.agent_id, since, anchor.time_ns, k)]
        others.sort(key=lambda r: r.seq)
        ancestry, timeline, notes = reconstruct(anchor, processes, others)
        anchor_item = next(i for i in timeline if i.seq == anchor.seq)
        return StoryDocument(agent.agent_id, agent.hostname, anchor_item, alert, ancestry,
                             timeline, notes)

    def _rows(self, agent_id: str, since: int, until: int, kind: str) -> Iterator[EventRow]:
        return self._store.query_events(agent_id, since, until, kind, MAX_EVENTS_PER_KIND)


def render_text(doc: dict[str, Any], fmt_time: Any) -> str:
    """The story for a terminal: ancestry as a tree, then the timeline."""
    lines = [f"story of {doc['hostname']} seq {doc['anchor']['seq']}: {doc['anchor']['summary']}"]
    if doc.get("alert"):
        a = doc["alert"]
        lines.append(f"alert {a['alert_id']} [{a['severity']}] {a['rule']}: {a['title']}")
    lines.append("")
    lines.append("process ancestry (oldest first):")
    for depth, p in enumerate(doc["ancestry"]):
        lines.append(f"{'  ' * depth}└─ pid {p['pid']} ({p['user']}) {p['cmd_line'] or p['exe']}"
                     f"  [started {fmt_time(p['start_time_ns'])}, seq {p['seq']}]")
    if not doc["ancestry"]:
        lines.append("  (none)")
    lines.append("")
    lines.append("timeline:")
    for item in doc["timeline"]:
        lines.append(f"  {fmt_time(item['time_ns'])} #{item['seq']:<7} {item['kind']:<8} "
                     f"{item['summary']}" + (f"   ({item['note']})" if item["note"] else ""))
    for note in doc["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
