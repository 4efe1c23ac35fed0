"""Ringfence events as flat detection records, and the field mapping from Sigma's Linux field
names onto them (a pySigma processing pipeline).

Each event kind becomes one Sigma log source category (process launches are
`process_creation`, file creations `file_event`, outbound flows `network_connection`, DNS
`dns_query`) and a record: a dict of ringfence field names to text or numbers. It does not
decide what matches; server.detection.sigma does.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from sigma.processing.conditions import LogsourceCondition
from sigma.processing.pipeline import ProcessingItem, ProcessingPipeline
from sigma.processing.transformations import FieldMappingTransformation

from proto import ringfence_pb2 as pb

# Sigma field name -> ringfence record field, per log source category.
FIELD_MAPPING: dict[str, dict[str, str]] = {
    "process_creation": {
        "Image": "process.exe",
        "CommandLine": "process.cmd_line",
        "OriginalFileName": "process.name",
        "ProcessId": "process.pid",
        "User": "process.user",
        "CurrentDirectory": "process.cwd",
        "sha256": "process.exe_sha256",
        "ParentImage": "parent_process.exe",
        "ParentCommandLine": "parent_process.cmd_line",
        "ParentProcessId": "process.ppid",
        "ParentUser": "parent_process.user",
    },
    "file_event": {
        "TargetFilename": "file.path",
        "SourceFilename": "file.source_path",
        "User": "file.owner",
    },
    "file_change": {"TargetFilename": "file.path", "User": "file.owner"},
    "file_delete": {"TargetFilename": "file.path", "User": "file.owner"},
    "file_rename": {"TargetFilename": "file.path", "SourceFilename": "file.source_path",
                    "User": "file.owner"},
    "network_connection": {
        "Image": "process.exe",
        "ProcessId": "process.pid",
        "DestinationIp": "dst_endpoint.ip",
        "DestinationPort": "dst_endpoint.port",
        "DestinationHostname": "dst_endpoint.hostname",
        "SourceIp": "src_endpoint.ip",
        "SourcePort": "src_endpoint.port",
        "Initiated": "connection.initiated",
        "Protocol": "connection.protocol",
    },
    "dns_query": {
        "QueryName": "query.hostname",
        "QueryType": "query.type",
        "QueryResults": "answers",
        "ProcessId": "process.pid",
    },
}

# Why some Sigma fields have no ringfence counterpart (shown by `ringfence rules test`).
UNMAPPABLE_REASONS: dict[str, str] = {
    "LogonId": "the audit login id (auid) is not collected by ringfence",
    "Image@file_event": "file events are not attributed to a process, so Image is unknown",
    "Image@file_change": "file events are not attributed to a process, so Image is unknown",
    "Image@file_delete": "file events are not attributed to a process, so Image is unknown",
    "Image@file_rename": "file events are not attributed to a process, so Image is unknown",
    "Image@dns_query": "DNS events carry a pid but no executable path",
}

CATEGORIES = tuple(FIELD_MAPPING)
RINGFENCE_FIELDS: dict[str, frozenset[str]] = {
    category: frozenset(mapping.values()) for category, mapping in FIELD_MAPPING.items()}


def sigma_pipeline() -> ProcessingPipeline:
    """The pySigma pipeline that renames Sigma's Linux fields to ringfence record fields."""
    items = [
        ProcessingItem(identifier=f"ringfence_{category}",
                       transformation=FieldMappingTransformation(
                           {k: v for k, v in mapping.items()}),
                       rule_conditions=[LogsourceCondition(category=category)])
        for category, mapping in FIELD_MAPPING.items()]
    return ProcessingPipeline(name="ringfence field mapping", priority=20, items=items)


def unmappable_reason(field: str, category: str) -> str:
    reason = UNMAPPABLE_REASONS.get(f"{field}@{category}") or UNMAPPABLE_REASONS.get(field)
    return reason or f"ringfence records no {field} for {category} events"


# -- records --------------------------------------------------------------------------------

Record = dict[str, "str | int"]


class Observed(NamedTuple):
    """One event as detection sees it."""

    category: str
    record: Record


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def _cmd_line(argv: Iterable[bytes]) -> str:
    return " ".join(_text(a) for a in argv)


class DNSCache:
    """Recent DNS answers of one agent (address -> queried name), so a flow to an address can
    be matched on the hostname that was resolved for it (Sigma's DestinationHostname)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._names: OrderedDict[str, str] = OrderedDict()

    def learn(self, hostname: str, answers: list[str]) -> None:
        for answer in answers:
            self._names[answer] = hostname
            self._names.move_to_end(answer)
        while len(self._names) > self._capacity:
            self._names.popitem(last=False)

    def name_of(self, address: str) -> str | None:
        return self._names.get(address)


def observe(event: pb.Event, dns: DNSCache | None = None) -> Observed | None:
    """The detection record of an event, or None for kinds detection does not look at."""
    kind = event.WhichOneof("body")
    if kind == "process":
        activity = event.process
        if activity.activity_id != 1 or activity.is_fork:
            return None
        p, pp = activity.process, activity.parent_process
        exe = _text(p.exe)
        record: Record = {
            "process.exe": exe, "process.name": p.name or os.path.basename(exe),
            "process.cmd_line": _cmd_line(p.argv), "process.pid": p.pid,
            "process.ppid": p.ppid or pp.pid, "process.uid": p.uid, "process.user": p.user,
            "process.cwd": _text(p.cwd), "process.exe_sha256": p.exe_sha256,
            "process.session_id": p.session_id,
        }
        if pp.pid or pp.exe:
            record["parent_process.exe"] = _text(pp.exe)
            record["parent_process.cmd_line"] = _cmd_line(pp.argv)
            record["parent_process.user"] = pp.user
            record["parent_process.name"] = pp.name
        return Observed("process_creation", {k: v for k, v in record.items() if v != ""})
    if kind == "file":
        f = event.file
        category = {1: "file_event", 3: "file_change", 4: "file_delete",
                    5: "file_rename"}.get(f.activity_id)
        if category is None or f.is_directory:
            return None
        record = {"file.path": _text(f.path), "file.sha256": f.sha256, "file.owner": f.owner}
        if f.activity_id == 5:
            # A file renamed into place is created at its new path (editors and installers
            # write a temporary file and rename it), so the target is what rules look at.
            record["file.source_path"] = record["file.path"]
            record["file.path"] = _text(f.new_path)
        return Observed(category, {k: v for k, v in record.items() if v != ""})
    if kind == "network":
        n = event.network
        record = {
            "dst_endpoint.ip": n.dst_endpoint.ip, "dst_endpoint.port": n.dst_endpoint.port,
            "src_endpoint.ip": n.src_endpoint.ip, "src_endpoint.port": n.src_endpoint.port,
            "connection.protocol": n.protocol,
            "connection.initiated": "true" if n.direction_id == 2 else "false",
            "connection.direction_id": n.direction_id,
            "process.pid": n.pid, "process.exe": _text(n.exe),
        }
        if dns is not None and (name := dns.name_of(n.dst_endpoint.ip)):
            record["dst_endpoint.hostname"] = name
        return Observed("network_connection",
                        {k: v for k, v in record.items() if v != "" and v != 0 or k.endswith(
                            "initiated")})
    if kind == "dns":
        d = event.dns
        if dns is not None and d.answers:
            dns.learn(d.hostname, [a for a in d.answers])
        record = {"query.hostname": d.hostname, "query.type": d.qtype,
                  "answers": ";".join(d.answers), "process.pid": d.pid}
        return Observed("dns_query", {k: v for k, v in record.items() if v != "" and v != 0})
    return None
