"""nftables backend (the default): one `table inet ringfence` applied with `nft -f -`.

Apply is one nft transaction (create-if-missing, delete, define), so it is atomic and
idempotent. It touches no other table: other tables survive isolation and release unchanged.

Read-back: `plan()` writes the table in exactly the form `nft list table inet ringfence`
prints it, so after applying, the kernel's listing (indentation and blank lines stripped)
must equal the plan's listing stripped the same way. This checks the table exists, the three
hooked chains have `policy drop`, and every rule matches in content and order; any
difference, including a new nft release printing a rule differently, is reported as drift
(fail closed) with a diff, and the integration tests pin the format for the nft in CI.
"""

from __future__ import annotations

import logging
import shutil

from isolation.backends.base import FirewallBackend, Snapshot, normalize_lines
from isolation.errors import CommandError
from isolation.plan import TABLE_FAMILY, TABLE_NAME, RuleSet

logger = logging.getLogger(__name__)

_RESET = f"add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"


class NftablesBackend(FirewallBackend):
    """Applies the plan's nft transaction; snapshots and restores only `inet ringfence`."""

    name = "nftables"

    def _available(self) -> bool:
        if self.netns is None and shutil.which("nft") is None:
            return False
        self._runner.run("nft", "list", "tables")
        return True

    def _apply(self, ruleset: RuleSet) -> None:
        self._runner.run("nft", "-f", "-", stdin=ruleset.nft_script)

    def _listing(self) -> str | None:
        result = self._runner.run("nft", "list", "table", TABLE_FAMILY, TABLE_NAME, check=False)
        if result.returncode == 0:
            return result.stdout
        if "No such file or directory" in result.stderr:
            return None
        raise CommandError(
            f"nft list table failed: {result.stderr.strip()[:500]}",
            backend=self.name,
            argv=("nft", "list", "table", TABLE_FAMILY, TABLE_NAME),
            returncode=result.returncode,
            stderr=result.stderr,
        )

    def _read_back(self) -> str | None:
        listing = self._listing()
        return None if listing is None else normalize_lines(listing)

    def _expected_listing(self, ruleset: RuleSet) -> str:
        return normalize_lines(ruleset.nft_listing)

    def _snapshot(self) -> Snapshot:
        listing = self._listing()
        return Snapshot(
            backend=self.name,
            existed=listing is not None,
            parts=(("listing", listing or ""),),
        )

    def _restore(self, snapshot: Snapshot) -> None:
        script = _RESET + (snapshot.part("listing") if snapshot.existed else "")
        self._runner.run("nft", "-f", "-", stdin=script)

    def _remove(self) -> None:
        self._runner.run("nft", "-f", "-", stdin=_RESET)
