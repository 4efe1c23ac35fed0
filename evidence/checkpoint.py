"""Agent-signed chain checkpoints: (agent_id, seq, head, time_ns) in a DSSE envelope.

It defines the canonical payload and sign/verify; it does not decide when agents checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evidence import _canonical
from evidence.dsse import CHECKPOINT_TYPE, sign_envelope, verify_envelope
from evidence.errors import FormatError

logger = logging.getLogger(__name__)

CHECKPOINT_PAYLOAD_KIND = "ringfence.checkpoint"
CHECKPOINT_VERSION = 1
MAX_CHECKPOINT_ENVELOPE_BYTES = 64 * 1024

_FIELDS = {"type", "version", "agent_id", "seq", "head", "time_ns"}


@dataclass(frozen=True)
class Checkpoint:
    """The agent's statement that its chain head after event `seq` is `head`."""

    agent_id: str
    seq: int
    head: bytes
    time_ns: int

    def __post_init__(self) -> None:
        if not self.agent_id:
            raise ValueError("agent_id must not be empty")
        if self.seq < 1:
            raise ValueError("checkpoint seq must be >= 1")
        if len(self.head) != 32:
            raise ValueError("head must be 32 bytes")


def checkpoint_payload(cp: Checkpoint) -> bytes:
    """Canonical JSON payload for `cp` (sorted keys, compact, head as lowercase hex)."""
    return _canonical.dumps({
        "type": CHECKPOINT_PAYLOAD_KIND,
        "version": CHECKPOINT_VERSION,
        "agent_id": cp.agent_id,
        "seq": cp.seq,
        "head": cp.head.hex(),
        "time_ns": cp.time_ns,
    })


def parse_checkpoint_payload(payload: bytes) -> Checkpoint:
    """Parse a (verified) checkpoint payload strictly; FormatError on any deviation."""
    what = "checkpoint"
    obj = _canonical.loads_object(payload, what)
    _canonical.require_keys(obj, _FIELDS, what)
    if obj["type"] != CHECKPOINT_PAYLOAD_KIND:
        raise FormatError(f"{what}: type is {obj['type']!r}")
    if _canonical.get_int(obj, "version", what) != CHECKPOINT_VERSION:
        raise FormatError(f"{what}: unsupported version {obj['version']!r}")
    return Checkpoint(
        agent_id=_canonical.get_str(obj, "agent_id", what),
        seq=_canonical.get_int(obj, "seq", what, minimum=1),
        head=_canonical.get_hex(obj, "head", what, 32),
        time_ns=_canonical.get_int(obj, "time_ns", what, minimum=None),
    )


def sign_checkpoint(cp: Checkpoint, key: Ed25519PrivateKey) -> bytes:
    """Return a DSSE envelope (JSON bytes) over `cp` signed by the agent `key`."""
    return sign_envelope(CHECKPOINT_TYPE, checkpoint_payload(cp), key)


def verify_checkpoint(envelope: bytes, trusted_agent_key: Ed25519PublicKey,
                      expected_agent_id: str | None = None) -> Checkpoint:
    """Verify signature, then type, then parse; return the Checkpoint.

    Raises SignatureError, PayloadTypeError or FormatError (also when the agent id differs
    from `expected_agent_id`).
    """
    verified = verify_envelope(envelope, CHECKPOINT_TYPE, [trusted_agent_key],
                               max_size=MAX_CHECKPOINT_ENVELOPE_BYTES)
    cp = parse_checkpoint_payload(verified.payload)
    if expected_agent_id is not None and cp.agent_id != expected_agent_id:
        raise FormatError(f"checkpoint is for agent {cp.agent_id!r}, "
                          f"expected {expected_agent_id!r}")
    return cp
