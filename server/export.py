"""Pure exporters of stored events: OCSF 1.3.0 dicts, Timesketch rows and flat JSONL rows.
No IO, no CLI wiring; raw bytes (paths, argv) are decoded with backslash escapes so no byte is
lost or invented.

OCSF mapping: process -> Process Activity (1007), file -> File System Activity (1001),
network -> Network Activity (4001), dns -> DNS Activity (4003). Bodies without an OCSF class
(lifecycle, isolation, gap, sensor_loss, acquisition, command, triage) become Base Event
(class_uid 0, activity_id 99 "Other") with the body under `unmapped`. File events carry no
`actor`: inotify cannot tell which process touched a file, and an invented actor would be worse
than none, so OCSF_REQUIRED for 1001 leaves it out.
"""

from __future__ import annotations

import datetime
import functools
import json.encoder as json_encoder
import logging
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

OCSF_VERSION = "1.3.0"
PRODUCT = {"name": "ringfence", "vendor_name": "ringfence project"}

_BASE_REQUIRED = ("activity_id", "category_uid", "class_uid", "metadata", "severity_id", "time",
                  "type_uid")
OCSF_REQUIRED: dict[int, tuple[str, ...]] = {
    0: _BASE_REQUIRED + ("message",),
    1001: _BASE_REQUIRED + ("file",),
    1007: _BASE_REQUIRED + ("process", "actor"),
    4001: _BASE_REQUIRED + ("src_endpoint", "dst_endpoint"),
    4003: _BASE_REQUIRED + ("query",),
}

_PROCESS_ACTIVITY = {1: "Launch", 2: "Terminate", 3: "Open", 4: "Inject", 5: "Set User ID"}
_FILE_ACTIVITY = {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 5: "Rename",
                  6: "Set Attributes"}
_NET_ACTIVITY = {1: "Open", 2: "Close", 3: "Reset", 4: "Fail", 5: "Refuse", 6: "Traffic",
                 7: "Listen"}
_DNS_ACTIVITY = {1: "Query", 2: "Response", 6: "Traffic"}
_DIRECTION = {0: "Unknown", 1: "Inbound", 2: "Outbound", 3: "Lateral"}
_RCODE_IDS = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4,
              "REFUSED": 5}
_PROTO_NUM = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "sctp": 132}


class ExportError(ValueError):
    """An exported document does not satisfy its schema (names the class and the fields)."""

    def __init__(self, class_uid: int, missing: list[str]) -> None:
        super().__init__(f"OCSF class {class_uid}: missing required {', '.join(missing)}")
        self.class_uid = class_uid
        self.missing = missing


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _ms(ns: int) -> int:
    return ns // 1_000_000


def _iso(ns: int) -> str:
    """`datetime.isoformat()` of `ns` in UTC, to the microsecond (no fraction when it is 0)."""
    us = (ns // 1000) % 1_000_000
    second = _iso_second(ns // 1_000_000_000)
    return f"{second}.{us:06d}+00:00" if us else f"{second}+00:00"


@functools.lru_cache(maxsize=1024)
def _iso_second(seconds: int) -> str:
    # Events arrive roughly in time order, many per second: formatting each second once makes
    # the timestamp a cache hit instead of a datetime round trip per event.
    dt = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return dt.isoformat()[:-len("+00:00")]


def plain(msg: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict with bytes decoded (backslash escapes)."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        out[field.name] = _plain_value(value)
    return out


def _plain_value(value: Any) -> Any:
    if isinstance(value, Message):
        return plain(value)
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "items"):
        return {str(k): _plain_value(v) for k, v in value.items()}
    return [_plain_value(v) for v in value]


def _hashes(sha256: str) -> list[dict[str, Any]]:
    return [{"algorithm_id": 3, "algorithm": "SHA-256", "value": sha256}] if sha256 else []


def _ocsf_process(p: pb.Process) -> dict[str, Any]:
    exe = _text(p.exe)
    out: dict[str, Any] = {"pid": p.pid, "name": p.name}
    if p.argv:
        out["cmd_line"] = " ".join(_text(a) for a in p.argv)
    if exe:
        f: dict[str, Any] = {"path": exe, "name": exe.rsplit("/", 1)[-1], "type_id": 1}
        if p.exe_sha256:
            f["hashes"] = _hashes(p.exe_sha256)
        out["file"] = f
    if "uid" not in p.unavailable:
        out["user"] = {"uid": str(p.uid), "name": p.user}
    if p.cwd:
        out["working_directory"] = _text(p.cwd)
    if p.start_time_ns:
        out["created_time"] = _ms(p.start_time_ns)
    if p.session_id:
        out["session"] = {"uid": str(p.session_id)}
    extra: dict[str, Any] = {k: v for k, v in (("ppid", p.ppid), ("euid", p.euid), ("gid", p.gid),
                               ("tty_nr", p.tty_nr), ("argv_truncated", p.argv_truncated))
             if v}
    if p.unavailable:
        extra["unavailable"] = list(p.unavailable)
    if extra:
        out["unmapped"] = extra
    return out


def _file_object(path: bytes, fa: pb.FileActivity) -> dict[str, Any]:
    text = _text(path)
    out: dict[str, Any] = {"path": text, "name": text.rsplit("/", 1)[-1],
                           "parent_folder": text.rsplit("/", 1)[0] or "/",
                           "type_id": 2 if fa.is_directory else 1}
    if "size" not in fa.unavailable and fa.activity_id != 4:
        out["size"] = fa.size
        out["modified_time"] = _ms(fa.mtime_ns)
        out["owner"] = {"uid": str(fa.uid), "name": fa.owner}
        out["uid"] = str(fa.inode)
    if fa.sha256:
        out["hashes"] = _hashes(fa.sha256)
    return out


def _endpoint(e: pb.Endpoint) -> dict[str, Any]:
    return {"ip": e.ip, "port": e.port}


def to_ocsf(event: pb.Event, agent_id: str) -> dict[str, Any]:
    """One event as an OCSF 1.3.0 document (see the module docstring for the classes)."""
    kind = event.WhichOneof("body")
    doc: dict[str, Any] = {
        "time": _ms(event.time_ns),
        "severity_id": event.severity_id,
        "metadata": {"version": OCSF_VERSION, "product": dict(PRODUCT),
                     "uid": f"{agent_id}:{event.seq}", "sequence": event.seq},
        "device": {"uid": agent_id, "type_id": 0},
    }
    if kind == "process":
        pa = event.process
        doc.update(class_uid=1007, category_uid=1, activity_id=pa.activity_id,
                   activity_name=_PROCESS_ACTIVITY.get(pa.activity_id, "Other"))
        doc["process"] = _ocsf_process(pa.process)
        actor: dict[str, Any] = {"process": _ocsf_process(pa.parent_process)} \
            if pa.parent_process.pid else {"app_name": f"ringfence:{pa.source}"}
        doc["actor"] = actor
        if pa.activity_id == 2 and "exit_code" not in pa.process.unavailable:
            doc["exit_code"] = pa.exit_code
        doc["unmapped"] = {"source": pa.source, "is_fork": pa.is_fork}
        doc["message"] = f"process {doc['activity_name'].lower()} pid {pa.process.pid}"
    elif kind == "file":
        fa = event.file
        doc.update(class_uid=1001, category_uid=1, activity_id=fa.activity_id,
                   activity_name=_FILE_ACTIVITY.get(fa.activity_id, "Other"))
        doc["file"] = _file_object(fa.path, fa)
        if fa.new_path:
            doc["file_result"] = _file_object(fa.new_path, fa)
        unmapped: dict[str, Any] = {"mode": fa.mode}
        if fa.hash_skipped_size:
            unmapped["hash_skipped_size"] = True
        if fa.unavailable:
            unmapped["unavailable"] = list(fa.unavailable)
        doc["unmapped"] = unmapped
        doc["message"] = f"file {doc['activity_name'].lower()} {doc['file']['path']}"
    elif kind == "network":
        na = event.network
        doc.update(class_uid=4001, category_uid=4, activity_id=na.activity_id,
                   activity_name=_NET_ACTIVITY.get(na.activity_id, "Other"))
        doc["src_endpoint"] = _endpoint(na.src_endpoint)
        doc["dst_endpoint"] = _endpoint(na.dst_endpoint)
        doc["connection_info"] = {
            "protocol_name": na.protocol, "protocol_num": _PROTO_NUM.get(na.protocol, -1),
            "direction_id": na.direction_id, "direction": _DIRECTION.get(na.direction_id, ""),
            "community_uid": na.community_id, "protocol_ver_id": na.ip_version}
        doc["traffic"] = {"bytes_in": na.bytes_in, "bytes_out": na.bytes_out,
                          "packets_in": na.packets_in, "packets_out": na.packets_out}
        doc["start_time"] = _ms(na.first_seen_ns)
        doc["end_time"] = _ms(na.last_seen_ns)
        if na.pid:
            doc["actor"] = {"process": {"pid": na.pid, "file": {"path": _text(na.exe)}}}
        doc["unmapped"] = {"state": na.state}
        doc["message"] = (f"{na.protocol} {na.src_endpoint.ip}:{na.src_endpoint.port} -> "
                          f"{na.dst_endpoint.ip}:{na.dst_endpoint.port} "
                          f"{doc['activity_name'].lower()}")
    elif kind == "dns":
        d = event.dns
        doc.update(class_uid=4003, category_uid=4, activity_id=d.activity_id,
                   activity_name=_DNS_ACTIVITY.get(d.activity_id, "Other"))
        doc["query"] = {"hostname": d.hostname, "type": d.qtype, "class": "IN",
                        "packet_uid": d.transaction_id}
        if d.activity_id == 2:
            doc["rcode"] = d.rcode
            doc["rcode_id"] = _RCODE_IDS.get(d.rcode, 99)
            doc["answers"] = [{"rdata": a, "packet_uid": d.transaction_id} for a in d.answers]
        doc["src_endpoint"] = _endpoint(d.src_endpoint)
        doc["dst_endpoint"] = _endpoint(d.dst_endpoint)
        doc["connection_info"] = {"community_uid": d.community_id}
        if d.pid:
            doc["actor"] = {"process": {"pid": d.pid}}
        doc["message"] = f"dns {doc['activity_name'].lower()} {d.hostname} {d.qtype}"
    else:
        body = plain(getattr(event, kind)) if kind else {}
        doc.update(class_uid=0, category_uid=0, activity_id=99, activity_name="Other")
        doc["message"] = _base_message(kind or "empty", body)
        doc["unmapped"] = {"kind": kind or "", kind or "body": body}
    doc["type_uid"] = doc["class_uid"] * 100 + doc["activity_id"]
    return doc


def _base_message(kind: str, body: dict[str, Any]) -> str:
    detail = ", ".join(f"{k}={v}" for k, v in body.items()
                       if isinstance(v, (str, int, bool)) and k not in ("ruleset", "json",
                                                                        "policy_json"))
    return f"{kind}: {detail}"[:512]


def validate_ocsf(doc: dict[str, Any]) -> None:
    """Raise ExportError unless every field OCSF_REQUIRED names for the class is present."""
    class_uid = doc.get("class_uid")
    if not isinstance(class_uid, int) or class_uid not in OCSF_REQUIRED:
        raise ExportError(-1 if not isinstance(class_uid, int) else class_uid, ["class_uid"])
    missing = [f for f in OCSF_REQUIRED[class_uid] if doc.get(f) in (None, "", {})]
    meta = doc.get("metadata") or {}
    if meta.get("version") != OCSF_VERSION or not (meta.get("product") or {}).get("name"):
        missing.append("metadata.version/product")
    if doc.get("type_uid") != class_uid * 100 + doc.get("activity_id", -1):
        missing.append("type_uid (= class_uid*100+activity_id)")
    if missing:
        raise ExportError(class_uid, missing)


_DESC = {1007: "Process", 1001: "File", 4001: "Connection", 4003: "DNS"}


def to_timesketch(event: pb.Event, agent_id: str) -> dict[str, Any]:
    """A Timesketch row: message, datetime (ISO 8601), timestamp (µs), timestamp_desc, fields."""
    ocsf = to_ocsf(event, agent_id)
    kind = event.WhichOneof("body") or "empty"
    desc = f"{_DESC.get(ocsf['class_uid'], kind.replace('_', ' ').title())} " \
           f"{ocsf['activity_name']}" if ocsf["class_uid"] else kind.replace("_", " ").title()
    row: dict[str, Any] = {
        "message": ocsf["message"],
        "datetime": _iso(event.time_ns),
        "timestamp": event.time_ns // 1000,
        "timestamp_desc": desc,
        "data_type": f"ringfence:{kind}",
        "agent_id": agent_id,
        "seq": event.seq,
        "ocsf_class_uid": ocsf["class_uid"],
    }
    for key, value in _flat_fields(event).items():
        # A body field named like a row field (lifecycle's own `kind`) must not replace it.
        row[f"{kind}.{key}" if key in row else key] = value
    return row


def to_jsonl(event: pb.Event, agent_id: str) -> dict[str, Any]:
    """A flat readable row: seq, time, kind and the body's fields (bytes backslash-escaped).

    Keys are the body's set fields flattened with dots (proto3 defaults left out, as
    `Message.ListFields` does). Process, file, network and DNS bodies, nearly every event, are
    flattened by hand-written code that also inserts keys in sorted order (sorting an already
    sorted row is what the canonical encoder does fastest); other kinds take the generic walk.
    Both give exactly the rows of `to_jsonl_generic` (golden vectors and a randomized test pin
    this): the verifier regenerates events.jsonl byte for byte, so issued bundles depend on it.
    """
    kind = event.WhichOneof("body")
    if kind is not None:
        fast = _FAST_ROWS.get(kind)
        if fast is not None:
            return fast(event, getattr(event, kind), agent_id)
    return to_jsonl_generic(event, agent_id)


def to_jsonl_generic(event: pb.Event, agent_id: str) -> dict[str, Any]:
    """`to_jsonl` by the generic descriptor walk: the reference the fast path must equal."""
    kind = event.WhichOneof("body") or ""
    row: dict[str, Any] = {"agent_id": agent_id, "seq": event.seq, "time": _iso(event.time_ns),
                           "time_ns": event.time_ns, "severity_id": event.severity_id,
                           "kind": kind}
    _merge_flat(row, kind, _flat_fields(event))
    return row


def _merge_flat(row: dict[str, Any], kind: str, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        # A body field named like a row field (lifecycle's own `kind`) must not replace it.
        row[f"{kind}.{key}" if key in row else key] = value


_DECODE = "utf-8"
_ESCAPE = "backslashreplace"  # same as _text(), inlined: this runs for every bundled event
_json_str: Callable[[str], str] = json_encoder.encode_basestring_ascii
"""A JSON string literal exactly as an ensure_ascii encoder writes it (C when available)."""


def _flat_process(p: pb.Process, keys: tuple[str, ...], row: dict[str, Any],
                  cmd_line_key: str | None) -> None:
    (k_argv, k_trunc, k_cwd, k_euid, k_exe, k_sha, k_gid, k_name, k_pid, k_ppid, k_session,
     k_start, k_tty, k_uid, k_unavailable, k_user) = keys
    # Keys in sorted order; each test mirrors ListFields (a proto3 scalar is present when it is
    # not its default, a repeated field when it is not empty).
    argv = p.argv
    if argv:
        row[k_argv] = [a.decode(_DECODE, _ESCAPE) for a in argv]
    if p.argv_truncated:
        row[k_trunc] = True
    if cmd_line_key is not None:
        row[cmd_line_key] = " ".join([a.decode(_DECODE, _ESCAPE) for a in argv])
    if b := p.cwd:
        row[k_cwd] = b.decode(_DECODE, _ESCAPE)
    if v := p.euid:
        row[k_euid] = v
    if b := p.exe:
        row[k_exe] = b.decode(_DECODE, _ESCAPE)
    if s := p.exe_sha256:
        row[k_sha] = s
    if v := p.gid:
        row[k_gid] = v
    if s := p.name:
        row[k_name] = s
    if v := p.pid:
        row[k_pid] = v
    if v := p.ppid:
        row[k_ppid] = v
    if v := p.session_id:
        row[k_session] = v
    if v := p.start_time_ns:
        row[k_start] = v
    if v := p.tty_nr:
        row[k_tty] = v
    if v := p.uid:
        row[k_uid] = v
    if unavailable := p.unavailable:
        row[k_unavailable] = list(unavailable)
    if s := p.user:
        row[k_user] = s


_PROCESS_FIELDS = ("argv", "argv_truncated", "cwd", "euid", "exe", "exe_sha256", "gid", "name",
                   "pid", "ppid", "session_id", "start_time_ns", "tty_nr", "uid", "unavailable",
                   "user")
_PROCESS_KEYS = tuple(f"process.{f}" for f in _PROCESS_FIELDS)
_PARENT_KEYS = tuple(f"parent_process.{f}" for f in _PROCESS_FIELDS)


def _process_row(event: pb.Event, pa: pb.ProcessActivity, agent_id: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if v := pa.activity_id:
        row["activity_id"] = v
    row["agent_id"] = agent_id
    if v := pa.exit_code:
        row["exit_code"] = v
    if pa.is_fork:
        row["is_fork"] = True
    row["kind"] = "process"
    _flat_process(pa.parent_process, _PARENT_KEYS, row, None)
    _flat_process(pa.process, _PROCESS_KEYS, row, "process.cmd_line")
    row["seq"] = event.seq
    row["severity_id"] = event.severity_id
    if s := pa.source:
        row["source"] = s
    time_ns = event.time_ns
    row["time"] = _iso(time_ns)
    row["time_ns"] = time_ns
    return row


def _file_row(event: pb.Event, fa: pb.FileActivity, agent_id: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if v := fa.activity_id:
        row["activity_id"] = v
    row["agent_id"] = agent_id
    if v := fa.gid:
        row["gid"] = v
    if fa.hash_skipped_size:
        row["hash_skipped_size"] = True
    if v := fa.inode:
        row["inode"] = v
    if fa.is_directory:
        row["is_directory"] = True
    row["kind"] = "file"
    if v := fa.mode:
        row["mode"] = v
    if v := fa.mtime_ns:
        row["mtime_ns"] = v
    if b := fa.new_path:
        row["new_path"] = b.decode(_DECODE, _ESCAPE)
    if s := fa.owner:
        row["owner"] = s
    if b := fa.path:
        row["path"] = b.decode(_DECODE, _ESCAPE)
    row["seq"] = event.seq
    row["severity_id"] = event.severity_id
    if s := fa.sha256:
        row["sha256"] = s
    if v := fa.size:
        row["size"] = v
    time_ns = event.time_ns
    row["time"] = _iso(time_ns)
    row["time_ns"] = time_ns
    if v := fa.uid:
        row["uid"] = v
    if unavailable := fa.unavailable:
        row["unavailable"] = list(unavailable)
    return row


def _flat_endpoint(e: pb.Endpoint, k_ip: str, k_port: str, row: dict[str, Any]) -> None:
    if s := e.ip:
        row[k_ip] = s
    if v := e.port:
        row[k_port] = v


def _network_row(event: pb.Event, na: pb.NetworkActivity, agent_id: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if v := na.activity_id:
        row["activity_id"] = v
    row["agent_id"] = agent_id
    if v := na.bytes_in:
        row["bytes_in"] = v
    if v := na.bytes_out:
        row["bytes_out"] = v
    if s := na.community_id:
        row["community_id"] = s
    if v := na.direction_id:
        row["direction_id"] = v
    _flat_endpoint(na.dst_endpoint, "dst_endpoint.ip", "dst_endpoint.port", row)
    if b := na.exe:
        row["exe"] = b.decode(_DECODE, _ESCAPE)
    if v := na.first_seen_ns:
        row["first_seen_ns"] = v
    if v := na.ip_version:
        row["ip_version"] = v
    row["kind"] = "network"
    if v := na.last_seen_ns:
        row["last_seen_ns"] = v
    if v := na.packets_in:
        row["packets_in"] = v
    if v := na.packets_out:
        row["packets_out"] = v
    if v := na.pid:
        row["pid"] = v
    if s := na.protocol:
        row["protocol"] = s
    row["seq"] = event.seq
    row["severity_id"] = event.severity_id
    _flat_endpoint(na.src_endpoint, "src_endpoint.ip", "src_endpoint.port", row)
    if s := na.state:
        row["state"] = s
    time_ns = event.time_ns
    row["time"] = _iso(time_ns)
    row["time_ns"] = time_ns
    return row


def _dns_row(event: pb.Event, d: pb.DnsActivity, agent_id: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if v := d.activity_id:
        row["activity_id"] = v
    row["agent_id"] = agent_id
    if answers := d.answers:
        row["answers"] = list(answers)
    if s := d.community_id:
        row["community_id"] = s
    _flat_endpoint(d.dst_endpoint, "dst_endpoint.ip", "dst_endpoint.port", row)
    if s := d.hostname:
        row["hostname"] = s
    row["kind"] = "dns"
    if v := d.pid:
        row["pid"] = v
    if s := d.qtype:
        row["qtype"] = s
    if s := d.rcode:
        row["rcode"] = s
    row["seq"] = event.seq
    row["severity_id"] = event.severity_id
    _flat_endpoint(d.src_endpoint, "src_endpoint.ip", "src_endpoint.port", row)
    time_ns = event.time_ns
    row["time"] = _iso(time_ns)
    row["time_ns"] = time_ns
    if v := d.transaction_id:
        row["transaction_id"] = v
    return row


_FAST_ROWS: dict[str, Callable[[pb.Event, Any, str], dict[str, Any]]] = {
    "process": _process_row,
    "file": _file_row,
    "network": _network_row,
    "dns": _dns_row,
}
"""Body kinds rendered by hand; their field lists must follow proto/ringfence.proto (a test
compares them with the message descriptors, and with the generic rows on random events)."""


def jsonl_line(event: pb.Event, agent_id: str) -> str | None:
    """The canonical JSON text of `to_jsonl(event, agent_id)`, or None for kinds not handled.

    Canonical means what evidence bundles use for events.jsonl: sorted keys, no whitespace,
    ASCII with \\u escapes. Written out directly for the hot kinds, because building the row
    dict and encoding it costs about twice as much; tests compare every line with the encoded
    row. Callers fall back to encoding `to_jsonl` when this returns None.
    """
    kind = event.WhichOneof("body")
    if kind == "process":
        return _process_line(event, event.process, agent_id)
    if kind == "file":
        return _file_line(event, event.file, agent_id)
    if kind == "network":
        return _network_line(event, event.network, agent_id)
    if kind == "dns":
        return _dns_line(event, event.dns, agent_id)
    return None


def _process_parts(p: pb.Process, prefix: str, parts: list[str], cmd_line: bool) -> None:
    # Same fields and order as _flat_process; values as the canonical encoder writes them.
    esc = _json_str
    argv = p.argv
    if argv:
        texts = [a.decode(_DECODE, _ESCAPE) for a in argv]
        parts.append(f'"{prefix}argv":[{",".join([esc(a) for a in texts])}]')
    else:
        texts = []
    if p.argv_truncated:
        parts.append(f'"{prefix}argv_truncated":true')
    if cmd_line:
        parts.append(f'"{prefix}cmd_line":{esc(" ".join(texts))}')
    if b := p.cwd:
        parts.append(f'"{prefix}cwd":{esc(b.decode(_DECODE, _ESCAPE))}')
    if v := p.euid:
        parts.append(f'"{prefix}euid":{v}')
    if b := p.exe:
        parts.append(f'"{prefix}exe":{esc(b.decode(_DECODE, _ESCAPE))}')
    if s := p.exe_sha256:
        parts.append(f'"{prefix}exe_sha256":{esc(s)}')
    if v := p.gid:
        parts.append(f'"{prefix}gid":{v}')
    if s := p.name:
        parts.append(f'"{prefix}name":{esc(s)}')
    if v := p.pid:
        parts.append(f'"{prefix}pid":{v}')
    if v := p.ppid:
        parts.append(f'"{prefix}ppid":{v}')
    if v := p.session_id:
        parts.append(f'"{prefix}session_id":{v}')
    if v := p.start_time_ns:
        parts.append(f'"{prefix}start_time_ns":{v}')
    if v := p.tty_nr:
        parts.append(f'"{prefix}tty_nr":{v}')
    if v := p.uid:
        parts.append(f'"{prefix}uid":{v}')
    if unavailable := p.unavailable:
        parts.append(f'"{prefix}unavailable":[{",".join([esc(u) for u in unavailable])}]')
    if s := p.user:
        parts.append(f'"{prefix}user":{esc(s)}')


def _tail_parts(event: pb.Event, parts: list[str]) -> None:
    time_ns = event.time_ns
    parts.append(f'"time":"{_iso(time_ns)}","time_ns":{time_ns}')


def _process_line(event: pb.Event, pa: pb.ProcessActivity, agent_id: str) -> str:
    esc = _json_str
    parts: list[str] = []
    if v := pa.activity_id:
        parts.append(f'"activity_id":{v}')
    parts.append(f'"agent_id":{esc(agent_id)}')
    if v := pa.exit_code:
        parts.append(f'"exit_code":{v}')
    if pa.is_fork:
        parts.append('"is_fork":true')
    parts.append('"kind":"process"')
    _process_parts(pa.parent_process, "parent_process.", parts, False)
    _process_parts(pa.process, "process.", parts, True)
    parts.append(f'"seq":{event.seq},"severity_id":{event.severity_id}')
    if s := pa.source:
        parts.append(f'"source":{esc(s)}')
    _tail_parts(event, parts)
    return "{" + ",".join(parts) + "}"


def _file_line(event: pb.Event, fa: pb.FileActivity, agent_id: str) -> str:
    esc = _json_str
    parts: list[str] = []
    if v := fa.activity_id:
        parts.append(f'"activity_id":{v}')
    parts.append(f'"agent_id":{esc(agent_id)}')
    if v := fa.gid:
        parts.append(f'"gid":{v}')
    if fa.hash_skipped_size:
        parts.append('"hash_skipped_size":true')
    if v := fa.inode:
        parts.append(f'"inode":{v}')
    if fa.is_directory:
        parts.append('"is_directory":true')
    parts.append('"kind":"file"')
    if v := fa.mode:
        parts.append(f'"mode":{v}')
    if v := fa.mtime_ns:
        parts.append(f'"mtime_ns":{v}')
    if b := fa.new_path:
        parts.append(f'"new_path":{esc(b.decode(_DECODE, _ESCAPE))}')
    if s := fa.owner:
        parts.append(f'"owner":{esc(s)}')
    if b := fa.path:
        parts.append(f'"path":{esc(b.decode(_DECODE, _ESCAPE))}')
    parts.append(f'"seq":{event.seq},"severity_id":{event.severity_id}')
    if s := fa.sha256:
        parts.append(f'"sha256":{esc(s)}')
    if v := fa.size:
        parts.append(f'"size":{v}')
    _tail_parts(event, parts)
    if v := fa.uid:
        parts.append(f'"uid":{v}')
    if unavailable := fa.unavailable:
        parts.append(f'"unavailable":[{",".join([esc(u) for u in unavailable])}]')
    return "{" + ",".join(parts) + "}"


def _endpoint_parts(e: pb.Endpoint, prefix: str, parts: list[str]) -> None:
    if s := e.ip:
        parts.append(f'"{prefix}ip":{_json_str(s)}')
    if v := e.port:
        parts.append(f'"{prefix}port":{v}')


def _network_line(event: pb.Event, na: pb.NetworkActivity, agent_id: str) -> str:
    esc = _json_str
    parts: list[str] = []
    if v := na.activity_id:
        parts.append(f'"activity_id":{v}')
    parts.append(f'"agent_id":{esc(agent_id)}')
    if v := na.bytes_in:
        parts.append(f'"bytes_in":{v}')
    if v := na.bytes_out:
        parts.append(f'"bytes_out":{v}')
    if s := na.community_id:
        parts.append(f'"community_id":{esc(s)}')
    if v := na.direction_id:
        parts.append(f'"direction_id":{v}')
    _endpoint_parts(na.dst_endpoint, "dst_endpoint.", parts)
    if b := na.exe:
        parts.append(f'"exe":{esc(b.decode(_DECODE, _ESCAPE))}')
    if v := na.first_seen_ns:
        parts.append(f'"first_seen_ns":{v}')
    if v := na.ip_version:
        parts.append(f'"ip_version":{v}')
    parts.append('"kind":"network"')
    if v := na.last_seen_ns:
        parts.append(f'"last_seen_ns":{v}')
    if v := na.packets_in:
        parts.append(f'"packets_in":{v}')
    if v := na.packets_out:
        parts.append(f'"packets_out":{v}')
    if v := na.pid:
        parts.append(f'"pid":{v}')
    if s := na.protocol:
        parts.append(f'"protocol":{esc(s)}')
    parts.append(f'"seq":{event.seq},"severity_id":{event.severity_id}')
    _endpoint_parts(na.src_endpoint, "src_endpoint.", parts)
    if s := na.state:
        parts.append(f'"state":{esc(s)}')
    _tail_parts(event, parts)
    return "{" + ",".join(parts) + "}"


def _dns_line(event: pb.Event, d: pb.DnsActivity, agent_id: str) -> str:
    esc = _json_str
    parts: list[str] = []
    if v := d.activity_id:
        parts.append(f'"activity_id":{v}')
    parts.append(f'"agent_id":{esc(agent_id)}')
    if answers := d.answers:
        parts.append(f'"answers":[{",".join([esc(a) for a in answers])}]')
    if s := d.community_id:
        parts.append(f'"community_id":{esc(s)}')
    _endpoint_parts(d.dst_endpoint, "dst_endpoint.", parts)
    if s := d.hostname:
        parts.append(f'"hostname":{esc(s)}')
    parts.append('"kind":"dns"')
    if v := d.pid:
        parts.append(f'"pid":{v}')
    if s := d.qtype:
        parts.append(f'"qtype":{esc(s)}')
    if s := d.rcode:
        parts.append(f'"rcode":{esc(s)}')
    parts.append(f'"seq":{event.seq},"severity_id":{event.severity_id}')
    _endpoint_parts(d.src_endpoint, "src_endpoint.", parts)
    _tail_parts(event, parts)
    if v := d.transaction_id:
        parts.append(f'"transaction_id":{v}')
    return "{" + ",".join(parts) + "}"


def _flat_fields(event: pb.Event) -> dict[str, Any]:
    kind = event.WhichOneof("body")
    if kind is None:
        return {}
    out: dict[str, Any] = {}
    _flatten(plain(getattr(event, kind)), "", out)
    if kind == "process":
        argv = event.process.process.argv
        out["process.cmd_line"] = " ".join(_text(a) for a in argv)
    return out


def _flatten(d: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, key + ".", out)
        else:
            out[key] = v


def summary(event: pb.Event) -> str:
    """One human line for terminals: what happened, to what, by whom."""
    kind = event.WhichOneof("body")
    if kind == "process":
        pa = event.process
        p = pa.process
        verb = {1: "launch", 2: "exit"}.get(pa.activity_id, f"activity {pa.activity_id}")
        cmd = " ".join(_text(a) for a in p.argv) or _text(p.exe)
        extra = f" exit={pa.exit_code}" if pa.activity_id == 2 else ""
        return f"{verb} pid={p.pid} ppid={p.ppid} user={p.user or p.uid}{extra} {cmd}"[:400]
    if kind == "file":
        fa = event.file
        verb = {1: "create", 3: "modify", 4: "delete", 5: "rename", 6: "attrib"}.get(
            fa.activity_id, str(fa.activity_id))
        target = f" -> {_text(fa.new_path)}" if fa.new_path else ""
        digest = f" sha256={fa.sha256[:16]}…" if fa.sha256 else ""
        return f"{verb} {_text(fa.path)}{target}{digest}"
    if kind == "network":
        na = event.network
        verb = {1: "open", 2: "close"}.get(na.activity_id, str(na.activity_id))
        who = f" pid={na.pid} {_text(na.exe)}" if na.pid else ""
        return (f"{verb} {na.protocol} {na.src_endpoint.ip}:{na.src_endpoint.port} -> "
                f"{na.dst_endpoint.ip}:{na.dst_endpoint.port}{who}")
    if kind == "dns":
        d = event.dns
        answers = f" = {', '.join(d.answers)}" if d.answers else ""
        return f"{'query' if d.activity_id == 1 else 'response'} {d.hostname} {d.qtype}{answers}"
    if kind == "lifecycle":
        lc = event.lifecycle
        name = pb.AgentLifecycle.Kind.Name(lc.kind)
        return f"{name} {lc.agent_version} {lc.message}".strip()
    if kind == "isolation":
        iso = event.isolation
        name = pb.IsolationActivity.Transition.Name(iso.transition)
        sha = f" ruleset={iso.ruleset_sha256[:16]}…" if iso.ruleset_sha256 else ""
        cut = f" cut={iso.connections_cut}" if iso.connections_cut else ""
        return f"{name} {iso.backend}{sha}{cut} {iso.reason}".strip()
    if kind == "gap":
        g = event.gap
        return (f"LOSS seq {g.first_seq}..{g.last_seq} ({g.last_seq - g.first_seq + 1} events) "
                f"{g.reason}")
    if kind == "sensor_loss":
        sl = event.sensor_loss
        return f"{sl.sensor}: {sl.reason} lost={sl.lost}{' resynced' if sl.resynced else ''}"
    if kind == "acquisition":
        a = event.acquisition
        return (f"collected {_text(a.path)} sha256={a.sha256} size={a.size}" if not a.error
                else f"collect {_text(a.path)} FAILED: {a.error}")
    if kind == "command":
        c = event.command
        return f"command {c.action or '?'} {c.outcome} {c.reason} ({c.command_id[:12]})"
    if kind == "triage":
        return f"triage {event.triage.section} ({len(event.triage.json)} bytes)"
    if kind == "response":
        r = event.response
        return f"response {r.action} {r.target} {r.outcome} ({r.command_id[:12]})"
    return ""
