"""The server's gRPC face: Enrollment and Admin services, listeners, and the admin client.

This is the only server module that talks gRPC. It authenticates responders by their verified
certificates, maps server errors to gRPC status codes in one place (`status_for`) and maps
`grpc.RpcError` back into `ClientError` for the CLI. The logic lives in server.admin and
server.fleet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from collector.peer import PeerIdentityError
from collector.rpc import peer_identity
from collector.store.base import CommandRow, NotFound, Store, StoreError, StoreUnavailable
from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from proto.limits import UNARY_DEADLINE_S, client_options
from server.admin import Actor, Admin, AdminError, AllowSpec, InvalidRequest, PermissionDenied
from server.console import ConsoleLoginGrant
from server.detection import DetectionError, DetectionStoreError
from server.detection.records import Alert
from server.detection.service import DetectionAdmin
from server.fleet import Enrollment, EnrollmentRefused
from server.incident import Incident, to_json
from server.pki import Identity

logger = logging.getLogger(__name__)

T = TypeVar("T")


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping of server errors to gRPC codes and messages safe for the peer."""
    if isinstance(error, EnrollmentRefused):
        # Opaque on purpose: the reason (expired, used up, unknown) stays in the local log.
        return grpc.StatusCode.PERMISSION_DENIED, ("enrollment refused: the token is invalid, "
                                                   "expired or used up; ask for a new token")
    if isinstance(error, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, str(error)
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, DetectionStoreError):
        return grpc.StatusCode.UNAVAILABLE, "detection storage is failing; retry later"
    if isinstance(error, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "server storage is failing; retry later"
    if isinstance(error, (StoreError, AdminError)):
        return grpc.StatusCode.INTERNAL, "internal error"
    if isinstance(error, PeerIdentityError):
        return grpc.StatusCode.UNAUTHENTICATED, "client certificate is not a responder identity"
    return grpc.StatusCode.INTERNAL, "internal error"


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    code, message = status_for(error)
    context.abort(code, message)


class EnrollmentService(pb_grpc.EnrollmentServicer):
    def __init__(self, enrollment: Enrollment) -> None:
        self._enrollment = enrollment

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        try:
            return self._enrollment.enroll(request)
        except EnrollmentRefused as e:
            logger.warning("enrollment refused from %s: %s", context.peer(), e.reason)
            _abort(context, e)
        except StoreError as e:
            logger.error("enrollment failed: %s", e)
            _abort(context, e)
        raise AssertionError("unreachable")


def command_status(row: CommandRow) -> pb.CommandStatus:
    return pb.CommandStatus(command_id=row.command_id, agent_id=row.agent_id, action=row.action,
                            status=row.status, message=row.message, detail_json=row.detail_json,
                            updated_ns=row.updated_ns)


class AdminService(pb_grpc.AdminServicer):
    """Responder API. Every call authenticates the caller's certificate, then defers to Admin."""

    def __init__(self, admin: Admin, store: Store,
                 bundles: Callable[[Actor, pb.CreateBundleRequest], Iterator[pb.BundleChunk]]
                 | None = None,
                 console_login: Callable[[Actor, str], ConsoleLoginGrant] | None = None) -> None:
        self._admin = admin
        self._store = store
        self._bundles = bundles
        self._console_login = console_login

    def _actor(self, context: grpc.ServicerContext) -> Actor:
        try:
            peer = peer_identity(context)
        except PeerIdentityError as e:
            logger.warning("admin call refused: %s", e)
            _abort(context, e)
            raise
        responder = self._store.responder_by_fingerprint(peer.fingerprint)
        if peer.kind != "responder" or responder is None or responder.revoked:
            logger.warning("admin call from unknown or revoked identity %s/%s", peer.kind,
                           peer.name)
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "this certificate is not a current responder identity")
        assert responder is not None
        return Actor(responder.name, responder.role)

    def _call(self, context: grpc.ServicerContext, fn: Callable[[Actor], T]) -> T:
        actor = self._actor(context)
        try:
            return fn(actor)
        except (AdminError, StoreError, DetectionError) as e:
            _abort(context, e)
            raise

    def ListHosts(self, request: pb.ListHostsRequest,
                  context: grpc.ServicerContext) -> pb.ListHostsResponse:
        views = self._call(context, self._admin.list_hosts)
        detection = self._admin.detection
        open_alerts = detection.open_alert_counts() if detection is not None else {}
        hosts = [pb.Host(
            agent_id=v.agent.agent_id, hostname=v.agent.hostname, online=v.online,
            last_seen_ns=v.agent.last_seen_ns, agent_version=v.agent.agent_version,
            last_seq=v.last_seq, integrity_alerts=v.integrity_alerts,
            isolation_state=v.agent.isolation_state,
            isolation_changed_ns=v.agent.isolation_changed_ns,
            isolation_reason=v.agent.isolation_reason, sensors=v.agent.sensors,
            enrolled_ns=v.agent.enrolled_ns, os=v.agent.os, addresses=list(v.agent.addresses),
            revoked=v.agent.revoked,
            open_alerts=open_alerts.get(v.agent.agent_id, 0)) for v in views]
        return pb.ListHostsResponse(hosts=hosts)

    def QueryEvents(self, request: pb.QueryEventsRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.StoredEvent]:
        rows = self._call(context, lambda a: self._admin.query_events(
            a, request.host, request.since_ns, request.until_ns, request.kind, request.limit,
            request.after_seq))
        for row in rows:
            yield pb.StoredEvent(agent_id=row.agent_id, seq=row.seq, event=row.data,
                                 chain_hash=row.chain_hash.hex(), received_ns=row.received_ns)

    def ListIntegrityAlerts(self, request: pb.IntegrityRequest,
                            context: grpc.ServicerContext) -> pb.IntegrityResponse:
        rows = self._call(context, lambda a: self._admin.integrity(a, request.host))
        return pb.IntegrityResponse(alerts=[pb.IntegrityAlert(
            agent_id=r.agent_id, kind=r.kind, seq=r.seq, detail=r.detail, time_ns=r.time_ns)
            for r in rows])

    def Isolate(self, request: pb.IsolateRequest,
                context: grpc.ServicerContext) -> pb.CommandStatus:
        allow = [AllowSpec(r.cidr, r.protocol or "any", r.port, r.direction or "both")
                 for r in request.allow]
        row = self._call(context, lambda a: self._admin.isolate(
            a, request.host, request.reason, allow, list(request.dns), request.dhcp,
            request.confirm_deadline_s, request.expires_s))
        return command_status(row)

    def Release(self, request: pb.ReleaseRequest,
                context: grpc.ServicerContext) -> pb.CommandStatus:
        return command_status(self._call(
            context, lambda a: self._admin.release(a, request.host, request.reason)))

    def Collect(self, request: pb.CollectRequest,
                context: grpc.ServicerContext) -> pb.CommandStatus:
        return command_status(self._call(context, lambda a: self._admin.collect(
            a, request.host, list(request.paths), request.reason)))

    def Triage(self, request: pb.TriageRequest,
               context: grpc.ServicerContext) -> pb.CommandStatus:
        return command_status(self._call(
            context, lambda a: self._admin.triage(a, request.host, request.reason)))

    def GetCommand(self, request: pb.GetCommandRequest,
                   context: grpc.ServicerContext) -> pb.CommandStatus:
        return command_status(self._call(
            context, lambda a: self._admin.get_command(a, request.command_id)))

    def CreateBundle(self, request: pb.CreateBundleRequest,
                     context: grpc.ServicerContext) -> Iterator[pb.BundleChunk]:
        if self._bundles is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "bundles are not available")
        assert self._bundles is not None
        bundles = self._bundles
        chunks = self._call(context, lambda a: bundles(a, request))
        try:
            yield from chunks
        except (AdminError, StoreError) as e:
            _abort(context, e)

    def ListAudit(self, request: pb.ListAuditRequest,
                  context: grpc.ServicerContext) -> pb.ListAuditResponse:
        rows, error = self._call(context, self._admin.list_audit)
        if request.limit:
            rows = rows[-request.limit:]
        return pb.ListAuditResponse(records=[pb.AuditRecord(
            seq=r.seq, time_ns=r.time_ns, actor=r.actor, role=r.role, action=r.action,
            target=r.target, reason=r.reason, outcome=r.outcome, hash=r.hash.hex())
            for r in rows], verified=not error, verify_error=error)

    def RevokeAgent(self, request: pb.RevokeAgentRequest,
                    context: grpc.ServicerContext) -> pb.RevokeAgentResponse:
        agent_id, closed = self._call(context, lambda a: self._admin.revoke_agent(
            a, request.host, request.reason))
        return pb.RevokeAgentResponse(agent_id=agent_id, session_closed=closed)

    def CreateConsoleLogin(self, request: pb.CreateConsoleLoginRequest,
                           context: grpc.ServicerContext) -> pb.ConsoleLogin:
        if self._console_login is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the web console is disabled on this "
                          "server: start it with `ringfence server run --console HOST:PORT`")
        assert self._console_login is not None
        issue = self._console_login
        # _actor authenticated the certificate; the login is bound to that same certificate.
        actor = self._actor(context)
        fingerprint = peer_identity(context).fingerprint
        grant = self._call(context, lambda a: issue(a, fingerprint))
        return pb.ConsoleLogin(url=grant.url, expires_ns=grant.expires_ns, actor=actor.name,
                               role=actor.role)

    # -- detection (server.detection.service) -------------------------------------------------
    def _detection(self, context: grpc.ServicerContext) -> DetectionAdmin:
        if self._admin.detection is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "detection is not running on this "
                          "server")
        assert self._admin.detection is not None
        return self._admin.detection

    def _hostname(self, agent_id: str, cache: dict[str, str]) -> str:
        if agent_id not in cache:
            agent = self._store.get_agent(agent_id)
            cache[agent_id] = agent.hostname if agent else ""
        return cache[agent_id]

    def _alert(self, a: Alert, names: dict[str, str]) -> pb.Alert:
        return pb.Alert(
            alert_id=a.alert_id, raised_ns=a.raised_ns, agent_id=a.agent_id,
            hostname=self._hostname(a.agent_id, names), source=a.source, rule_id=a.rule_id,
            title=a.title, severity=a.severity, detail=a.detail,
            events=[pb.EventLink(agent_id=e.agent_id, seq=e.seq) for e in a.events],
            count=a.count, first_event_ns=a.first_event_ns, last_event_ns=a.last_event_ns,
            updated_ns=a.updated_ns, status=a.status, status_reason=a.status_reason,
            status_actor=a.status_actor, hash=a.hash.hex())

    def ListAlerts(self, request: pb.ListAlertsRequest,
                   context: grpc.ServicerContext) -> pb.ListAlertsResponse:
        detection = self._detection(context)
        alerts, error, records = self._call(context, lambda a: detection.list_alerts(
            a, request.host, request.min_severity, request.status, request.after_id,
            request.limit, request.verify))
        names: dict[str, str] = {}
        return pb.ListAlertsResponse(alerts=[self._alert(a, names) for a in alerts],
                                     verified=request.verify and not error,
                                     verify_error=error, log_records=records)

    def UpdateAlert(self, request: pb.UpdateAlertRequest,
                    context: grpc.ServicerContext) -> pb.Alert:
        detection = self._detection(context)
        alert = self._call(context, lambda a: detection.update_alert(
            a, request.alert_id, request.status, request.reason))
        return self._alert(alert, {})

    def Hunt(self, request: pb.HuntRequest, context: grpc.ServicerContext) -> pb.HuntResponse:
        detection = self._detection(context)
        result = self._call(context, lambda a: detection.hunt(
            a, request.rule, request.rule_yaml, list(request.hosts), request.since_ns,
            request.until_ns, request.limit))
        names: dict[str, str] = {}
        return pb.HuntResponse(
            rule_id=result.rule_id, title=result.title, events_scanned=result.scanned,
            truncated=result.truncated, matches=[pb.HuntMatch(
                agent_id=m.agent_id, hostname=self._hostname(m.agent_id, names),
                seq=m.event.seq if m.event else 0, time_ns=event.time_ns, detail=m.detail,
                event=event.SerializeToString(deterministic=True))
                for m, event in result.matches])

    # -- incident workflow (server.incident) ---------------------------------------------------
    _incident: Incident | None = None

    @classmethod
    def with_incident(cls, incident: Incident, *args: Any) -> AdminService:
        """The service with the incident workflow's Contain / Case / Story calls enabled."""
        service = cls(*args)
        service._incident = incident
        return service

    def _incident_or_abort(self, context: grpc.ServicerContext) -> Incident:
        if self._incident is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the incident workflow is not enabled")
        assert self._incident is not None
        return self._incident

    def Contain(self, request: pb.ContainRequest,
                context: grpc.ServicerContext) -> pb.CommandStatus:
        incident = self._incident_or_abort(context)
        return command_status(self._call(context, lambda a: incident.contain(a, request)))

    def Case(self, request: pb.CaseRequest, context: grpc.ServicerContext) -> pb.CaseResponse:
        incident = self._incident_or_abort(context)
        return pb.CaseResponse(json=to_json(self._call(
            context, lambda a: incident.case(a, request))))

    def Story(self, request: pb.StoryRequest, context: grpc.ServicerContext) -> pb.StoryResponse:
        incident = self._incident_or_abort(context)
        return pb.StoryResponse(json=to_json(self._call(
            context, lambda a: incident.story_of(a, request))))


# -- client side (CLI) --------------------------------------------------------------------------

class ClientError(Exception):
    """An admin call failed; the message says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ServerAddress:
    target: str                 # host:port of the admin API
    tls_name: str               # name the server certificate must carry


def _translate(e: grpc.RpcError) -> ClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the ringfence admin API: {details}"
    return ClientError(code.name if code else "UNKNOWN", details or "call failed")


class AdminClient:
    """The responder's end of the Admin service, with gRPC errors turned into ClientError."""

    def __init__(self, address: ServerAddress, identity: Identity) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem, private_key=identity.key_pem,
            certificate_chain=identity.cert_pem)
        options: list[tuple[str, int | str]] = list(client_options())
        options.append(("grpc.ssl_target_name_override", address.tls_name))
        self._channel = grpc.secure_channel(address.target, credentials, options=options)
        self._stub = pb_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, fn: Callable[..., T], request: object, timeout: float = UNARY_DEADLINE_S) -> T:
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as e:
            raise _translate(e) from e

    def list_hosts(self) -> list[pb.Host]:
        return list(self._unary(self._stub.ListHosts, pb.ListHostsRequest()).hosts)

    def query_events(self, request: pb.QueryEventsRequest) -> Iterator[pb.StoredEvent]:
        try:
            yield from self._stub.QueryEvents(request, timeout=300)
        except grpc.RpcError as e:
            raise _translate(e) from e

    def integrity(self, host: str) -> list[pb.IntegrityAlert]:
        return list(self._unary(self._stub.ListIntegrityAlerts,
                                pb.IntegrityRequest(host=host)).alerts)

    def isolate(self, request: pb.IsolateRequest) -> pb.CommandStatus:
        return self._unary(self._stub.Isolate, request)

    def release(self, request: pb.ReleaseRequest) -> pb.CommandStatus:
        return self._unary(self._stub.Release, request)

    def collect(self, request: pb.CollectRequest) -> pb.CommandStatus:
        return self._unary(self._stub.Collect, request)

    def triage(self, request: pb.TriageRequest) -> pb.CommandStatus:
        return self._unary(self._stub.Triage, request)

    def get_command(self, command_id: str) -> pb.CommandStatus:
        return self._unary(self._stub.GetCommand, pb.GetCommandRequest(command_id=command_id))

    def create_bundle(self, request: pb.CreateBundleRequest) -> Iterator[pb.BundleChunk]:
        try:
            yield from self._stub.CreateBundle(request, timeout=3600)
        except grpc.RpcError as e:
            raise _translate(e) from e

    def audit(self, limit: int = 0) -> pb.ListAuditResponse:
        return self._unary(self._stub.ListAudit, pb.ListAuditRequest(limit=limit))

    def revoke_agent(self, host: str, reason: str) -> pb.RevokeAgentResponse:
        return self._unary(self._stub.RevokeAgent, pb.RevokeAgentRequest(host=host, reason=reason))

    def console_login(self) -> pb.ConsoleLogin:
        return self._unary(self._stub.CreateConsoleLogin, pb.CreateConsoleLoginRequest())

    def contain(self, request: pb.ContainRequest) -> pb.CommandStatus:
        return self._unary(self._stub.Contain, request)

    def case(self, request: pb.CaseRequest) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self._unary(self._stub.Case, request).json)
        return document

    def story(self, request: pb.StoryRequest) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self._unary(self._stub.Story, request).json)
        return document

    def list_alerts(self, request: pb.ListAlertsRequest) -> pb.ListAlertsResponse:
        return self._unary(self._stub.ListAlerts, request)

    def update_alert(self, request: pb.UpdateAlertRequest) -> pb.Alert:
        return self._unary(self._stub.UpdateAlert, request)

    def hunt(self, request: pb.HuntRequest, timeout_s: float = 600.0) -> pb.HuntResponse:
        return self._unary(self._stub.Hunt, request, timeout=timeout_s)
