"""Agent-signed file acquisition records: which file was collected, its digest and metadata.

It defines the canonical payload and sign/verify; it does not read or hash files itself.
Paths are raw bytes (Linux paths need not be UTF-8): the payload carries them as base64
plus a display string with backslash escapes, which verification recomputes and compares.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evidence import _canonical
from evidence.dsse import ACQUISITION_TYPE, sign_envelope, verify_envelope
from evidence.errors import FormatError

logger = logging.getLogger(__name__)

ACQUISITION_PAYLOAD_KIND = "ringfence.acquisition"
ACQUISITION_VERSION = 1
MAX_ACQUISITION_ENVELOPE_BYTES = 256 * 1024
MAX_PATH_BYTES = 16 * 1024

_FIELDS = {"type", "version", "agent_id", "command_id", "path_b64", "path_display", "sha256",
           "size", "mode", "uid", "gid", "mtime_ns", "acquired_ns"}


def display_path(path: bytes) -> str:
    """Human-readable rendering of a raw path: UTF-8 with backslash escapes for bad bytes."""
    return path.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class AcquisitionRecord:
    """The agent's statement that it collected `path` with content digest `sha256`."""

    agent_id: str
    command_id: str
    path: bytes
    sha256: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    acquired_ns: int

    def __post_init__(self) -> None:
        if not self.agent_id:
            raise ValueError("agent_id must not be empty")
        if not _canonical.is_sha256_hex(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.size < 0:
            raise ValueError("size must be >= 0")
        if len(self.path) > MAX_PATH_BYTES:
            raise ValueError("path too long")

    @property
    def path_display(self) -> str:
        """The path for humans (not reversible; `path` holds the exact bytes)."""
        return display_path(self.path)


def acquisition_payload(rec: AcquisitionRecord) -> bytes:
    """Canonical JSON payload for `rec`."""
    return _canonical.dumps({
        "type": ACQUISITION_PAYLOAD_KIND,
        "version": ACQUISITION_VERSION,
        "agent_id": rec.agent_id,
        "command_id": rec.command_id,
        "path_b64": base64.b64encode(rec.path).decode("ascii"),
        "path_display": rec.path_display,
        "sha256": rec.sha256,
        "size": rec.size,
        "mode": rec.mode,
        "uid": rec.uid,
        "gid": rec.gid,
        "mtime_ns": rec.mtime_ns,
        "acquired_ns": rec.acquired_ns,
    })


def parse_acquisition_payload(payload: bytes) -> AcquisitionRecord:
    """Parse a (verified) acquisition payload strictly; FormatError on any deviation."""
    what = "acquisition record"
    obj = _canonical.loads_object(payload, what)
    _canonical.require_keys(obj, _FIELDS, what)
    if obj["type"] != ACQUISITION_PAYLOAD_KIND:
        raise FormatError(f"{what}: type is {obj['type']!r}")
    if _canonical.get_int(obj, "version", what) != ACQUISITION_VERSION:
        raise FormatError(f"{what}: unsupported version {obj['version']!r}")
    try:
        path = base64.b64decode(_canonical.get_str(obj, "path_b64", what, nonempty=False)
                                .encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise FormatError(f"{what}: path_b64 is not valid base64") from e
    if obj["path_display"] != display_path(path):
        raise FormatError(f"{what}: path_display does not match path_b64")
    sha = _canonical.get_str(obj, "sha256", what)
    if not _canonical.is_sha256_hex(sha):
        raise FormatError(f"{what}: sha256 is not 64 lowercase hex digits")
    try:
        return AcquisitionRecord(
            agent_id=_canonical.get_str(obj, "agent_id", what),
            command_id=_canonical.get_str(obj, "command_id", what, nonempty=False),
            path=path,
            sha256=sha,
            size=_canonical.get_int(obj, "size", what),
            mode=_canonical.get_int(obj, "mode", what),
            uid=_canonical.get_int(obj, "uid", what),
            gid=_canonical.get_int(obj, "gid", what),
            mtime_ns=_canonical.get_int(obj, "mtime_ns", what, minimum=None),
            acquired_ns=_canonical.get_int(obj, "acquired_ns", what, minimum=None),
        )
    except ValueError as e:
        raise FormatError(f"{what}: {e}") from e


def sign_acquisition(rec: AcquisitionRecord, key: Ed25519PrivateKey) -> bytes:
    """Return a DSSE envelope (JSON bytes) over `rec` signed by the agent `key`."""
    return sign_envelope(ACQUISITION_TYPE, acquisition_payload(rec), key)


def verify_acquisition(envelope: bytes, trusted_agent_key: Ed25519PublicKey,
                       expected_agent_id: str | None = None) -> AcquisitionRecord:
    """Verify signature, then type, then parse; return the AcquisitionRecord."""
    verified = verify_envelope(envelope, ACQUISITION_TYPE, [trusted_agent_key],
                               max_size=MAX_ACQUISITION_ENVELOPE_BYTES)
    rec = parse_acquisition_payload(verified.payload)
    if expected_agent_id is not None and rec.agent_id != expected_agent_id:
        raise FormatError(f"acquisition record is for agent {rec.agent_id!r}, "
                          f"expected {expected_agent_id!r}")
    return rec
