"""DSSE v1 envelopes (secure-systems-lab/dsse protocol.md) signed with Ed25519 keys.

Signing produces canonical envelope JSON; verification checks a trusted signature over the
PAE first, then the payloadType, and only then hands back the payload. It never parses
payloads: that is the caller's job, after verification.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evidence import _canonical
from evidence.errors import FormatError, PayloadTypeError, SignatureError, TrustError
from evidence.keys import key_id

logger = logging.getLogger(__name__)

CHECKPOINT_TYPE = "application/vnd.ringfence.checkpoint.v1+json"
ACQUISITION_TYPE = "application/vnd.ringfence.acquisition.v1+json"
COMMAND_TYPE = "application/vnd.ringfence.command.v1+json"
MANIFEST_TYPE = "application/vnd.ringfence.bundle.v1+json"
AUDIT_TYPE = "application/vnd.ringfence.audit.v1+json"

MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
"""Default size limit for an envelope (bytes)."""

MAX_SIGNATURES = 16
"""More signatures than this is treated as malformed (bounds verification work)."""


@dataclass(frozen=True)
class VerifiedEnvelope:
    """A payload whose signature and type were verified; `keyid` names the key that signed."""

    payload_type: str
    payload: bytes
    keyid: str


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of (type, body), the bytes actually signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(payload_type: str, payload: bytes, key: Ed25519PrivateKey) -> bytes:
    """Sign `payload` as `payload_type` with `key`; return canonical envelope JSON bytes."""
    signature = key.sign(pae(payload_type, payload))
    envelope = {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": payload_type,
        "signatures": [{"keyid": key_id(key.public_key()),
                        "sig": base64.b64encode(signature).decode("ascii")}],
    }
    return _canonical.dumps(envelope)


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"envelope: {what} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise FormatError(f"envelope: {what} is not valid base64") from e


def _trusted_by_id(trusted: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey]
                   ) -> dict[str, Ed25519PublicKey]:
    keys = trusted.values() if isinstance(trusted, Mapping) else trusted
    # Key ids are recomputed from the keys themselves: a caller's label is never trusted.
    return {key_id(k): k for k in keys}


def verify_envelope(envelope: bytes, expected_type: str,
                    trusted: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey],
                    *, max_size: int = MAX_ENVELOPE_BYTES) -> VerifiedEnvelope:
    """Verify `envelope` against `trusted` keys and return its payload.

    Order: size limit, strict parse, signature by a trusted key over the PAE, then
    payloadType == `expected_type`. Raises TrustError on an empty trust set, SignatureError
    when no trusted signature verifies, PayloadTypeError on a wrong type, FormatError on
    malformed input. A Mapping's keys are ignored: ids are recomputed from the keys.
    """
    by_id = _trusted_by_id(trusted)
    if not by_id:
        raise TrustError("empty trust set: refusing to verify")
    if len(envelope) > max_size:
        raise FormatError(f"envelope is {len(envelope)} bytes, limit is {max_size}")
    obj = _canonical.loads_object(envelope, "envelope")
    _canonical.require_keys(obj, {"payload", "payloadType", "signatures"}, "envelope")
    payload = _b64(obj["payload"], "payload")
    payload_type = obj["payloadType"]
    if not isinstance(payload_type, str):
        raise FormatError("envelope: payloadType is not a string")
    signatures = obj["signatures"]
    if not isinstance(signatures, list):
        raise FormatError("envelope: signatures is not a list")
    if not signatures:
        raise SignatureError("envelope has no signatures")
    if len(signatures) > MAX_SIGNATURES:
        raise FormatError(f"envelope has more than {MAX_SIGNATURES} signatures")

    message = pae(payload_type, payload)
    untrusted: list[str] = []
    invalid: list[str] = []
    verified_by: str | None = None
    for entry in signatures:
        if not isinstance(entry, dict):
            raise FormatError("envelope: signature entry is not an object")
        _canonical.require_keys(entry, {"sig"}, "envelope signature", optional={"keyid"})
        sig = _b64(entry["sig"], "sig")
        keyid = entry.get("keyid", "")
        if not isinstance(keyid, str):
            raise FormatError("envelope: keyid is not a string")
        # keyid is an unauthenticated hint; without one, every trusted key is tried.
        candidates = [keyid] if keyid else list(by_id)
        for candidate in candidates:
            key = by_id.get(candidate)
            if key is None:
                untrusted.append(candidate)
                continue
            try:
                key.verify(sig, message)
            except InvalidSignature:
                invalid.append(candidate)
                continue
            verified_by = candidate
            break
        if verified_by is not None:
            break

    if verified_by is None:
        if invalid:
            raise SignatureError("invalid signature by trusted key", keyid=invalid[0])
        raise SignatureError("signature by untrusted key", keyid=untrusted[0] if untrusted else None)
    if payload_type != expected_type:
        raise PayloadTypeError(expected_type, payload_type)
    return VerifiedEnvelope(payload_type=payload_type, payload=payload, keyid=verified_by)
