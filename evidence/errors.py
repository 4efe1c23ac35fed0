"""Exceptions raised by the evidence package; it defines no behaviour of its own.

Every error the package raises derives from `EvidenceError` and carries structured fields
so callers (collector, server, CLI) can map them to alerts or exit codes without parsing text::

    EvidenceError
    +-- IntegrityError                the data is bad (tampered, malformed, mis-signed)
    |   +-- ChainError(seq, reason)         hash chain or seq rules violated at `seq`
    |   +-- SignatureError(reason, keyid)   no valid signature by a trusted key
    |   +-- FormatError(reason, member)     bytes do not parse as the expected format
    |   |   +-- PayloadTypeError(expected, actual)   signed, but not the media type asked for
    |   +-- BundleVerificationError(report) a bundle failed one or more checks
    |   +-- BundleBuildError(reason)        inputs handed to the bundle builder disagree
    +-- TrustError(reason)            the caller's trust configuration is unusable (empty)
    +-- EvidenceIOError(path, reason) the operating system failed (read/write a key or bundle)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - import only for annotations
    from evidence.bundle import MemberCheck


class EvidenceError(Exception):
    """Root of every exception raised by the evidence package."""


class IntegrityError(EvidenceError):
    """The evidence itself is bad: tampered, malformed or signed by the wrong key."""


class ChainError(IntegrityError):
    """The hash chain or its sequence rules are violated at `seq`."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"chain error at seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class SignatureError(IntegrityError):
    """No signature by a trusted key verifies (`keyid` names the offending key when known)."""

    def __init__(self, reason: str, keyid: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.keyid = keyid


class FormatError(IntegrityError):
    """Bytes do not parse as the expected format (`member` names the bundle member, if any)."""

    def __init__(self, reason: str, member: str | None = None) -> None:
        super().__init__(f"{member}: {reason}" if member else reason)
        self.reason = reason
        self.member = member


class PayloadTypeError(FormatError):
    """A correctly signed envelope carries a payloadType other than the one expected."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"payloadType is {actual!r}, expected {expected!r}")
        self.expected = expected
        self.actual = actual


class BundleVerificationError(IntegrityError):
    """A bundle failed verification; `report` lists every check, failing ones with reasons."""

    def __init__(self, report: Sequence[MemberCheck]) -> None:
        self.report = tuple(report)
        failures = [c for c in self.report if not c.ok]
        summary = "; ".join(f"{c.member}: {c.reason}" for c in failures[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"bundle verification failed: {summary}{more}")

    @property
    def failures(self) -> tuple[MemberCheck, ...]:
        """The failing checks only."""
        return tuple(c for c in self.report if not c.ok)


class BundleBuildError(IntegrityError):
    """The inputs given to the bundle builder are inconsistent; no bundle was produced."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrustError(EvidenceError):
    """The trust configuration is unusable (for example empty); verification fails closed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EvidenceIOError(EvidenceError):
    """The operating system failed while reading or writing `path`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
