"""Sample ringfence.v1.Event messages covering every body kind and the rendering edge cases
(non-UTF-8 bytes, non-ASCII text, zero and default values, empty sub-messages, maps, enums,
negative and 64-bit values). Shared by the JSONL golden vector and the codec tests; not a test
module itself."""

from __future__ import annotations

from proto import ringfence_pb2 as pb

T = 1_700_000_000_123_456_789
AGENT = "agent-7"


def samples() -> list[pb.Event]:
    """Deterministic events, one or more per body kind (seqs 1..N, ascending)."""
    full_proc = pb.Process(
        pid=4242, ppid=1, uid=1000, gid=1000, user="al\u00efce", name="sh", exe=b"/tmp/\xffevil",
        argv=[b"/tmp/\xffevil", b"-c", b"id; echo \"\\\"", b""], cwd=b"/home/\xc3\xa9t\xc3\xa9",
        start_time_ns=T - 5_000_000, session_id=77, exe_sha256="ab" * 32, argv_truncated=True,
        unavailable=["uid", "cwd"], tty_nr=34816, euid=0)
    events: list[pb.Event] = [
        pb.Event(seq=1, time_ns=T, agent_id=AGENT, severity_id=1, process=pb.ProcessActivity(
            activity_id=1, source="netlink", process=full_proc,
            parent_process=pb.Process(pid=1, name="systemd", exe=b"/usr/lib/systemd/systemd"))),
        pb.Event(seq=2, time_ns=T + 1, agent_id=AGENT, process=pb.ProcessActivity(
            activity_id=2, exit_code=-9, source="psutil", is_fork=True,
            process=pb.Process(pid=5, unavailable=["exit_code"]),
            parent_process=pb.Process())),
        pb.Event(seq=3, time_ns=T, agent_id=AGENT, process=pb.ProcessActivity()),
        pb.Event(seq=4, time_ns=1_700_000_000_000_000_000, agent_id=AGENT, file=pb.FileActivity(
            activity_id=5, path=b"/etc/a\x01", new_path=b"/etc/b\x7f", sha256="cd" * 32, size=3,
            mode=0o100644, uid=0, gid=5, owner="root", inode=2 ** 63 + 5, mtime_ns=-1,
            hash_skipped_size=True, unavailable=["size"], is_directory=True)),
        pb.Event(seq=5, time_ns=T, agent_id=AGENT, file=pb.FileActivity(activity_id=4,
                                                                        path=b"/")),
        pb.Event(seq=6, time_ns=T, agent_id=AGENT, severity_id=3, network=pb.NetworkActivity(
            activity_id=1, protocol="tcp", src_endpoint=pb.Endpoint(ip="198.18.0.1", port=40000),
            dst_endpoint=pb.Endpoint(ip="2001:db8::1", port=443), direction_id=2,
            state="SYN_SENT", first_seen_ns=T, last_seen_ns=T + 9, bytes_out=2 ** 64 - 1,
            bytes_in=1, packets_out=2, packets_in=3, community_id="1:x+/=", pid=10,
            exe=b"/usr/bin/curl\xfe", ip_version=6)),
        pb.Event(seq=7, time_ns=T, agent_id=AGENT, network=pb.NetworkActivity(
            src_endpoint=pb.Endpoint(), dst_endpoint=pb.Endpoint(port=53))),
        pb.Event(seq=8, time_ns=T, agent_id=AGENT, dns=pb.DnsActivity(
            activity_id=2, hostname="c2.\u00fcxample.test", qtype="AAAA", rcode="NXDOMAIN",
            transaction_id=7, answers=["198.18.0.9", "\u2603"],
            src_endpoint=pb.Endpoint(ip="198.18.0.2", port=53),
            dst_endpoint=pb.Endpoint(ip="198.18.0.1", port=5000), pid=99, community_id="1:d")),
        pb.Event(seq=9, time_ns=T, agent_id=AGENT, dns=pb.DnsActivity(activity_id=1)),
        pb.Event(seq=10, time_ns=T, agent_id=AGENT, sensor_loss=pb.SensorLoss(
            sensor="process", reason="ENOBUFS", lost=3, resynced=True)),
        pb.Event(seq=11, time_ns=T, agent_id=AGENT, lifecycle=pb.AgentLifecycle(
            kind=pb.AgentLifecycle.START, sensors={"process": "netlink", "file": "off"},
            hostname="h1", agent_version="1.2.3", prev_head="00" * 32, pid=3)),
        pb.Event(seq=14, time_ns=T, agent_id=AGENT, gap=pb.Gap(
            first_seq=12, last_seq=13, first_time_ns=T - 2, last_time_ns=T - 1,
            reason="spool full", dropped_by_kind={"process": 1, "dns": 1})),
        pb.Event(seq=15, time_ns=T, agent_id=AGENT, isolation=pb.IsolationActivity(
            transition=pb.IsolationActivity.APPLIED, backend="fake", ruleset="table inet x {}",
            policy_json='{"a":1}', ruleset_sha256="ef" * 32, connections_cut=4)),
        pb.Event(seq=16, time_ns=T, agent_id=AGENT, acquisition=pb.FileAcquisition(
            command_id="c1", path=b"/etc/\xfe", record_dsse=b"\x00\x01{}", sha256="01" * 32,
            size=9)),
        pb.Event(seq=17, time_ns=T, agent_id=AGENT, command=pb.CommandActivity(
            command_id="c2", action="isolate", outcome="accepted", command_seq=2)),
        pb.Event(seq=18, time_ns=T, agent_id=AGENT, triage=pb.TriageSnapshot(
            command_id="c3", section="processes", json='[{"pid":1}]')),
        pb.Event(seq=19, time_ns=T, agent_id=AGENT, response=pb.ResponseActivity(
            command_id="c4", action="kill", target="4242", outcome="succeeded",
            detail_json="{}")),
        pb.Event(seq=20, time_ns=0, agent_id=AGENT),
        pb.Event(seq=21, time_ns=-1_500_000_000, agent_id=""),
    ]
    return events
