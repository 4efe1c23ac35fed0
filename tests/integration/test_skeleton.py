"""The walking skeleton end to end: enroll, stream, store and query over real mutual TLS."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest

from agent.rpc import Endpoint, Refused, TransportError, enroll
from agent.state import AgentPaths, Enrollment
from evidence.chain import GENESIS_HASH, link
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from proto.limits import MAX_MESSAGE_BYTES
from server.pki import CertificateAuthority, cert_pem, new_tls_key, tls_key_pem
from tests.integration.fleet import (
    BIN,
    agent_cli,
    agent_config,
    cli,
    events_json,
    quiet_sensors,
    running_agent,
    running_fleet,
    wait_for,
)


def _stored(fleet, agent_id: str, kind: str = "") -> list[pb.Event]:
    return [pb.Event.FromString(r.data) for r in fleet.store.query_events(agent_id, kind=kind,
                                                                          limit=100_000)]


def test_agent_streams_process_events_over_mtls(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        config = agent_config(tmp_path / "agent", quiet_sensors(process="psutil"))
        marker = f"rf-marker-{uuid.uuid4().hex}"
        with running_agent(config) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            proc = subprocess.Popen(["sh", "-c", "sleep 3", marker])
            try:
                def seen() -> bool:
                    return any(marker.encode() in b" ".join(e.process.process.argv)
                               for e in _stored(fleet, enrollment.agent_id, "process"))
                wait_for(seen, what="the spawned process to be stored")
            finally:
                proc.kill()
                proc.wait()
            with fleet.admin() as admin:
                hosts = admin.list_hosts()
                assert [h.agent_id for h in hosts] == [enrollment.agent_id]
                assert hosts[0].online
                assert hosts[0].integrity_alerts == 0
                stored = list(admin.query_events(pb.QueryEventsRequest(
                    host=hosts[0].hostname, kind="lifecycle")))
        first = pb.Event.FromString(stored[0].event)
        assert first.lifecycle.kind == pb.AgentLifecycle.START
        assert first.seq == 1
        # The collector's recomputed head equals what the agent computed from the same bytes.
        events = sorted(fleet.store.query_events(enrollment.agent_id, limit=100_000),
                        key=lambda r: r.seq)
        head = GENESIS_HASH
        for row in events:
            head = link(head, row.data)
            assert row.chain_hash == head
        assert fleet.store.alerts(enrollment.agent_id) == []
        # Checkpoints arrived and were verified against the enrolled identity key.
        assert fleet.store.checkpoints(enrollment.agent_id)


def test_restart_continues_the_chain_without_fork(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        config = agent_config(tmp_path / "agent")
        for _ in range(3):
            with running_agent(config) as agent:
                wait_for(agent.session.connected.is_set, what="session")
            # stop() waits until everything is acknowledged
        rows = list(fleet.store.query_events(enrollment.agent_id, limit=1000))
        seqs = [r.seq for r in rows]
        assert seqs == list(range(1, len(seqs) + 1))
        starts = [pb.Event.FromString(r.data) for r in rows if r.kind == "lifecycle"]
        kinds = [e.lifecycle.kind for e in starts]
        assert kinds.count(pb.AgentLifecycle.START) == 3
        assert kinds.count(pb.AgentLifecycle.STOP) == 3
        # Each START names the head the agent resumed from, which is the stored head before it.
        by_seq = {r.seq: r for r in rows}
        for e in starts:
            if e.lifecycle.kind == pb.AgentLifecycle.START and e.seq > 1:
                assert e.lifecycle.prev_head == by_seq[e.seq - 1].chain_hash.hex()
        assert fleet.store.alerts(enrollment.agent_id) == []


def test_enrollment_refuses_bad_tokens(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        ca = fleet.paths.ca_cert.read_bytes()
        used = fleet.token(uses=1)
        fleet.enroll(tmp_path / "a1", used)
        expired = fleet.token(ttl_s=0)
        for i, token in enumerate([used, expired, "rft_not-a-token"]):
            with pytest.raises(Refused) as info:
                fleet.enroll(tmp_path / f"bad{i}", token)
            assert info.value.code == "PERMISSION_DENIED"
            assert "token" in info.value.message
            assert not (tmp_path / f"bad{i}" / "enrollment.json").exists()
        assert len(fleet.store.list_agents()) == 1
        # A server certificate from another CA is not trusted by the agent.
        other_ca = CertificateAuthority.create("someone else")
        with pytest.raises(TransportError) as info2:
            enroll(Endpoint(fleet.enroll_target, "localhost"), cert_pem(other_ca.cert),
                   pb.EnrollRequest(token=fleet.token()))
        assert info2.value.code == "UNAVAILABLE"
        del ca


def _session_stub(fleet, key_pem: bytes, cert: bytes) -> pb_grpc.CollectorStub:
    creds = grpc.ssl_channel_credentials(root_certificates=fleet.paths.ca_cert.read_bytes(),
                                         private_key=key_pem, certificate_chain=cert)
    channel = grpc.secure_channel(fleet.collector_target, creds,
                                  options=[("grpc.ssl_target_name_override", "localhost"),
                                           ("grpc.max_send_message_length", 64 << 20)])
    return pb_grpc.CollectorStub(channel)


def _agent_stub(fleet, state_dir: Path) -> tuple[pb_grpc.CollectorStub, Enrollment]:
    paths = AgentPaths(state_dir)
    enrollment = Enrollment.load(paths)
    return (_session_stub(fleet, paths.tls_key.read_bytes(), paths.certificate.read_bytes()),
            enrollment)


def _stream(stub: pb_grpc.CollectorStub, *messages: pb.AgentMessage,
            read: int = 1) -> tuple[list[pb.ServerMessage], grpc.RpcError | None]:
    responses: list[pb.ServerMessage] = []
    call = stub.Session(iter(messages), timeout=10)
    try:
        for message in call:
            responses.append(message)
            if len(responses) >= read:
                break
    except grpc.RpcError as e:
        return responses, e
    return responses, None


def _event(agent_id: str, seq: int, marker: str = "") -> bytes:
    return pb.Event(seq=seq, time_ns=time.time_ns(), agent_id=agent_id,
                    lifecycle=pb.AgentLifecycle(kind=pb.AgentLifecycle.SENSOR_STATUS,
                                                message=marker)).SerializeToString()


def test_collector_refuses_impostors_and_bad_input(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        fleet.enroll(tmp_path / "a")
        fleet.enroll(tmp_path / "b", fleet.token())
        stub, me = _agent_stub(fleet, tmp_path / "a")
        other = Enrollment.load(AgentPaths(tmp_path / "b"))
        hello = pb.AgentMessage(hello=pb.Hello(agent_id=me.agent_id))

        # A Hello claiming another agent's id.
        _, error = _stream(stub, pb.AgentMessage(hello=pb.Hello(agent_id=other.agent_id)))
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED

        # Events claiming another agent's id: refused, nothing stored.
        batch = pb.AgentMessage(batch=pb.EventBatch(events=[_event(other.agent_id, 1)]))
        _, error = _stream(stub, hello, batch, read=2)
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert fleet.store.chain_state(other.agent_id).last_seq == 0
        assert fleet.store.chain_state(me.agent_id).last_seq == 0

        # A good batch, then a malformed one: the good one stays, the bad one changes nothing.
        good = pb.AgentMessage(batch=pb.EventBatch(events=[_event(me.agent_id, 1, "one")]))
        responses, error = _stream(stub, hello, good, read=2)
        assert error is None and responses[-1].ack.durable_seq == 1
        bad = pb.AgentMessage(batch=pb.EventBatch(events=[b"\xff\x00garbage"]))
        _, error = _stream(stub, hello, bad, read=2)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in (error.details() or "")
        stored = fleet.store.stored_event(me.agent_id, 1)
        assert stored is not None and pb.Event.FromString(stored.data).lifecycle.message == "one"

        # Oversized message: refused by the transport limit.
        huge = pb.AgentMessage(batch=pb.EventBatch(events=[b"x" * (MAX_MESSAGE_BYTES + 1)]))
        _, error = _stream(stub, hello, huge, read=2)
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Exact duplicate ignored; same seq with different bytes is a fork, kept and alerted.
        _, error = _stream(stub, hello, good, read=2)
        assert error is None
        fork = pb.AgentMessage(batch=pb.EventBatch(events=[_event(me.agent_id, 1, "other")]))
        _, error = _stream(stub, hello, fork, read=2)
        assert error is None
        alerts = fleet.store.alerts(me.agent_id)
        assert [a.kind for a in alerts] == ["fork"]
        assert len(fleet.store.forks(me.agent_id)) == 1
        assert pb.Event.FromString(fleet.store.stored_event(me.agent_id, 1).data
                                   ).lifecycle.message == "one"

        # An unexplained jump in seq is recorded as a gap alert, visible to responders.
        jump = pb.AgentMessage(batch=pb.EventBatch(events=[_event(me.agent_id, 5, "five")]))
        _, error = _stream(stub, hello, jump, read=2)
        assert error is None
        with fleet.admin() as admin:
            host = [h for h in admin.list_hosts() if h.agent_id == me.agent_id][0]
            assert host.integrity_alerts == 2
            kinds = sorted(a.kind for a in admin.integrity(me.agent_id))
        assert kinds == ["fork", "gap"]


def test_certificates_from_another_ca_or_none_are_refused(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        fleet.enroll(tmp_path / "a")
        me = Enrollment.load(AgentPaths(tmp_path / "a"))
        rogue_ca = CertificateAuthority.create("rogue")
        key = new_tls_key()
        rogue_cert = rogue_ca.issue_client(f"ringfence://agent/{me.agent_id}", key.public_key())
        stub = _session_stub(fleet, tls_key_pem(key), cert_pem(rogue_cert))
        _, error = _stream(stub, pb.AgentMessage(hello=pb.Hello(agent_id=me.agent_id)))
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        # No client certificate at all.
        creds = grpc.ssl_channel_credentials(root_certificates=fleet.paths.ca_cert.read_bytes())
        channel = grpc.secure_channel(fleet.collector_target, creds,
                                      options=[("grpc.ssl_target_name_override", "localhost")])
        _, error = _stream(pb_grpc.CollectorStub(channel),
                           pb.AgentMessage(hello=pb.Hello(agent_id=me.agent_id)))
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate from the right CA for a responder cannot open an agent session.
        responder = fleet.paths.responder_identity("admin").read_bytes()
        from server.pki import Identity
        ident = Identity.from_pem(responder)
        _, error = _stream(_session_stub(fleet, ident.key_pem, ident.cert_pem),
                           pb.AgentMessage(hello=pb.Hello(agent_id="admin")))
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_console_scripts_end_to_end(tmp_path: Path) -> None:
    """`ringfence` and `ringfence-agent` as subprocesses: a spawned process shows up in
    `ringfence events --json`."""
    data = tmp_path / "server"
    state = tmp_path / "agent"
    cli("server", "init", "--data-dir", str(data), "--address", "localhost",
        "--address", "127.0.0.1")
    for name in ("ca.key", "server.key", "signing.key"):
        assert (data / "pki" / name).stat().st_mode & 0o077 == 0
    server = subprocess.Popen(
        [str(BIN / "ringfence"), "server", "run", "--data-dir", str(data), "--listen",
         "127.0.0.1:0", "--admin", "127.0.0.1:0", "--enroll", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        run_file = data / "run" / "server.json"
        wait_for(run_file.exists, what="server to start")
        ports = json.loads(run_file.read_text())
        token = cli("token", "create", "--data-dir", str(data), "--uses", "1",
                    "--ttl", "10m").stdout.strip()
        agent_cli("enroll", "--server", f"127.0.0.1:{ports['enroll_port']}", "--token", token,
                  "--ca", str(data / "pki" / "ca.pem"), "--tls-name", "localhost",
                  "--state-dir", str(state))
        assert (state / "identity.key").stat().st_mode & 0o077 == 0
        # Reusing the single-use token fails with a clear message and a non-zero exit.
        reuse = agent_cli("enroll", "--server", f"127.0.0.1:{ports['enroll_port']}", "--token",
                          token, "--ca", str(data / "pki" / "ca.pem"), "--tls-name",
                          "localhost", "--state-dir", str(tmp_path / "again"), check=False)
        assert reuse.returncode == 1 and "token" in reuse.stderr
        config = tmp_path / "agent.toml"
        config.write_text('[sensors.process]\nmode = "auto"\n[sensors.file]\nenabled = false\n'
                          '[sensors.network]\nenabled = false\n[isolation]\nbackend = "fake"\n')
        agent = subprocess.Popen([str(BIN / "ringfence-agent"), "run", "--state-dir", str(state),
                                  "--config", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        agent_id = json.loads((state / "enrollment.json").read_text())["agent_id"]
        wait_for(lambda: json.loads(cli("hosts", "--data-dir", str(data), "--json").stdout
                                    )[0]["online"], what="agent online")
        marker = f"rf-e2e-{uuid.uuid4().hex[:12]}"
        subprocess.run(["sh", "-c", f"sleep 0.3; echo {marker} >/dev/null", marker], check=True)

        def spawned() -> bool:
            return any(marker in json.dumps(e) for e in events_json(data, agent_id, "--kind",
                                                                    "process", "--limit",
                                                                    "100000"))
        wait_for(spawned, timeout=30, interval=0.5, what="the spawned process in events --json")
        hosts = json.loads(cli("hosts", "--data-dir", str(data), "--json").stdout)
        assert hosts[0]["agent_id"] == agent_id and hosts[0]["integrity_alerts"] == 0
        bad = cli("events", "no-such-host", "--data-dir", str(data), check=False)
        assert bad.returncode == 1 and "no host named" in bad.stderr
    finally:
        for proc in (agent, server):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert server.returncode == 0, server.stderr.read() if server.stderr else ""
