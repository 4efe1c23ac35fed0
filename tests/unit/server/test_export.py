"""OCSF / Timesketch / JSONL exporters: golden fields per class and the required-field check."""

from __future__ import annotations

import datetime
import json

import pytest

from proto import ringfence_pb2 as pb
from server.export import OCSF_REQUIRED, ExportError, to_jsonl, to_ocsf, to_timesketch
from server.export import validate_ocsf

T = 1_700_000_000_123_456_789
AGENT = "agent-7"


def _process() -> pb.Event:
    ev = pb.Event(seq=42, time_ns=T, severity_id=1)
    pa = ev.process
    pa.activity_id, pa.source = 1, "netlink"
    p = pa.process
    p.pid, p.ppid, p.uid, p.user, p.name = 4242, 1, 0, "root", "sh"
    p.exe = b"/tmp/\xffevil"
    p.argv.extend([b"/tmp/\xffevil", b"-c", b"id"])
    p.exe_sha256 = "ab" * 32
    p.start_time_ns = T - 5_000_000
    pa.parent_process.pid, pa.parent_process.name = 1, "systemd"
    return ev


def _samples() -> list[pb.Event]:
    file_ev = pb.Event(seq=2, time_ns=T, file=pb.FileActivity(
        activity_id=5, path=b"/etc/a\x01", new_path=b"/etc/b", sha256="cd" * 32, size=3,
        uid=0, owner="root", inode=99, mtime_ns=T))
    net = pb.Event(seq=3, time_ns=T, network=pb.NetworkActivity(
        activity_id=1, protocol="tcp", src_endpoint=pb.Endpoint(ip="198.18.0.1", port=40000),
        dst_endpoint=pb.Endpoint(ip="198.18.0.2", port=443), direction_id=2,
        community_id="1:x", pid=10, exe=b"/usr/bin/curl", ip_version=4))
    dns = pb.Event(seq=4, time_ns=T, dns=pb.DnsActivity(
        activity_id=2, hostname="c2.example.test", qtype="A", rcode="NXDOMAIN",
        transaction_id=7, src_endpoint=pb.Endpoint(ip="198.18.0.2", port=53),
        dst_endpoint=pb.Endpoint(ip="198.18.0.1", port=5000)))
    loss = pb.Event(seq=5, time_ns=T, sensor_loss=pb.SensorLoss(
        sensor="process", reason="ENOBUFS", lost=3, resynced=True))
    life = pb.Event(seq=6, time_ns=T, lifecycle=pb.AgentLifecycle(
        kind=pb.AgentLifecycle.START, sensors={"process": "netlink"}, hostname="h1"))
    gap = pb.Event(seq=9, time_ns=T, gap=pb.Gap(first_seq=7, last_seq=8, reason="spool full"))
    iso = pb.Event(seq=10, time_ns=T, isolation=pb.IsolationActivity(
        transition=pb.IsolationActivity.APPLIED, backend="fake", ruleset="table inet x {}"))
    acq = pb.Event(seq=11, time_ns=T, acquisition=pb.FileAcquisition(path=b"/etc/\xfe",
                                                                     record_dsse=b"\x00\x01"))
    return [_process(), file_ev, net, dns, loss, life, gap, iso, acq, pb.Event(seq=12)]


@pytest.mark.parametrize("ev", _samples(), ids=lambda e: e.WhichOneof("body") or "empty")
def test_every_kind_validates_and_is_json(ev: pb.Event) -> None:
    doc = to_ocsf(ev, AGENT)
    validate_ocsf(doc)
    assert doc["type_uid"] == doc["class_uid"] * 100 + doc["activity_id"]
    assert doc["metadata"]["version"] == "1.3.0"
    assert doc["metadata"]["product"]["name"] == "ringfence"
    assert doc["metadata"]["sequence"] == ev.seq
    json.dumps(doc)
    ts = to_timesketch(ev, AGENT)
    assert {"message", "datetime", "timestamp_desc", "timestamp"} <= ts.keys()
    assert ts["message"]
    json.dumps(ts)
    json.dumps(to_jsonl(ev, AGENT))


def test_process_mapping() -> None:
    doc = to_ocsf(_process(), AGENT)
    assert (doc["class_uid"], doc["category_uid"], doc["activity_id"], doc["type_uid"]) == (
        1007, 1, 1, 100701)
    assert doc["time"] == T // 1_000_000
    p = doc["process"]
    assert p["pid"] == 4242 and p["cmd_line"] == "/tmp/\\xffevil -c id"
    assert p["file"]["path"] == "/tmp/\\xffevil"
    assert p["file"]["hashes"] == [{"algorithm_id": 3, "algorithm": "SHA-256",
                                    "value": "ab" * 32}]
    assert p["user"] == {"uid": "0", "name": "root"}
    assert doc["actor"]["process"]["pid"] == 1 and doc["metadata"]["uid"] == "agent-7:42"


def test_file_network_dns_mapping() -> None:
    file_doc, net_doc, dns_doc = (to_ocsf(e, AGENT) for e in _samples()[1:4])
    assert (file_doc["class_uid"], file_doc["activity_id"], file_doc["type_uid"]) == (
        1001, 5, 100105)
    assert file_doc["file"]["path"] == "/etc/a\x01"
    assert file_doc["file_result"]["path"] == "/etc/b"
    assert (net_doc["class_uid"], net_doc["category_uid"], net_doc["type_uid"]) == (
        4001, 4, 400101)
    assert net_doc["connection_info"]["direction_id"] == 2
    assert net_doc["connection_info"]["community_uid"] == "1:x"
    assert net_doc["connection_info"]["protocol_num"] == 6
    assert net_doc["actor"]["process"]["file"]["path"] == "/usr/bin/curl"
    assert (dns_doc["class_uid"], dns_doc["type_uid"]) == (4003, 400302)
    assert dns_doc["query"]["hostname"] == "c2.example.test"
    assert dns_doc["rcode_id"] == 3 and dns_doc["answers"] == []


def test_other_bodies_are_base_events_with_unmapped_body() -> None:
    doc = to_ocsf(_samples()[4], AGENT)
    assert (doc["class_uid"], doc["activity_id"], doc["type_uid"]) == (0, 99, 99)
    assert doc["unmapped"]["sensor_loss"] == {"sensor": "process", "reason": "ENOBUFS",
                                              "lost": 3, "resynced": True}
    acq = to_ocsf(_samples()[8], AGENT)
    assert acq["unmapped"]["acquisition"]["path"] == "/etc/\\xfe"


@pytest.mark.parametrize("class_uid", sorted(OCSF_REQUIRED))
def test_validator_names_each_missing_field(class_uid: int) -> None:
    by_class = {to_ocsf(e, AGENT)["class_uid"]: to_ocsf(e, AGENT) for e in _samples()}
    doc = by_class[class_uid]
    for field in OCSF_REQUIRED[class_uid]:
        broken = dict(doc)
        del broken[field]
        with pytest.raises(ExportError) as info:
            validate_ocsf(broken)
        assert field in info.value.missing
    wrong_type = dict(doc, type_uid=1)
    with pytest.raises(ExportError):
        validate_ocsf(wrong_type)
    with pytest.raises(ExportError):
        validate_ocsf(dict(doc, metadata={"version": "1.0.0", "product": {"name": "x"}}))


def test_timesketch_and_jsonl_rows() -> None:
    ev = _process()
    ts = to_timesketch(ev, AGENT)
    assert ts["timestamp"] == T // 1000
    parsed = datetime.datetime.fromisoformat(ts["datetime"])
    assert parsed.tzinfo is not None and int(parsed.timestamp() * 1_000_000) == T // 1000
    assert ts["timestamp_desc"] == "Process Launch"
    assert ts["process.cmd_line"] == "/tmp/\\xffevil -c id"
    row = to_jsonl(ev, AGENT)
    assert row["kind"] == "process" and row["seq"] == 42 and row["time_ns"] == T
    assert row["process.exe"] == "/tmp/\\xffevil" and row["agent_id"] == AGENT
