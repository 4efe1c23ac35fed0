"""The one abstract firewall-backend interface and the `Snapshot` record it produces.

Public methods are template methods: they call the implementer's protected `_apply`,
`_read_back`, ... and translate every failure into the isolation package's errors with
`raise ... from e`. This module knows no concrete firewall; backends never import each other.
"""

from __future__ import annotations

import abc
import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from isolation import conntrack
from isolation._run import DEFAULT_TIMEOUT_S, Runner
from isolation.errors import BackendError, DriftError, IsolationError
from isolation.plan import RuleSet

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """The pre-isolation state of everything a backend touches, enough to restore it exactly.

    `existed` says whether ringfence's own rules were present; `parts` holds backend-specific
    texts (e.g. the nftables table listing, or iptables-save output per family).
    """

    backend: str
    existed: bool
    parts: tuple[tuple[str, str], ...] = ()

    def part(self, key: str) -> str:
        for k, v in self.parts:
            if k == key:
                return v
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "existed": self.existed, "parts": dict(self.parts)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        parts = data["parts"]
        if not isinstance(parts, dict):
            raise TypeError("snapshot parts must be an object")
        return cls(
            backend=str(data["backend"]),
            existed=bool(data["existed"]),
            parts=tuple(sorted((str(k), str(v)) for k, v in parts.items())),
        )


@dataclass(frozen=True)
class Verified:
    """Proof that the rules in force match the plan: the listing read back and the plan hash."""

    listing: str
    ruleset_sha256: str


def normalize_lines(text: str) -> str:
    """Strip indentation and blank lines so listings compare independently of whitespace."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


class FirewallBackend(abc.ABC):
    """Applies, reads back, snapshots, restores and removes ringfence's firewall rules.

    `netns` runs every command inside that named network namespace (tests, demo); None means
    the caller's own namespace (production).
    """

    name: ClassVar[str] = "abstract"

    def __init__(self, netns: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.netns = netns
        self._runner = Runner(self.name, netns, timeout_s)

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except IsolationError:
            raise
        except Exception as e:  # translate everything else; the caller decides what to do
            raise BackendError(f"{self.name}: {op} failed: {e}", backend=self.name) from e

    def available(self) -> bool:
        """Whether this backend can work here. Never raises; logs why not."""
        try:
            return self._available()
        except Exception as e:  # noqa: BLE001 -- probing must never crash selection
            logger.info("backend %s unavailable: %s", self.name, e)
            return False

    def apply(self, ruleset: RuleSet) -> None:
        """Put `ruleset` in force (atomically where the backend can)."""
        logger.info("%s: applying ruleset %s", self.name, ruleset.sha256)
        self._call("apply", lambda: self._apply(ruleset))

    def read_back(self) -> str | None:
        """The normalized listing of ringfence's rules in force, or None if absent."""
        return self._call("read_back", self._read_back)

    def expected_listing(self, ruleset: RuleSet) -> str:
        """What `read_back()` returns when exactly `ruleset` is in force (pure)."""
        return self._call("expected_listing", lambda: self._expected_listing(ruleset))

    def verify(self, ruleset: RuleSet) -> Verified:
        """Check the rules in force equal the plan; raise DriftError describing any difference."""
        expected = self.expected_listing(ruleset)
        found = self.read_back()
        if found is None:
            raise DriftError(
                f"{self.name}: ringfence rules are missing",
                backend=self.name,
                kind="missing",
                expected_sha256=ruleset.sha256,
                found=None,
                diff="".join(
                    difflib.unified_diff(expected.splitlines(True), [], "expected", "found")
                ),
            )
        if found != expected:
            diff = "\n".join(
                difflib.unified_diff(
                    expected.splitlines(), found.splitlines(), "expected", "found", lineterm=""
                )
            )
            raise DriftError(
                f"{self.name}: ringfence rules were altered",
                backend=self.name,
                kind="altered",
                expected_sha256=ruleset.sha256,
                found=found,
                diff=diff,
            )
        return Verified(listing=found, ruleset_sha256=ruleset.sha256)

    def snapshot(self) -> Snapshot:
        """Record the current state of everything this backend touches."""
        return self._call("snapshot", self._snapshot)

    def restore(self, snapshot: Snapshot) -> None:
        """Return to exactly the state recorded in `snapshot`."""
        if snapshot.backend != self.name:
            raise BackendError(
                f"snapshot was taken by backend {snapshot.backend!r}, not {self.name!r}",
                backend=self.name,
            )
        logger.info("%s: restoring snapshot (existed=%s)", self.name, snapshot.existed)
        self._call("restore", lambda: self._restore(snapshot))

    def remove(self) -> None:
        """Remove ringfence's rules (idempotent)."""
        self._call("remove", self._remove)

    def cut_connections(self, ruleset: RuleSet) -> int:
        """Delete tracked connections `ruleset` does not allow; return how many were cut.

        Raises ConntrackUnavailableError when conntrack is missing or fails: callers must
        report that loudly (the rules still drop the packets, but the cut is unconfirmed).
        """
        return self._call("cut_connections", lambda: self._cut_connections(ruleset))

    @abc.abstractmethod
    def _available(self) -> bool: ...

    @abc.abstractmethod
    def _apply(self, ruleset: RuleSet) -> None: ...

    @abc.abstractmethod
    def _read_back(self) -> str | None: ...

    @abc.abstractmethod
    def _expected_listing(self, ruleset: RuleSet) -> str: ...

    @abc.abstractmethod
    def _snapshot(self) -> Snapshot: ...

    @abc.abstractmethod
    def _restore(self, snapshot: Snapshot) -> None: ...

    @abc.abstractmethod
    def _remove(self) -> None: ...

    def _cut_connections(self, ruleset: RuleSet) -> int:
        runner = Runner("conntrack", self.netns, self._runner.timeout_s)
        # In our own namespace the kernel's table is read directly (no process start).
        proc = conntrack.PROC_TABLE if self.netns is None else None
        return conntrack.cut_connections(runner, ruleset, proc)
