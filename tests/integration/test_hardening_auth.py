"""Hardening, authorization half: token and agent revocation, the mTLS refusal matrix, the
RBAC matrix over every admin RPC, and tamper detection of the audit log (`audit verify`)."""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.rpc import Refused
from agent.state import AgentPaths
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from server.admin import REQUIRED_ROLE, ROLES
from server.fleet import create_responder
from server.pki import CertificateAuthority, Identity, cert_pem, new_tls_key, tls_key_pem
from tests.integration.fleet import Fleet, agent_config, cli, running_agent, running_fleet, wait_for


def _stream(stub: pb_grpc.CollectorStub, *messages: pb.AgentMessage,
            read: int = 1) -> tuple[list[pb.ServerMessage], grpc.RpcError | None]:
    responses: list[pb.ServerMessage] = []
    try:
        for message in stub.Session(iter(messages), timeout=10):
            responses.append(message)
            if len(responses) >= read:
                break
    except grpc.RpcError as e:
        return responses, e
    return responses, None


def _stub(fleet: Fleet, key_pem: bytes, cert: bytes) -> pb_grpc.CollectorStub:
    creds = grpc.ssl_channel_credentials(root_certificates=fleet.paths.ca_cert.read_bytes(),
                                         private_key=key_pem, certificate_chain=cert)
    channel = grpc.secure_channel(fleet.collector_target, creds,
                                  options=[("grpc.ssl_target_name_override", "localhost")])
    return pb_grpc.CollectorStub(channel)


def test_token_revocation_by_id_and_by_token(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        data = str(fleet.data_dir)
        created = cli("token", "create", "--data-dir", data, "--uses", "5")
        token = created.stdout.strip()
        assert token.startswith("rft_") and "\n" not in token
        token_id = created.stderr.split("token id ", 1)[1].split()[0]
        assert token_id not in token  # the id reveals nothing of the token
        revoked = cli("token", "revoke", token_id[:8], "--data-dir", data)
        assert f"token {token_id} revoked" in revoked.stdout
        with pytest.raises(Refused) as info:
            fleet.enroll(tmp_path / "a", token)
        assert info.value.code == "PERMISSION_DENIED"
        # By the token itself.
        second = cli("token", "create", "--data-dir", data).stdout.strip()
        cli("token", "revoke", second, "--data-dir", data)
        with pytest.raises(Refused):
            fleet.enroll(tmp_path / "b", second)
        # Unknown ids fail loudly and revoke nothing.
        bad = cli("token", "revoke", "00000000", "--data-dir", data, check=False)
        assert bad.returncode == 1 and "nothing was revoked" in bad.stderr
        bad = cli("token", "revoke", "xyz", "--data-dir", data, check=False)
        assert bad.returncode == 1 and "hex" in bad.stderr
        assert fleet.store.list_agents() == []


def test_agent_revoke_closes_live_session_and_refuses_reconnect(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        with running_agent(agent_config(tmp_path / "agent")) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            out = cli("agent", "revoke", enrollment.agent_id, "--reason", "host decommissioned",
                      "--data-dir", str(fleet.data_dir))
            assert "live session was closed" in out.stdout
            # The live stream ends with PERMISSION_DENIED and the agent is refused from then on.
            wait_for(lambda: "revoked" in agent.session.refused_reason, what="refusal")
            wait_for(lambda: not agent.session.connected.is_set(), what="disconnect")
            assert fleet.server.store.get_agent(enrollment.agent_id).revoked
        stub = _stub(fleet, AgentPaths(tmp_path / "agent").tls_key.read_bytes(),
                     AgentPaths(tmp_path / "agent").certificate.read_bytes())
        _, error = _stream(stub, pb.AgentMessage(hello=pb.Hello(agent_id=enrollment.agent_id)))
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "re-enroll" in (error.details() or "")
        rows = [r for r in fleet.store.audit_rows() if r.action == "revoke_agent"]
        assert [(r.actor, r.target, r.outcome) for r in rows] == [
            ("admin", enrollment.agent_id, "allowed: revoked, live session closed")]
        # Without a reason nothing happens.
        bad = cli("agent", "revoke", enrollment.agent_id, "--reason", " ", "--data-dir",
                  str(fleet.data_dir), check=False)
        assert bad.returncode == 1 and "reason" in bad.stderr


def test_expired_client_certificate_is_refused(tmp_path: Path) -> None:
    """mTLS matrix rows not covered by test_skeleton: expired (right CA, right agent id)."""
    with running_fleet(tmp_path) as fleet:
        enrollment = fleet.enroll(tmp_path / "a")
        ca = CertificateAuthority.load(fleet.paths)
        key = new_tls_key()
        now = datetime.datetime.now(datetime.UTC)
        uri = f"ringfence://agent/{enrollment.agent_id}"
        # Same shape as an enrolled agent certificate, but its validity ended yesterday.
        expired = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                               enrollment.agent_id)]))
                   .issuer_name(ca.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=2))
                   .not_valid_after(now - datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.UniformResourceIdentifier(uri)]), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  False)
                   .sign(ca.key, hashes.SHA256()))
        hello = pb.AgentMessage(hello=pb.Hello(agent_id=enrollment.agent_id))
        _, error = _stream(_stub(fleet, tls_key_pem(key), cert_pem(expired)), hello)
        # Refused in the TLS handshake: the client sees the transport fail.
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        # Control: a fresh certificate for the same key and id from the same CA is accepted at
        # the TLS layer and then refused by the fingerprint check (not the enrolled cert).
        fresh = ca.issue_client(f"ringfence://agent/{enrollment.agent_id}", key.public_key())
        _, error = _stream(_stub(fleet, tls_key_pem(key), cert_pem(fresh)), hello)
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
        # And the enrolled certificate works.
        paths = AgentPaths(tmp_path / "a")
        responses, error = _stream(_stub(fleet, paths.tls_key.read_bytes(),
                                         paths.certificate.read_bytes()), hello)
        assert error is None and responses[0].ack.durable_seq == 0


# -- RBAC matrix ------------------------------------------------------------------------------

Call = Callable[[pb_grpc.AdminStub, str], object]

# One representative request per admin action; `host` is an enrolled (offline) agent. The key
# is "Rpc" or "Rpc:variant" where one RPC carries several actions (Contain, Case).
RPCS: dict[str, tuple[str, Call]] = {
    "ListHosts": ("list_hosts", lambda s, h: s.ListHosts(pb.ListHostsRequest(), timeout=10)),
    "QueryEvents": ("query_events", lambda s, h: list(s.QueryEvents(
        pb.QueryEventsRequest(host=h), timeout=10))),
    "ListIntegrityAlerts": ("integrity", lambda s, h: s.ListIntegrityAlerts(
        pb.IntegrityRequest(host=h), timeout=10)),
    "Isolate": ("isolate", lambda s, h: s.Isolate(
        pb.IsolateRequest(host=h, reason="rbac matrix"), timeout=10)),
    "Release": ("release", lambda s, h: s.Release(
        pb.ReleaseRequest(host=h, reason="rbac matrix"), timeout=10)),
    "Collect": ("collect", lambda s, h: s.Collect(
        pb.CollectRequest(host=h, paths=["/etc/hostname"], reason="rbac matrix"), timeout=10)),
    "Triage": ("triage", lambda s, h: s.Triage(
        pb.TriageRequest(host=h, reason="rbac matrix"), timeout=10)),
    "GetCommand": ("get_command", lambda s, h: s.GetCommand(
        pb.GetCommandRequest(command_id="no-such-command"), timeout=10)),
    "CreateBundle": ("create_bundle", lambda s, h: list(s.CreateBundle(
        pb.CreateBundleRequest(host=h, case_id="CASE-1", reason="rbac matrix"), timeout=30))),
    "ListAudit": ("list_audit", lambda s, h: s.ListAudit(pb.ListAuditRequest(), timeout=10)),
    "RevokeAgent": ("revoke_agent", lambda s, h: s.RevokeAgent(
        pb.RevokeAgentRequest(host=h, reason="rbac matrix"), timeout=10)),
    "CreateConsoleLogin": ("console_login", lambda s, h: s.CreateConsoleLogin(
        pb.CreateConsoleLoginRequest(), timeout=10)),
    "ListAlerts": ("list_alerts", lambda s, h: s.ListAlerts(
        pb.ListAlertsRequest(host=h), timeout=10)),
    "UpdateAlert": ("update_alert", lambda s, h: s.UpdateAlert(
        pb.UpdateAlertRequest(alert_id=999_999, status="acknowledged", reason="rbac matrix"),
        timeout=10)),
    "Hunt": ("hunt", lambda s, h: s.Hunt(pb.HuntRequest(rule="no-such-rule", hosts=[h]),
                                         timeout=30)),
    "Contain:kill": ("kill", lambda s, h: s.Contain(pb.ContainRequest(
        host=h, reason="rbac matrix", kill=pb.KillRequest(pid=999_999, start_time_ns=1,
                                                          exe="/bin/true")), timeout=10)),
    "Contain:quarantine": ("quarantine", lambda s, h: s.Contain(pb.ContainRequest(
        host=h, reason="rbac matrix", quarantine=pb.QuarantineRequest(path="/tmp/rbac")),
        timeout=10)),
    "Contain:unquarantine": ("unquarantine", lambda s, h: s.Contain(pb.ContainRequest(
        host=h, reason="rbac matrix",
        unquarantine=pb.UnquarantineRequest(quarantine_id="q-rbac")), timeout=10)),
    "Contain:block": ("block", lambda s, h: s.Contain(pb.ContainRequest(
        host=h, reason="rbac matrix", block=pb.BlockRequest(ips=["198.51.100.7"])),
        timeout=10)),
    "Contain:unblock": ("unblock", lambda s, h: s.Contain(pb.ContainRequest(
        host=h, reason="rbac matrix", unblock=pb.UnblockRequest()), timeout=10)),
    "Contain:lock_user": ("lock_user", lambda s, h: s.Contain(pb.ContainRequest(
        host=h, reason="rbac matrix", lock_user=pb.LockUserRequest(user="rbacuser")),
        timeout=10)),
    "Contain:unlock_user": ("unlock_user", lambda s, h: s.Contain(pb.ContainRequest(
        host=h, reason="rbac matrix", unlock_user=pb.UnlockUserRequest(user="rbacuser")),
        timeout=10)),
    "Case:list": ("case_view", lambda s, h: s.Case(pb.CaseRequest(op="list"), timeout=10)),
    "Case:create": ("case_edit", lambda s, h: s.Case(pb.CaseRequest(
        op="create", title="rbac matrix", severity="low", hosts=[h], reason="rbac matrix"),
        timeout=10)),
    "Story": ("story", lambda s, h: s.Story(pb.StoryRequest(host=h, seq=1), timeout=10)),
}


def _admin_stub(fleet: Fleet, name: str) -> pb_grpc.AdminStub:
    ident = Identity.from_pem(fleet.paths.responder_identity(name).read_bytes())
    creds = grpc.ssl_channel_credentials(root_certificates=ident.ca_pem,
                                         private_key=ident.key_pem,
                                         certificate_chain=ident.cert_pem)
    channel = grpc.secure_channel(f"127.0.0.1:{fleet.server.ports['admin']}", creds,
                                  options=[("grpc.ssl_target_name_override", "localhost")])
    return pb_grpc.AdminStub(channel)


def test_rbac_matrix_every_admin_rpc_and_role_is_enforced_and_audited(tmp_path: Path) -> None:
    service = pb.DESCRIPTOR.services_by_name["Admin"]
    # Every RPC of the Admin service is in the matrix: a new RPC must be added here.
    assert sorted(m.name for m in service.methods) == sorted({k.split(":")[0] for k in RPCS})
    assert {action for action, _ in RPCS.values()} == set(REQUIRED_ROLE)
    with running_fleet(tmp_path, console="127.0.0.1:0") as fleet:
        ca = CertificateAuthority.load(fleet.paths)
        for role in ("viewer", "responder"):
            create_responder(fleet.store, fleet.paths, ca, f"rbac-{role}", role)
        names = {"viewer": "rbac-viewer", "responder": "rbac-responder", "admin": "admin"}
        targets = {role: fleet.enroll(tmp_path / f"agent-{role}").agent_id for role in ROLES}
        outcomes: dict[tuple[str, str], str] = {}
        for rpc, (action, call) in RPCS.items():
            for role in ROLES:
                stub = _admin_stub(fleet, names[role])
                allowed = ROLES.index(role) >= ROLES.index(REQUIRED_ROLE[action])
                try:
                    call(stub, targets[role])
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                outcomes[(rpc, role)] = code.name
                if allowed:
                    assert code != grpc.StatusCode.PERMISSION_DENIED, (rpc, role)
                    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.NOT_FOUND), (rpc, role, code)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, role, code)
        # The expected shape, spelled out, so a change in roles shows up as a diff here.
        assert outcomes[("ListAudit", "responder")] == "PERMISSION_DENIED"
        assert outcomes[("RevokeAgent", "responder")] == "PERMISSION_DENIED"
        assert outcomes[("Isolate", "viewer")] == "PERMISSION_DENIED"
        assert outcomes[("QueryEvents", "viewer")] == "OK"
        assert outcomes[("RevokeAgent", "admin")] == "OK"
        # Every denial, reads included, is in the audit log with actor, role, action, outcome.
        audit = fleet.store.audit_rows()
        denied = {(r.actor, r.role, r.action) for r in audit if r.outcome == "denied"}
        expected = {(names[role], role, action) for rpc, (action, _) in RPCS.items()
                    for role in ROLES
                    if ROLES.index(role) < ROLES.index(REQUIRED_ROLE[action])}
        assert denied == expected
        assert all(r.time_ns > 0 for r in audit)
        # Unknown certificates (a responder identity of another CA) never reach the role check.
        rogue = CertificateAuthority.create("rogue")
        key = new_tls_key()
        cert = rogue.issue_client("ringfence://responder/admin", key.public_key())
        creds = grpc.ssl_channel_credentials(root_certificates=fleet.paths.ca_cert.read_bytes(),
                                             private_key=tls_key_pem(key),
                                             certificate_chain=cert_pem(cert))
        channel = grpc.secure_channel(f"127.0.0.1:{fleet.server.ports['admin']}", creds,
                                      options=[("grpc.ssl_target_name_override", "localhost")])
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AdminStub(channel).ListAudit(pb.ListAuditRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_audit_verify_detects_edited_and_deleted_rows(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        data = str(fleet.data_dir)
        enrollment = fleet.enroll(tmp_path / "agent")
        with fleet.admin() as admin:
            for i in range(4):
                admin.triage(pb.TriageRequest(host=enrollment.agent_id, reason=f"check {i}"))
        ok = cli("audit", "verify", "--data-dir", data)
        assert "chain intact" in ok.stdout
        db = sqlite3.connect(fleet.paths.database, isolation_level=None)
        try:
            original = db.execute("SELECT reason FROM audit WHERE seq = 2").fetchone()[0]
            # Edit a row in place.
            db.execute("UPDATE audit SET reason = 'nothing to see' WHERE seq = 2")
            bad = cli("audit", "verify", "--data-dir", data, check=False)
            assert bad.returncode == 1 and "record 2 was altered" in bad.stdout
            db.execute("UPDATE audit SET reason = ? WHERE seq = 2", (original,))
            assert cli("audit", "verify", "--data-dir", data, check=False).returncode == 0
            # Delete a row in the middle.
            row = db.execute("SELECT * FROM audit WHERE seq = 2").fetchone()
            db.execute("DELETE FROM audit WHERE seq = 2")
            bad = cli("audit", "verify", "--data-dir", data, check=False)
            assert bad.returncode == 1 and "record 2 is missing" in bad.stdout
            db.execute(f"INSERT INTO audit VALUES ({','.join('?' * len(row))})", row)
            assert cli("audit", "verify", "--data-dir", data, check=False).returncode == 0
            # Delete the newest row: the chain that remains is self-consistent, but it no
            # longer ends where the recorded head says it did.
            last = db.execute("SELECT MAX(seq) FROM audit").fetchone()[0]
            db.execute("DELETE FROM audit WHERE seq = ?", (last,))
            bad = cli("audit", "verify", "--data-dir", data, check=False)
            assert bad.returncode == 1 and "deleted from the end" in bad.stdout
        finally:
            db.close()
        # `audit --json` still lists the records and says the chain is broken.
        listed = cli("audit", "--json", "--data-dir", data)
        assert '"verified": false' in listed.stdout
