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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

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


_Extract = Callable[[Any], "str | None"]


class Fields(dict[str, "str | None"]):
    """The text values of one event's record fields, computed on first use and cached.

    `fields[name]` is the value, or None when the event has no such field; `get` behaves
    like a dict of the present fields. Detection reads a handful of fields per event, so
    converting only those (not the whole protobuf message) is most of its speed; building
    one must cost next to nothing too (no closures, no per-event tuples).
    """

    __slots__ = ("_table", "_body", "names")

    def __init__(self, table: dict[str, _Extract], body: Any, names: tuple[str, ...]) -> None:
        self._table = table         # field -> how to compute it from `body`
        self._body = body
        self.names = names          # every field this kind of event can have

    def __missing__(self, name: str) -> str | None:
        extract = self._table.get(name)
        value = None if extract is None else extract(self._body)
        self[name] = value
        return value

    def get(self, name: str, default: Any = None) -> Any:
        value = self[name]
        return default if value is None else value

    def present(self) -> dict[str, str]:
        """Every field the event has (computes them all: for keyword searches)."""
        return {n: v for n in self.names if (v := self[n]) is not None}


class _Lowered(Fields):
    """The lower-cased view of another Fields, cached the same way."""

    __slots__ = ()

    def __missing__(self, name: str) -> str | None:
        value = self._body[name]
        lower = None if value is None else value.lower()
        self[name] = lower
        return lower


def fields_of(record: Record) -> Fields:
    """Fields of a ready-made record (tests, tools); numbers become their text."""
    out = Fields({}, None, tuple(record))
    out.update({k: v if isinstance(v, str) else str(v) for k, v in record.items()})
    return out


def lowered(raw: Fields) -> Fields:
    """The lower-cased view of `raw` (for case-insensitive matching)."""
    return _Lowered({}, raw, raw.names)


def _str(value: str) -> str | None:
    return value or None


def _num(value: int) -> str:
    return str(value)


def _nonzero(value: int) -> str | None:
    return str(value) if value else None


def _bytes(value: bytes) -> str | None:
    return _text(value) if value else None


def _argv(argv: Sequence[bytes]) -> str | None:
    return " ".join([_text(a) for a in argv]) if argv else None


def _process_name(p: pb.Process) -> str | None:
    return p.name or (os.path.basename(_text(p.exe)) if p.exe else None)


def _has_parent(a: pb.ProcessActivity) -> bool:
    return bool(a.parent_process.pid or a.parent_process.exe)


# Field -> how to compute it from the event body, per category. A field whose value is empty
# (or, where the original record dropped zeros, zero) is absent: None.
_PROCESS: dict[str, _Extract] = {
    "process.exe": lambda a: _bytes(a.process.exe),
    "process.name": lambda a: _process_name(a.process),
    "process.cmd_line": lambda a: _argv(a.process.argv),
    "process.pid": lambda a: _num(a.process.pid),
    "process.ppid": lambda a: _num(a.process.ppid or a.parent_process.pid),
    "process.uid": lambda a: _num(a.process.uid),
    "process.user": lambda a: _str(a.process.user),
    "process.cwd": lambda a: _bytes(a.process.cwd),
    "process.exe_sha256": lambda a: _str(a.process.exe_sha256),
    "process.session_id": lambda a: _num(a.process.session_id),
    "parent_process.exe": lambda a: _bytes(a.parent_process.exe) if _has_parent(a) else None,
    "parent_process.cmd_line":
        lambda a: _argv(a.parent_process.argv) if _has_parent(a) else None,
    "parent_process.user": lambda a: _str(a.parent_process.user) if _has_parent(a) else None,
    "parent_process.name": lambda a: _str(a.parent_process.name) if _has_parent(a) else None,
}
_FILE: dict[str, _Extract] = {
    # A file renamed into place is created at its new path (editors and installers write a
    # temporary file and rename it), so the target is what rules look at.
    "file.path": lambda f: _bytes(f.new_path if f.activity_id == 5 else f.path),
    "file.source_path": lambda f: _bytes(f.path) if f.activity_id == 5 else None,
    "file.sha256": lambda f: _str(f.sha256),
    "file.owner": lambda f: _str(f.owner),
}
_NETWORK: dict[str, _Extract] = {
    "dst_endpoint.ip": lambda n: _str(n.dst_endpoint.ip),
    "dst_endpoint.port": lambda n: _nonzero(n.dst_endpoint.port),
    "src_endpoint.ip": lambda n: _str(n.src_endpoint.ip),
    "src_endpoint.port": lambda n: _nonzero(n.src_endpoint.port),
    "connection.protocol": lambda n: _str(n.protocol),
    "connection.initiated": lambda n: "true" if n.direction_id == 2 else "false",
    "connection.direction_id": lambda n: _nonzero(n.direction_id),
    "process.pid": lambda n: _nonzero(n.pid),
    "process.exe": lambda n: _bytes(n.exe),
}
_DNS: dict[str, _Extract] = {
    "query.hostname": lambda d: _str(d.hostname),
    "query.type": lambda d: _str(d.qtype),
    "answers": lambda d: ";".join(d.answers) or None,
    "process.pid": lambda d: _nonzero(d.pid),
}
_FILE_CATEGORIES = {1: "file_event", 3: "file_change", 4: "file_delete", 5: "file_rename"}


class EventFields(NamedTuple):
    """What detection needs of one event: its category and its lazily computed fields."""

    category: str
    raw: Fields


_PROCESS_NAMES, _FILE_NAMES, _DNS_NAMES = tuple(_PROCESS), tuple(_FILE), tuple(_DNS)
_NETWORK_NAMES = (*_NETWORK, "dst_endpoint.hostname")


def _process_fields(a: pb.ProcessActivity) -> Fields:
    """A launch's fields, with those every launch needs (the rule memo's and the baselines')
    computed at once: one call instead of one lazy look-up each. Same values as _PROCESS."""
    raw = Fields(_PROCESS, a, _PROCESS_NAMES)
    p, parent = a.process, a.parent_process
    exe, argv = p.exe, p.argv
    raw["process.exe"] = exe.decode("utf-8", "backslashreplace") if exe else None
    # Joined, then decoded once: a space never belongs to a multi-byte sequence, so this
    # equals decoding each argument (what _argv does).
    raw["process.cmd_line"] = b" ".join(argv).decode("utf-8", "backslashreplace") if argv \
        else None
    raw["process.user"] = p.user or None
    raw["process.exe_sha256"] = p.exe_sha256 or None
    parent_exe = parent.exe
    if parent_exe or parent.pid:
        pargv = parent.argv
        raw["parent_process.exe"] = (parent_exe.decode("utf-8", "backslashreplace")
                                     if parent_exe else None)
        raw["parent_process.cmd_line"] = (b" ".join(pargv).decode("utf-8", "backslashreplace")
                                          if pargv else None)
    else:
        raw["parent_process.exe"] = raw["parent_process.cmd_line"] = None
    return raw


def event_fields(event: pb.Event, dns: DNSCache | None = None) -> EventFields | None:
    """The category and lazy fields of an event, or None for kinds detection does not look
    at. DNS answers are learned here (every DNS event, whether or not a rule reads it)."""
    kind = event.WhichOneof("body")
    if kind == "process":
        activity = event.process
        if activity.activity_id != 1 or activity.is_fork:
            return None
        return EventFields("process_creation", _process_fields(activity))
    if kind == "file":
        f = event.file
        category = _FILE_CATEGORIES.get(f.activity_id)
        if category is None or f.is_directory:
            return None
        return EventFields(category, Fields(_FILE, f, _FILE_NAMES))
    if kind == "network":
        n = event.network
        raw = Fields(_NETWORK, n, _NETWORK_NAMES)
        if dns is not None and (name := dns.name_of(n.dst_endpoint.ip)):
            raw["dst_endpoint.hostname"] = name
        return EventFields("network_connection", raw)
    if kind == "dns":
        d = event.dns
        if dns is not None and d.answers:
            dns.learn(d.hostname, list(d.answers))
        return EventFields("dns_query", Fields(_DNS, d, _DNS_NAMES))
    return None


def observe(event: pb.Event, dns: DNSCache | None = None) -> Observed | None:
    """The whole detection record of an event (every field it has, as text), or None for
    kinds detection does not look at. The live path uses event_fields instead."""
    found = event_fields(event, dns)
    if found is None:
        return None
    record: Record = dict(found.raw.present())
    return Observed(found.category, record)
