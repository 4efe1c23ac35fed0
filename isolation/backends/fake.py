"""A stateful fake firewall backend for logic tests: records rule sets, simulates failures,
read-back mismatches, drift and tracked connections. It touches no real firewall."""

from __future__ import annotations

import logging
import threading

from isolation.backends.base import FirewallBackend, Snapshot, normalize_lines
from isolation.conntrack import Flow, is_allowed
from isolation.errors import ConntrackUnavailableError
from isolation.plan import RuleSet

logger = logging.getLogger(__name__)


class FakeBackend(FirewallBackend):
    """In-memory backend. `listing` is the state of "our table" (None = absent).

    * `fail_next(op, exc)` makes the next call of `op` ("apply", "read_back", "snapshot",
      "restore", "remove", "cut_connections") raise `exc` (default RuntimeError).
    * `tamper_on_apply` stores this listing instead of the correct one (read-back mismatch).
    * `drift("missing" | "altered")` changes the state behind the backend's back.
    * `flows` are tracked connections; `conntrack_available=False` simulates a missing tool.
    """

    name = "fake"

    def __init__(
        self,
        netns: str | None = None,
        *,
        is_available: bool = True,
        preexisting: str | None = None,
    ) -> None:
        super().__init__(netns)
        self.is_available = is_available
        self.listing: str | None = preexisting
        self.applied: list[RuleSet] = []
        self.restored: list[Snapshot] = []
        self.calls: list[str] = []
        self.tamper_on_apply: str | None = None
        self.flows: list[Flow] = []
        self.conntrack_available = True
        self._failures: dict[str, BaseException] = {}
        self._lock = threading.Lock()

    def fail_next(self, op: str, exc: BaseException | None = None) -> None:
        with self._lock:
            self._failures[op] = exc if exc is not None else RuntimeError(f"simulated {op}")

    def drift(self, kind: str) -> None:
        with self._lock:
            if kind == "missing":
                self.listing = None
            else:
                self.listing = (self.listing or "") + "\nct state established accept"

    def _hit(self, op: str) -> None:
        with self._lock:
            self.calls.append(op)
            exc = self._failures.pop(op, None)
        if exc is not None:
            raise exc

    def _available(self) -> bool:
        return self.is_available

    def _apply(self, ruleset: RuleSet) -> None:
        self._hit("apply")
        with self._lock:
            self.applied.append(ruleset)
            if self.tamper_on_apply is not None:
                self.listing = self.tamper_on_apply
            else:
                self.listing = normalize_lines(ruleset.nft_listing)

    def _read_back(self) -> str | None:
        self._hit("read_back")
        return self.listing

    def _expected_listing(self, ruleset: RuleSet) -> str:
        return normalize_lines(ruleset.nft_listing)

    def _snapshot(self) -> Snapshot:
        self._hit("snapshot")
        return Snapshot(self.name, self.listing is not None, (("listing", self.listing or ""),))

    def _restore(self, snapshot: Snapshot) -> None:
        self._hit("restore")
        with self._lock:
            self.restored.append(snapshot)
            self.listing = snapshot.part("listing") if snapshot.existed else None

    def _remove(self) -> None:
        self._hit("remove")
        self.listing = None

    def _cut_connections(self, ruleset: RuleSet) -> int:
        self._hit("cut_connections")
        if not self.conntrack_available:
            raise ConntrackUnavailableError("conntrack not installed (fake)", backend="conntrack")
        with self._lock:
            keep = [f for f in self.flows if is_allowed(f, ruleset)]
            cut = len(self.flows) - len(keep)
            self.flows = keep
        return cut
