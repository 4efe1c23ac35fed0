"""Who is on the other end of a TLS connection, read from its verified certificate.

It parses the ringfence URI SAN of a peer certificate; it does not verify chains (TLS did that)
and does not look anything up in the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

AGENT_URI_PREFIX = "ringfence://agent/"
RESPONDER_URI_PREFIX = "ringfence://responder/"


class PeerIdentityError(Exception):
    """The peer certificate does not carry exactly one usable ringfence identity."""


@dataclass(frozen=True)
class PeerIdentity:
    """A verified peer: its kind ("agent" or "responder"), name and certificate fingerprint."""

    kind: str
    name: str
    fingerprint: str


def identity_uri(cert: x509.Certificate) -> str:
    """The single ringfence URI SAN of a certificate, or raise PeerIdentityError."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise PeerIdentityError("certificate carries no subject alternative name") from e
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith("ringfence://")]
    if len(uris) != 1:
        raise PeerIdentityError("certificate must carry exactly one ringfence:// URI")
    return uris[0]


def peer_from_pem(cert_pem: bytes) -> PeerIdentity:
    """Identity of a peer from the PEM certificate TLS verified."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise PeerIdentityError("peer certificate is not valid PEM") from e
    uri = identity_uri(cert)
    fp = cert.fingerprint(hashes.SHA256()).hex()
    for prefix, kind in ((AGENT_URI_PREFIX, "agent"), (RESPONDER_URI_PREFIX, "responder")):
        if uri.startswith(prefix):
            name = uri[len(prefix):]
            if not name or "/" in name:
                raise PeerIdentityError("empty or malformed identity in certificate URI")
            return PeerIdentity(kind, name, fp)
    raise PeerIdentityError("certificate URI names neither an agent nor a responder")
