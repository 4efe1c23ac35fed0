"""Trustworthy evidence for ringfence: hash chain, DSSE signing, checkpoints, acquisition
records, and the bundle format with its offline verifier.

Depends on `cryptography` and the standard library only; it never parses protobuf events
(callers supply an `EventCodec`) and performs no network IO.
"""

from evidence.acquisition import AcquisitionRecord, sign_acquisition, verify_acquisition
from evidence.bundle import (
    BuiltBundle,
    BundleManifest,
    EventCodec,
    EventInfo,
    MemberCheck,
    TrustSet,
    VerifiedBundle,
    build_bundle,
    format_report,
    iter_frames,
    report_to_dicts,
    verify_bundle,
)
from evidence.chain import GENESIS_HASH, ChainVerifier, chain_head, link, verify_chain
from evidence.checkpoint import Checkpoint, sign_checkpoint, verify_checkpoint
from evidence.dsse import (
    ACQUISITION_TYPE,
    AUDIT_TYPE,
    CHECKPOINT_TYPE,
    COMMAND_TYPE,
    MANIFEST_TYPE,
    VerifiedEnvelope,
    pae,
    sign_envelope,
    verify_envelope,
)
from evidence.errors import (
    BundleBuildError,
    BundleVerificationError,
    ChainError,
    EvidenceError,
    EvidenceIOError,
    FormatError,
    IntegrityError,
    PayloadTypeError,
    SignatureError,
    TrustError,
)
from evidence.keys import key_id

__all__ = [
    "ACQUISITION_TYPE", "AUDIT_TYPE", "CHECKPOINT_TYPE", "COMMAND_TYPE", "GENESIS_HASH",
    "MANIFEST_TYPE", "AcquisitionRecord", "BuiltBundle", "BundleBuildError", "BundleManifest",
    "BundleVerificationError", "ChainError", "ChainVerifier", "Checkpoint", "EventCodec",
    "EventInfo", "EvidenceError", "EvidenceIOError", "FormatError", "IntegrityError",
    "MemberCheck", "PayloadTypeError", "SignatureError", "TrustError", "TrustSet",
    "VerifiedBundle", "VerifiedEnvelope", "build_bundle", "chain_head", "format_report",
    "iter_frames", "key_id", "link", "pae", "report_to_dicts", "sign_acquisition", "sign_checkpoint",
    "sign_envelope", "verify_acquisition", "verify_bundle", "verify_chain", "verify_checkpoint",
    "verify_envelope",
]
