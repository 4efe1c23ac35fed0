"""What the console pages show, shaped from stored rows: host summaries, timeline rows, the
process tree, flows, DNS, file changes and isolation history. Pure (no IO, no HTTP, no HTML);
the templates render these records and the JSON endpoints serialize them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from collector.store.base import EventRow
from proto import ringfence_pb2 as pb
from server.admin import HostView
from server.codec import parse_event
from server.export import summary

MAX_TREE_NODES = 500
ROLES = ("viewer", "responder", "admin")


def fmt_time(ns: int) -> str:
    if not ns:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S")


def role_at_least(role: str, needed: str) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def host_dict(view: HostView) -> dict[str, Any]:
    """One fleet row; the keys are the JSON API's and the template's."""
    a = view.agent
    sensors = dict(a.sensors)
    degraded = sorted(k for k, v in sensors.items() if v in ("unavailable", "off", "failed"))
    return {
        "agent_id": a.agent_id, "hostname": a.hostname, "online": view.online,
        "last_seen": fmt_time(a.last_seen_ns), "last_seen_ns": a.last_seen_ns,
        "agent_version": a.agent_version or "-", "os": a.os, "addresses": list(a.addresses),
        "sensors": sensors,
        "sensor_status": "ok" if sensors and not degraded else
        ("unknown" if not sensors else "degraded: " + ", ".join(degraded)),
        "isolation_state": a.isolation_state or "none",
        "isolation_reason": a.isolation_reason,
        "isolation_changed": fmt_time(a.isolation_changed_ns),
        "integrity_alerts": view.integrity_alerts, "last_seq": view.last_seq,
        "revoked": a.revoked,
    }


@dataclass(frozen=True)
class TimelineRow:
    seq: int
    time: str
    kind: str
    severity_id: int
    summary: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind,
                "severity_id": self.severity_id, "summary": self.summary}


def timeline(rows: Iterable[EventRow]) -> list[TimelineRow]:
    out = []
    for row in rows:
        event = parse_event(row.data)
        out.append(TimelineRow(row.seq, fmt_time(event.time_ns), row.kind, event.severity_id,
                               summary(event)))
    return out


@dataclass
class ProcessNode:
    pid: int
    ppid: int
    name: str
    cmd: str
    user: str
    started: str
    seq: int
    exited: bool = False
    children: list[ProcessNode] = field(default_factory=list)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def process_tree(rows: Iterable[EventRow]) -> list[ProcessNode]:
    """Launched processes nested under their parents (by ppid). A reused pid is the latest
    launch; a parent never seen launching makes its children roots. At most MAX_TREE_NODES."""
    nodes: dict[int, ProcessNode] = {}
    for row in rows:
        event = parse_event(row.data)
        if event.WhichOneof("body") != "process":
            continue
        pa = event.process
        p = pa.process
        if pa.activity_id == 1:
            nodes.pop(p.pid, None)
            if len(nodes) >= MAX_TREE_NODES:
                continue
            cmd = " ".join(_text(a) for a in p.argv) or _text(p.exe)
            nodes[p.pid] = ProcessNode(p.pid, p.ppid, p.name or cmd.split(" ")[0], cmd[:300],
                                       p.user or str(p.uid), fmt_time(p.start_time_ns or
                                                                     event.time_ns), row.seq)
        elif pa.activity_id == 2 and p.pid in nodes:
            nodes[p.pid].exited = True
    roots: list[ProcessNode] = []
    for node in sorted(nodes.values(), key=lambda n: n.seq):
        parent = nodes.get(node.ppid)
        if parent is not None and parent is not node and parent.seq < node.seq:
            parent.children.append(node)
        else:
            roots.append(node)
    return roots


def flows(rows: Iterable[EventRow]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        event = parse_event(row.data)
        if event.WhichOneof("body") == "network":
            n = event.network
            out.append({"seq": row.seq, "time": fmt_time(event.time_ns), "proto": n.protocol,
                        "src": f"{n.src_endpoint.ip}:{n.src_endpoint.port}",
                        "dst": f"{n.dst_endpoint.ip}:{n.dst_endpoint.port}",
                        "direction": {1: "in", 2: "out"}.get(n.direction_id, "?"),
                        "process": f"{n.pid} {_text(n.exe)}" if n.pid else "-",
                        "bytes": n.bytes_in + n.bytes_out})
    return out


def dns(rows: Iterable[EventRow]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        event = parse_event(row.data)
        if event.WhichOneof("body") == "dns":
            d = event.dns
            out.append({"seq": row.seq, "time": fmt_time(event.time_ns),
                        "type": "query" if d.activity_id == 1 else "response",
                        "name": d.hostname, "qtype": d.qtype, "answers": ", ".join(d.answers),
                        "rcode": d.rcode})
    return out


def file_changes(rows: Iterable[EventRow]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        event = parse_event(row.data)
        if event.WhichOneof("body") == "file":
            f = event.file
            out.append({"seq": row.seq, "time": fmt_time(event.time_ns),
                        "action": {1: "create", 3: "modify", 4: "delete", 5: "rename",
                                   6: "attrib"}.get(f.activity_id, str(f.activity_id)),
                        "path": _text(f.path) + (f" -> {_text(f.new_path)}" if f.new_path
                                                 else ""),
                        "sha256": f.sha256, "size": f.size})
    return out


def isolation_history(rows: Iterable[EventRow]) -> list[dict[str, Any]]:
    """The agent's own signed record of each isolation transition, newest first."""
    out = []
    for row in rows:
        event = parse_event(row.data)
        if event.WhichOneof("body") == "isolation":
            i = event.isolation
            out.append({"seq": row.seq, "time": fmt_time(event.time_ns),
                        "transition": pb.IsolationActivity.Transition.Name(i.transition),
                        "backend": i.backend, "reason": i.reason,
                        "ruleset_sha256": i.ruleset_sha256,
                        "command_id": i.command_id})
    out.reverse()
    return out
