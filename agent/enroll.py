"""Enrollment on the endpoint: make the agent's keys, trade a token and CSR for a certificate.

It writes the TLS key, certificate, fleet CA, Ed25519 identity key and enrollment record under
the state directory (secrets 0600). It does not run the agent.
"""

from __future__ import annotations

import logging
import platform
import socket
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import __version__
from agent.rpc import Endpoint, enroll
from agent.state import AgentPaths, Enrollment, StateError, write_atomic
from evidence.keys import generate_private_key, private_key_pem, public_key_bytes
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)


def host_facts() -> pb.HostFacts:
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = ""
    os_name = platform.system()
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", os_name)
    except OSError:
        pass
    addresses = sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                        if a.family in (socket.AF_INET, socket.AF_INET6)
                        and not a.address.startswith(("127.", "::1", "fe80"))})
    return pb.HostFacts(hostname=socket.gethostname(), os=os_name, kernel=platform.release(),
                        machine_id=machine_id, addresses=addresses[:32],
                        agent_version=__version__)


def enroll_agent(paths: AgentPaths, server: str, token: str, ca_pem: bytes,
                 tls_name: str | None = None) -> Enrollment:
    """Enroll against `server` (HOST:PORT of the enrollment listener)."""
    if paths.enrollment.exists():
        raise StateError(f"{paths.root} already holds an enrolled agent; use another "
                         "--state-dir or remove it to enroll again")
    host = server.rsplit(":", 1)[0].strip("[]")
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringfence-agent")]))
           .sign(tls_key, hashes.SHA256()))
    identity = generate_private_key()
    response = enroll(Endpoint(server, tls_name or host), ca_pem, pb.EnrollRequest(
        token=token, csr_pem=csr.public_bytes(serialization.Encoding.PEM), host=host_facts(),
        identity_public_key=public_key_bytes(identity.public_key())))
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.root.chmod(0o700)
    write_atomic(paths.tls_key, tls_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    write_atomic(paths.identity_key, private_key_pem(identity))
    write_atomic(paths.certificate, response.certificate_pem)
    write_atomic(paths.ca, response.ca_pem)
    enrollment = Enrollment(agent_id=response.agent_id, server_host=host,
                            collector_port=response.collector_port or 8443,
                            tls_name=tls_name or host,
                            command_public_key=response.command_public_key.hex())
    write_atomic(paths.enrollment, enrollment.to_json())
    logger.info("enrolled as agent %s", response.agent_id)
    return enrollment
