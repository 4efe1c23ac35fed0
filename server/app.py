"""Composition root of `ringfence server run`: builds the store, PKI, control plane and the
listeners (enrollment, collector, admin; the web console with /metrics when configured), and
shuts them down cleanly.

Nothing here decides policy; it only wires the parts together from a frozen RunConfig.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from collector.rpc import CollectorListener, CollectorService
from collector.store.base import Store
from evidence.keys import load_private_key, public_key_bytes
from proto import ringfence_pb2_grpc as pb_grpc
from proto.limits import server_options
from server.admin import Admin
from server.alert_bridge import AlertBridge, alert_lookup
from server.bundles import BundleService
from server.cluster import ClusterNode, ClusterSessions, new_node_id
from server.commands import CommandQueue
from server.console import LoginIssuer
from server.console.auth import ConsoleAuth
from server.console.web import ConsoleApp, ConsoleServer
from server.control import BlobStore, ControlPlane
from server.detection.engine import DetectionConfig
from server.detection.service import DetectionAdmin, DetectionRuntime
from server.fleet import Enrollment, load_config
from server.incident import Incident, build_incident
from server.metrics import MeteredControlPlane, ServerMetrics
from server.pki import CertificateAuthority, ServerPaths
from server.rpc import AdminService, EnrollmentService
from server.storage import open_server_store

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


@dataclass(frozen=True)
class RunConfig:
    data_dir: Path
    listen: str = "0.0.0.0:8443"          # collector (agents, mutual TLS)
    admin: str = "127.0.0.1:8444"         # admin API (responders, mutual TLS)
    enroll: str = "0.0.0.0:8442"          # enrollment (TLS, server-authenticated only)
    advertise: tuple[str, ...] = ()       # collector addresses for isolation policies
    max_sessions: int = 10_000            # concurrent agent streams (RESOURCE_EXHAUSTED above)
    detection: DetectionConfig | None = None  # None: DATA/detection.json, else defaults
    store: str = ""                       # PostgreSQL URL; "" = as recorded in the data dir
    console: str | None = None            # web console + /metrics HOST:PORT; None = off
    console_url: str = ""                 # base URL in login links (default http://HOST:PORT)


class Listener(Protocol):
    """What RunningServer needs of a listener: grpc.Server and CollectorListener alike."""

    def start(self) -> None: ...

    def stop(self, grace: float | None) -> threading.Event: ...


@dataclass(frozen=True)
class RunningServer:
    """Handles to a started server; `ports` holds the bound ports (useful with port 0)."""

    ports: dict[str, int]
    servers: tuple[Listener, ...]
    store: Store
    stopped: threading.Event
    console: ConsoleServer | None = None
    metrics: ServerMetrics | None = None
    detection: DetectionRuntime | None = None
    incident: Incident | None = None

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop listeners, detection and the incident workflow, then close the store.
        Idempotent: a second call (e.g. from a test's cleanup) does nothing."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self.console is not None:
            self.console.stop()
        events = [s.stop(grace_s) for s in self.servers]
        for e in events:
            e.wait(grace_s + 1)
        if self.detection is not None:
            self.detection.stop()
        if self.incident is not None:
            self.incident.stop()
        self.store.close()


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials) -> int:
    port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}: address in use or not available")
    return port


def start(config: RunConfig) -> RunningServer:
    paths = ServerPaths(config.data_dir)
    fleet = load_config(paths)
    ca = CertificateAuthority.load(paths)
    signing_key = load_private_key(paths.signing_key)
    store = open_server_store(paths, config.store)
    registry = ClusterSessions(store, new_node_id())
    commands = CommandQueue(store, registry, signing_key)
    detection = DetectionRuntime.open(store, config.data_dir, config.detection)
    detection.start()
    # Set by RunningServer.stop(); ends the node's heartbeat and notification threads.
    stopped = threading.Event()
    node = ClusterNode(store, registry, commands, stopped)
    console_auth = ConsoleAuth()
    metrics = ServerMetrics(store, registry, console_auth.counts, detection.figures)
    control = MeteredControlPlane(ControlPlane(store, registry, commands, BlobStore(paths.blobs),
                                               detection.submit, detection.hold_ingest_s),
                                  store, metrics)
    server_pair = [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())]
    ca_pem = paths.ca_cert.read_bytes()
    tls_only = grpc.ssl_server_credentials(server_pair)
    mutual = grpc.ssl_server_credentials(server_pair, root_certificates=ca_pem,
                                         require_client_auth=True)
    options = server_options()
    enroll_server = grpc.server(futures.ThreadPoolExecutor(8, thread_name_prefix="enroll"),
                                options=options)
    admin_server = grpc.server(futures.ThreadPoolExecutor(16, thread_name_prefix="admin"),
                               options=options)
    # Agent sessions are asyncio streams on the collector's own event-loop thread: an idle
    # session costs about 100 KB, not a thread (enrollment and admin stay thread-pooled).
    collector = CollectorListener(
        CollectorService(store, node.control_plane(control), registry), config.listen, mutual,
        options, config.max_sessions)
    ports = {
        "collector": collector.bind(),
        "enroll": _bind(enroll_server, config.enroll, tls_only),
        "admin": _bind(admin_server, config.admin, mutual),
    }

    advertise = list(config.advertise) or list(fleet.addresses)
    admin = Admin(store, registry, commands, [(a, ports["collector"]) for a in advertise])
    admin.detection = DetectionAdmin(admin, detection)
    pb_grpc.add_EnrollmentServicer_to_server(
        EnrollmentService(Enrollment(store, ca, public_key_bytes(signing_key.public_key()),
                                     ports["collector"])), enroll_server)
    incident = build_incident(admin, store, paths)
    detection.engine.add_alert_listener(AlertBridge(incident.alerts, store))
    incident.alerts.set_lookup(alert_lookup(detection.dstore, store))
    bundles = BundleService(store, admin, paths, signing_key, incident.cases)
    console: ConsoleServer | None = None
    issuer: LoginIssuer | None = None
    if config.console:
        host, _, port = config.console.rpartition(":")
        console = ConsoleServer(ConsoleApp(admin, store, console_auth, bundles, metrics),
                                host.strip("[]"), int(port))
        ports["console"] = console.port
        issuer = LoginIssuer(admin, console_auth, config.console_url or
                             f"http://{host}:{console.port}")
    pb_grpc.add_AdminServicer_to_server(AdminService.with_incident(incident, admin, store,
                                                                   bundles.stream, issuer),
                                        admin_server)
    for s in (enroll_server, collector, admin_server):
        s.start()
    node.start()
    if console is not None:
        console.start()
    run_dir = config.data_dir / "run"
    run_dir.mkdir(exist_ok=True, mode=0o700)
    admin_host = config.admin.rsplit(":", 1)[0]
    (run_dir / "server.json").write_text(json.dumps({
        "admin": f"{admin_host}:{ports['admin']}", "collector_port": ports["collector"],
        "enroll_port": ports["enroll"], "console_port": ports.get("console", 0)}))
    logger.info("ringfence server listening: enroll %s, collector %s, admin %s, console %s",
                ports["enroll"], ports["collector"], ports["admin"], ports.get("console", "off"))
    return RunningServer(ports, (enroll_server, collector, admin_server), store,
                         stopped, console, metrics, detection, incident)
