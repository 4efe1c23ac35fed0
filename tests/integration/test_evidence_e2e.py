"""Signed, hash-chained evidence end to end through the `ringfence` CLI: a real server and a
real agent over mutual TLS; file collection and triage; a bundle created on the server and
verified offline (server stopped) against exported pinned keys; the CLI-level tamper matrix;
forks, bad checkpoint signatures and the spool-full gap event."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.chain import ChainConfig, EvidenceChain
from agent.spool import Spool, SpoolConfig
from agent.state import AgentPaths
from evidence.acquisition import verify_acquisition
from evidence.chain import link
from evidence.checkpoint import Checkpoint, sign_checkpoint, verify_checkpoint
from evidence.keys import load_private_key, load_public_key, private_key_from_seed
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from tests.integration.fleet import (
    agent_config,
    cli,
    running_agent,
    running_fleet,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "evidence"))
from evidence_testkit import (
    frames_bytes,
    parse_frames,
    read_members,
    replace,
    write_members,
)
from evidence_testkit import (
    resign as _resign_manifest,
)

CAP_BYTES = 64 << 10
CASE = "IR-2024-017"
REASON = "suspected web shell on web-01"
# Small enough that a few hundred telemetry events fill it, big enough for triage and files.
SPOOL = SpoolConfig(max_bytes=1 << 20, segment_bytes=64 << 10, fsync_interval_s=0.05,
                    priority_reserve_bytes=512 << 10)


@dataclasses.dataclass
class World:
    tmp: Path
    data_dir: Path
    agent_id: str
    agent_key_pem: Path
    server_key_pem: Path
    server_signing_key: Path           # the real server's private key: a compromised server
    collect_report: dict[str, Any]
    collected: dict[str, bytes]        # sha256 -> content as stored in the blob store
    file_envelopes: dict[str, bytes]   # sha256 -> agent-signed acquisition record
    triage: dict[str, list[dict[str, Any]]]
    bundle: Path
    windowed: Path
    gap: tuple[int, int]
    alerts_kinds: list[str]
    custody: list[dict[str, Any]]


def _fill_spool_until_loss(state_dir: Path, agent_id: str) -> tuple[int, int]:
    """Run the agent's own chain over its real spool, offline, until telemetry is dropped;
    return the dropped range the gap event must name."""
    paths = AgentPaths(state_dir)
    key = load_private_key(paths.identity_key)
    with Spool(paths.spool, SPOOL) as spool:
        chain = EvidenceChain(agent_id, key, spool, ChainConfig(checkpoint_every=50))
        dropped_at: list[int] = []
        for i in range(5000):  # bounded: 1 MiB fills after ~130 events of 4 KiB
            before = chain.seq
            if chain.record(pb.Event(process=pb.ProcessActivity(activity_id=1, process=pb.Process(
                    pid=100_000 + i, name="filler", argv=[b"filler", os.urandom(2000).hex()
                                                          .encode()])))) == 0:
                dropped_at.append(before + 1)
            if len(dropped_at) >= 3:
                break
        assert len(dropped_at) == 3, "the spool never filled"
        # A priority event: the gap record is written first, then this event.
        chain.record(pb.Event(lifecycle=pb.AgentLifecycle(
            kind=pb.AgentLifecycle.SENSOR_STATUS, message="telemetry resumed after loss")))
        chain.checkpoint(force=True)
    return dropped_at[0], dropped_at[-1]


def _stored_triage(store: Any, agent_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in store.query_events(agent_id, kind="triage", limit=10_000):
        event = pb.Event.FromString(row.data)
        out[event.triage.section] = json.loads(event.triage.json)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("evidence-e2e")
    files = tmp / "victim"
    files.mkdir()
    (files / "webshell.php").write_bytes(b"<?php system($_GET['c']); ?>\n" * 40)
    (files / "huge.bin").write_bytes(os.urandom(CAP_BYTES + 1))
    (files / "subdir").mkdir()
    os.mkfifo(files / "pipe")
    (files / "link").symlink_to(files / "webshell.php")
    paths = [str(files / "webshell.php"), str(files / "missing.txt"), str(files / "huge.bin"),
             str(files / "subdir"), "/dev/null", str(files / "pipe"), str(files / "link")]

    with running_fleet(tmp) as fleet:
        data = str(fleet.data_dir)
        state = tmp / "agent"
        enrollment = fleet.enroll(state)
        agent_id = enrollment.agent_id
        gap = _fill_spool_until_loss(state, agent_id)
        config = dataclasses.replace(agent_config(state, checkpoint_interval_s=0.3),
                                     spool=SPOOL, max_file_bytes=CAP_BYTES)
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        try:
            with running_agent(config) as agent:
                wait_for(agent.session.connected.is_set, what="session")
                wait_for(lambda: fleet.store.chain_state(agent_id).last_seq >= gap[1] + 2,
                         timeout=30, what="the pre-filled spool to be delivered")
                out = cli("collect", agent_id, *paths, "--wait", "--json", "--reason",
                          "grab the web shell", "--data-dir", data, "--timeout", "60").stdout
                collect_report = json.loads(out)
                cli("triage", agent_id, "--wait", "--data-dir", data, "--timeout", "60")
                triage = _stored_triage(fleet.store, agent_id)
                # Everything recorded so far gets covered by a checkpoint the agent signs.
                last = fleet.store.chain_state(agent_id).last_seq
                wait_for(lambda: any(c.seq >= last for c in fleet.store.checkpoints(agent_id)),
                         timeout=15, what="a checkpoint covering the triage events")
                bundle = tmp / "case.zip"
                cli("bundle", "create", enrollment.agent_id, "--case", CASE, "--with-files",
                    "--reason", REASON, "-o", str(bundle), "--data-dir", data)
                windowed = tmp / "window.zip"
                cli("bundle", "create", agent_id, "--case", CASE, "--since", "10m",
                    "--until", str(time.time() + 60), "-o", str(windowed), "--data-dir", data)
        finally:
            client.close()
            listener.close()
        collected = {r.sha256: (fleet.paths.blobs / "files" / r.sha256).read_bytes()
                     for r in fleet.store.files_for(agent_id)}
        envelopes = {r.sha256: r.record_envelope for r in fleet.store.files_for(agent_id)}
        alerts_kinds = [a.kind for a in fleet.store.alerts(agent_id)]
    # The server is stopped from here on: verification is offline.
    agent_key_pem = tmp / "agent.pub.pem"
    agent_key_pem.write_text(cli("agent", "key", agent_id, "--data-dir", data).stdout)
    server_key_pem = tmp / "server.pub.pem"
    shutil.copy(fleet.paths.signing_public, server_key_pem)
    custody = [json.loads(line) for line in dict(read_members(bundle.read_bytes()))[
        "custody.jsonl"].splitlines()]
    yield World(tmp, fleet.data_dir, agent_id, agent_key_pem, server_key_pem,
                fleet.paths.signing_key, collect_report,
                collected, envelopes, triage, bundle, windowed, gap,
                alerts_kinds, custody)


def verify_cli(world: World, bundle: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = cli("bundle", "verify", str(bundle), "--trust", str(world.server_key_pem),
                 "--trust-agent", str(world.agent_key_pem), "--json", *extra, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


# ------------------------------------------------------------------------------ collection

def test_collect_stores_the_file_and_reports_every_path(world: World) -> None:
    report = world.collect_report
    assert report["status"] == "succeeded"
    by_path = {Path(f["path"]).name: f for f in report["detail"]["files"]}
    assert len(by_path) == 7, by_path
    good = by_path["webshell.php"]
    content = (world.tmp / "victim" / "webshell.php").read_bytes()
    assert good["ok"] and good["sha256"] == hashlib.sha256(content).hexdigest()
    assert good["size"] == len(content)
    # Stored by SHA-256 in the blob store, with the agent-signed acquisition record.
    assert world.collected == {good["sha256"]: content}
    record = verify_acquisition(world.file_envelopes[good["sha256"]],
                                load_public_key(world.agent_key_pem), world.agent_id)
    assert record.path == str(world.tmp / "victim" / "webshell.php").encode()
    assert record.size == len(content)
    reasons = {name: f["error"] for name, f in by_path.items() if not f["ok"]}
    assert reasons == {
        "missing.txt": "no such file",
        "huge.bin": f"is {CAP_BYTES + 1} bytes, over the {CAP_BYTES}-byte collection cap",
        "subdir": "is a directory; name the files inside it",
        "null": "is not a regular file (device, socket, FIFO or other special file)",
        "pipe": "is not a regular file (device, socket, FIFO or other special file)",
        "link": "is a symbolic link; collect its target path instead",
    }
    assert "collected 1 of 7 files" in report["message"]
    # No acquisition arrived without its agent-signed record or with a bad one.
    assert not {"acquisition_mismatch", "bad_signature"} & set(world.alerts_kinds)


def test_triage_records_every_section(world: World) -> None:
    t = world.triage
    assert set(t) == {"processes", "connections", "listening", "users", "modules"}
    me = [p for p in t["processes"] if p["pid"] == os.getpid()]
    assert me and me[0]["user"] == "root" and "pytest" in me[0]["cmdline"]
    assert all({"pid", "ppid", "user", "cmdline", "exe"} <= p.keys() for p in t["processes"])
    # The test process held a listening socket and a connection to it during the snapshot.
    assert any(c["pid"] == os.getpid() for c in t["listening"])
    assert any(c["pid"] == os.getpid() and c["remote"] for c in t["connections"])
    assert isinstance(t["users"], list) and isinstance(t["modules"], list)


# ------------------------------------------------------------------------------ bundles

def test_bundle_verifies_offline_with_a_per_member_report(world: World) -> None:
    code, out = verify_cli(world, world.bundle)
    assert code == 0, out
    assert out["ok"] and out["case_id"] == CASE and out["files"] == 1
    members = {r["member"] for r in out["report"]}
    assert {"manifest.dsse.json", "manifest.json", "events.bin", "events.jsonl",
            "custody.jsonl"} <= members
    assert any(m.startswith("checkpoints/") for m in members)
    assert any(m.startswith("files/") for m in members)
    assert all(r["ok"] for r in out["report"])
    # The human-readable form names each member too, and exits 0.
    text = cli("bundle", "verify", str(world.bundle), "--trust", str(world.server_key_pem),
               "--trust-agent", str(world.agent_key_pem)).stdout
    assert "ok    events.bin:" in text and f"(case {CASE}) verified" in text
    code, out = verify_cli(world, world.windowed)
    assert code == 0 and out["files"] == 0, out


def test_bundle_without_pinned_keys_is_refused(world: World) -> None:
    result = cli("bundle", "verify", str(world.bundle), "--trust", str(world.server_key_pem),
                 check=False)
    assert result.returncode == 1 and "--trust-agent" in result.stderr
    # Pinning the server key as the agent key does not make the agent's signatures valid.
    result = cli("bundle", "verify", str(world.bundle), "--trust", str(world.server_key_pem),
                 "--trust-agent", str(world.server_key_pem), "--json", check=False)
    assert result.returncode == 1
    fails = [r for r in json.loads(result.stdout)["report"] if not r["ok"]]
    assert any(r["member"] == "manifest.json" and "not pinned" in r["reason"] for r in fails)


def test_custody_names_case_actor_reason_and_each_transfer(world: World) -> None:
    created = [c for c in world.custody if c["action"] == "bundle.create"]
    assert len(created) == 1
    assert created[0]["case_id"] == CASE and created[0]["actor"] == "admin"
    assert created[0]["reason"] == REASON
    files = [c for c in world.custody if c["action"] == "file.transfer"]
    assert [c["sha256"] for c in files] == list(world.collected)
    assert all(c["from"] == f"agent {world.agent_id}" and c["to"] == "server blob store"
               and c["path"].endswith("webshell.php") for c in files)
    delivered = [c for c in world.custody if c["action"] == "bundle.transfer"]
    assert len(delivered) == 1 and delivered[0]["to"] == "admin"


def test_spool_full_gap_is_signed_into_the_chain_and_the_bundle(world: World) -> None:
    first, last = world.gap
    assert "recorded_loss" in world.alerts_kinds
    assert not {"gap", "fork", "checkpoint_mismatch"} & set(world.alerts_kinds)
    members = dict(read_members(world.bundle.read_bytes()))
    frames = parse_frames(members["events.bin"])
    seqs = [seq for seq, _ in frames]
    assert first - 1 in seqs and last + 1 in seqs and first not in seqs
    gap_event = pb.Event.FromString(dict(frames)[last + 1])
    assert (gap_event.gap.first_seq, gap_event.gap.last_seq) == (first, last)
    assert gap_event.gap.reason == "spool full"
    # The explained jump verifies (the honest bundle passes), and the gap shows in the report.
    code, out = verify_cli(world, world.bundle)
    assert code == 0 and out["ok"], out
    rendered = [json.loads(line) for line in members["events.jsonl"].decode().splitlines()]
    assert any(r["kind"] == "gap" and r["seq"] == last + 1 for r in rendered)


# ------------------------------------------------------------------------------ tamper matrix

def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def _tampered(world: World) -> list[tuple[str, bytes, str, str]]:
    """(case, bundle bytes, member that must be named, reason fragment)."""
    members = read_members(world.bundle.read_bytes())
    by_name = dict(members)
    frames = parse_frames(by_name["events.bin"])
    cases: list[tuple[str, bytes, str, str]] = []
    for name, data in members:
        reason = {"manifest.json": "edited", "manifest.dsse.json": ""}.get(name, "")
        cases.append((f"flip {name}", write_members(replace(members, name, _flip(data))), name,
                      reason))
    # The rest is what a compromised server could do: it re-signs the manifest with its real
    # key, so only the agent's signatures can catch it.
    server_key = load_private_key(world.server_signing_key)

    def resign(changed: list[tuple[str, bytes]], key: Any = None) -> list[tuple[str, bytes]]:
        return _resign_manifest(changed, key=key or server_key)

    mid = len(frames) // 2
    deleted = frames[:mid] + frames[mid + 1:]
    cases.append(("event deleted", write_members(resign(replace(
        members, "events.bin", frames_bytes(deleted)))), "events.bin", "chain break"))
    swapped = frames[:mid] + [frames[mid + 1], frames[mid]] + frames[mid + 2:]
    cases.append(("events swapped", write_members(resign(replace(
        members, "events.bin", frames_bytes(swapped)))), "events.bin", "chain break"))
    cases.append(("tail truncated", write_members(resign(replace(
        members, "events.bin", by_name["events.bin"][:-7]))), "events.bin", "truncated frame"))
    seq = frames[mid][0]
    foreign = pb.Event(seq=seq + 1, time_ns=time.time_ns(), agent_id="another-host-agent",
                       lifecycle=pb.AgentLifecycle(kind=pb.AgentLifecycle.START)
                       ).SerializeToString()
    inserted = frames[:mid + 1] + [(seq + 1, foreign)] + frames[mid + 1:]
    cases.append(("foreign event inserted", write_members(resign(replace(
        members, "events.bin", frames_bytes(inserted)))), "events.bin", "another-host-agent"))
    cp_name = next(n for n, _ in members if n.startswith("checkpoints/"))
    cp_seq = int(cp_name.split("/")[1].split(".")[0])
    honest = verify_checkpoint(by_name[cp_name], load_public_key(world.agent_key_pem),
                               world.agent_id)
    forged = sign_checkpoint(Checkpoint(world.agent_id, cp_seq, honest.head, honest.time_ns),
                             private_key_from_seed(b"\x07" * 32))
    cases.append(("checkpoint by another key", write_members(resign(replace(
        members, cp_name, forged))), cp_name, "untrusted key"))
    manifest = json.loads(by_name["manifest.json"])
    manifest["case_id"] = "IR-other"
    edited = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    cases.append(("manifest edited", write_members(replace(members, "manifest.json", edited)),
                  "manifest.json", "edited"))
    cases.append(("manifest re-signed by an unpinned key", write_members(resign(
        members, key=private_key_from_seed(b"\x08" * 32))), "manifest.dsse.json", "key"))
    cases.append(("server signature removed", write_members(
        [(n, d) for n, d in members if n != "manifest.dsse.json"]), "manifest.dsse.json",
        "missing"))
    file_name = next(n for n, _ in members if n.startswith("files/")
                     and not n.endswith(".dsse.json"))
    cases.append(("collected file replaced", write_members(resign(replace(
        members, file_name, b"<?php echo 'harmless'; ?>\n"))), file_name, "does not match"))
    return cases


def test_cli_tamper_matrix(world: World) -> None:
    cases = _tampered(world)
    assert len({c[0] for c in cases}) == len(cases)
    missed = []
    for case, data, member, reason in cases:
        path = world.tmp / "tampered.zip"
        path.write_bytes(data)
        code, out = verify_cli(world, path)
        fails = [(r["member"], r["reason"]) for r in out.get("report", []) if not r["ok"]]
        if code != 1 or out["ok"] or not any(m == member and reason in r for m, r in fails):
            missed.append((case, code, fails))
    assert not missed, missed


# ------------------------------------------------------------------------------ ingest alerts

def _session_stub(fleet: Any, state_dir: Path) -> pb_grpc.CollectorStub:
    paths = AgentPaths(state_dir)
    creds = grpc.ssl_channel_credentials(root_certificates=fleet.paths.ca_cert.read_bytes(),
                                         private_key=paths.tls_key.read_bytes(),
                                         certificate_chain=paths.certificate.read_bytes())
    channel = grpc.secure_channel(fleet.collector_target, creds,
                                  options=[("grpc.ssl_target_name_override", "localhost")])
    return pb_grpc.CollectorStub(channel)


def _send(stub: pb_grpc.CollectorStub, agent_id: str, batch: pb.EventBatch) -> pb.ServerMessage:
    messages = iter([pb.AgentMessage(hello=pb.Hello(agent_id=agent_id)),
                     pb.AgentMessage(batch=batch)])
    call = stub.Session(messages, timeout=10)
    acks = 0
    for message in call:
        acks += message.HasField("ack")
        if acks == 2:  # the first answers the Hello, the second the batch
            call.cancel()
            return message
    raise AssertionError("no ack for the batch")


def test_fork_and_bad_checkpoint_signature_raise_alerts(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        data = str(fleet.data_dir)
        state = tmp_path / "agent"
        agent_id = fleet.enroll(state).agent_id
        # A VM snapshot restored later: the same identity replays seqs with different bytes.
        snapshot = tmp_path / "snapshot"
        shutil.copytree(state, snapshot)
        with running_agent(agent_config(state)) as agent:
            wait_for(agent.session.connected.is_set, what="session")
        original = fleet.store.stored_event(agent_id, 1)
        assert original is not None
        with running_agent(agent_config(snapshot)) as agent:
            wait_for(lambda: fleet.store.alerts(agent_id), what="the fork alert")
        alerts = json.loads(cli("integrity", agent_id, "--json", "--data-dir", data).stdout)
        forks = [a for a in alerts if a["kind"] == "fork"]
        assert forks and forks[0]["seq"] == 1 and "both versions are kept" in forks[0]["detail"]
        # Both versions are kept: the first stays authoritative, the second is stored aside.
        assert fleet.store.stored_event(agent_id, 1).data == original.data
        assert any(f.seq == 1 and f.data != original.data for f in fleet.store.forks(agent_id))

        # A checkpoint signed by a key that is not the agent's, over a real session.
        state_seq = fleet.store.chain_state(agent_id)
        event = pb.Event(seq=state_seq.last_seq + 1, time_ns=time.time_ns(), agent_id=agent_id,
                         lifecycle=pb.AgentLifecycle(kind=pb.AgentLifecycle.SENSOR_STATUS,
                                                     message="after the restore")
                         ).SerializeToString()
        forged = sign_checkpoint(Checkpoint(agent_id, state_seq.last_seq + 1,
                                            link(state_seq.head, event), time.time_ns()),
                                 private_key_from_seed(b"\x09" * 32))
        ack = _send(_session_stub(fleet, state), agent_id,
                    pb.EventBatch(events=[event], checkpoints=[forged]))
        assert ack.ack.durable_seq == state_seq.last_seq + 1
        alerts = json.loads(cli("integrity", agent_id, "--json", "--data-dir", data).stdout)
        bad = [a for a in alerts if a["kind"] == "bad_signature"]
        assert bad and "checkpoint" in bad[0]["detail"], alerts
        hosts = json.loads(cli("hosts", "--json", "--data-dir", data).stdout)
        host = next(h for h in hosts if h["agent_id"] == agent_id)
        assert host["integrity_alerts"] == len(alerts) >= 2
        table = cli("hosts", "--data-dir", data).stdout
        assert str(len(alerts)) in table.splitlines()[1].split()[-1]
