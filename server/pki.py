"""The fleet PKI: CA, server certificate, agent and responder certificates.

It creates and reads key material under a server data directory and signs certificates; it does
not decide who may enroll (see `server.enrollment`) or hold any network state.

Identity is carried in a URI SAN: `ringfence://agent/<agent_id>` for agents and
`ringfence://responder/<name>` for responders. Every stream's identity comes from the verified
peer certificate, never from message fields.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector.peer import RESPONDER_URI_PREFIX, PeerIdentityError, identity_uri

logger = logging.getLogger(__name__)


CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
CLIENT_VALIDITY = datetime.timedelta(days=365)


class PKIError(Exception):
    """Key material is missing, malformed or does not fit together."""


@dataclass(frozen=True)
class ServerPaths:
    """Where a server data directory keeps each file (all secrets 0600)."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.pem"

    @property
    def server_key(self) -> Path:
        return self.pki / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.pki / "server.pem"

    @property
    def signing_key(self) -> Path:
        """Ed25519 key that signs commands to agents and bundle manifests."""
        return self.pki / "signing.key"

    @property
    def signing_public(self) -> Path:
        return self.pki / "signing.pub"

    @property
    def responders(self) -> Path:
        return self.root / "responders"

    def responder_identity(self, name: str) -> Path:
        return self.responders / f"{name}.identity.pem"

    @property
    def database(self) -> Path:
        return self.root / "ringfence.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def config(self) -> Path:
        return self.root / "server.json"


def write_secret(path: Path, data: bytes) -> None:
    """Write `data` to a new file readable by the owner only (0600), replacing atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def tls_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return _key_pem(key)


@dataclass(frozen=True)
class CertificateAuthority:
    """The fleet CA: signs the server, agent and responder certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "ringfence fleet CA") -> CertificateAuthority:
        key = new_tls_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, paths: ServerPaths) -> CertificateAuthority:
        try:
            key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        except FileNotFoundError as e:
            raise PKIError(
                f"no fleet CA under {paths.root}: run `ringfence server init --data-dir {paths.root}`"
            ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{paths.ca_key} is not an EC private key")
        return cls(key, cert)

    def save(self, paths: ServerPaths) -> None:
        write_secret(paths.ca_key, _key_pem(self.key))
        write_secret(paths.ca_cert, cert_pem(self.cert))

    def _builder(
        self, subject_cn: str, public_key: ec.EllipticCurvePublicKey, validity: datetime.timedelta
    ) -> x509.CertificateBuilder:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )

    def issue_server(self, addresses: list[str], key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        sans: list[x509.GeneralName] = []
        for address in addresses:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                sans.append(x509.DNSName(address))
        return (
            self._builder("ringfence server", key.public_key(), SERVER_VALIDITY)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_client(
        self,
        uri: str,
        public_key: ec.EllipticCurvePublicKey,
        validity: datetime.timedelta = CLIENT_VALIDITY,
    ) -> x509.Certificate:
        return (
            self._builder(uri.rsplit("/", 1)[-1], public_key, validity)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_from_csr(self, csr_pem: bytes, uri: str) -> x509.Certificate:
        """Sign a client certificate for the key in `csr_pem`; the CSR's own names are ignored."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise PKIError("the certificate signing request is not valid PEM") from e
        if not csr.is_signature_valid:
            raise PKIError("the certificate signing request's signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PKIError("the certificate signing request must carry an EC P-256 key")
        return self.issue_client(uri, public_key)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class Identity:
    """A client identity file: private key, certificate and the fleet CA, one PEM file."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    def to_pem(self) -> bytes:
        return self.key_pem + self.cert_pem + self.ca_pem

    @classmethod
    def from_pem(cls, data: bytes) -> Identity:
        blocks = _pem_blocks(data)
        keys = [b for b in blocks if b"PRIVATE KEY" in b.split(b"\n", 1)[0]]
        certs = [b for b in blocks if b.startswith(b"-----BEGIN CERTIFICATE")]
        if len(keys) != 1 or len(certs) != 2:
            raise PKIError("an identity file holds one private key, its certificate and the CA")
        return cls(keys[0], certs[0], certs[1])

    @property
    def uri(self) -> str:
        try:
            return identity_uri(x509.load_pem_x509_certificate(self.cert_pem))
        except PeerIdentityError as e:
            raise PKIError(str(e)) from e


def _pem_blocks(data: bytes) -> list[bytes]:
    blocks: list[bytes] = []
    current: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"-----BEGIN"):
            current = [line]
        elif line.startswith(b"-----END"):
            current.append(line)
            blocks.append(b"".join(current))
            current = []
        elif current:
            current.append(line)
    return blocks


def issue_responder_identity(ca: CertificateAuthority, name: str) -> Identity:
    key = new_tls_key()
    cert = ca.issue_client(RESPONDER_URI_PREFIX + name, key.public_key())
    return Identity(tls_key_pem(key), cert_pem(cert), cert_pem(ca.cert))
