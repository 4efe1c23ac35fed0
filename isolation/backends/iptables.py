"""iptables fallback backend: dedicated RINGFENCE-IN/OUT/FWD chains in the filter table.

Rules are loaded with `iptables-restore --noflush` and `ip6tables-restore --noflush`, each an
atomic commit of its family's filter table; the two families are two commits, so a failure
between them is reported and the caller restores the snapshot. The snapshot is
`iptables-save -t filter` per family; restoring replaces each filter table with its saved
text exactly (or, where no filter table existed, removes ringfence's chains).
"""

from __future__ import annotations

import logging
import shutil

from isolation.backends.base import FirewallBackend, Snapshot
from isolation.plan import (
    CHAINS,
    IPTABLES_CHAINS,
    IPTABLES_HOOKS,
    RuleSet,
    iptables_chain_lines,
    iptables_jump_lines,
)

logger = logging.getLogger(__name__)

_TOOLS = {
    4: ("iptables", "iptables-save", "iptables-restore"),
    6: ("ip6tables", "ip6tables-save", "ip6tables-restore"),
}
_MAX_JUMP_DELETES = 16


def _ours(line: str) -> bool:
    return line.startswith("-A RINGFENCE-") or line in iptables_jump_lines()


def _normalize(lines: list[str]) -> list[str]:
    # iptables-save may list chains in any order (nft-backed sorts them); order within a
    # chain is what matters, so group by chain with a stable sort.
    return sorted(lines, key=lambda line: line.split()[1])


class IptablesBackend(FirewallBackend):
    """Fallback for hosts without nftables (legacy or nft-backed iptables)."""

    name = "iptables"

    def _available(self) -> bool:
        for version in (4, 6):
            for tool in _TOOLS[version]:
                if self.netns is None and shutil.which(tool) is None:
                    return False
            self._runner.run(_TOOLS[version][1], "-t", "filter")
        return True

    def _save(self, version: int) -> str:
        return self._runner.run(_TOOLS[version][1], "-t", "filter").stdout

    def _apply(self, ruleset: RuleSet) -> None:
        for version, script in ((6, ruleset.iptables_v6), (4, ruleset.iptables_v4)):
            saved = self._save(version).splitlines()
            lines = []
            for line in script.splitlines():
                if line.startswith("-I "):
                    hook, chain = line.split()[1], line.split()[-1]
                    if f"-A {hook} -j {chain}" in saved:
                        continue  # jump already there: re-applying must not duplicate it
                lines.append(line)
            self._runner.run(_TOOLS[version][2], "--noflush", stdin="\n".join(lines) + "\n")

    def _family_listing(self, version: int) -> list[str] | None:
        saved = self._save(version)
        if f":{IPTABLES_CHAINS['input']} " not in saved:
            return None
        return _normalize([line for line in saved.splitlines() if _ours(line)])

    def _read_back(self) -> str | None:
        v4, v6 = self._family_listing(4), self._family_listing(6)
        if v4 is None and v6 is None:
            return None
        out = [
            "# ipv4",
            *(v4 if v4 is not None else ["# missing"]),
            "# ipv6",
            *(v6 if v6 is not None else ["# missing"]),
        ]
        return "\n".join(out)

    def _expected_listing(self, ruleset: RuleSet) -> str:
        out = []
        for version in (4, 6):
            lines = iptables_chain_lines(ruleset.rules, version) + iptables_jump_lines()
            out += [f"# ipv{version}", *_normalize(lines)]
        return "\n".join(out)

    def _snapshot(self) -> Snapshot:
        v4, v6 = self._save(4), self._save(6)
        existed = any(f":{c} " in s for s in (v4, v6) for c in IPTABLES_CHAINS.values())
        return Snapshot(backend=self.name, existed=existed, parts=(("v4", v4), ("v6", v6)))

    def _restore(self, snapshot: Snapshot) -> None:
        for version in (6, 4):
            saved = snapshot.part(f"v{version}")
            if "*filter" in saved:
                # Without --noflush the filter table is replaced atomically by the saved one.
                self._runner.run(_TOOLS[version][2], stdin=saved)
            else:
                self._remove_family(version)

    def _remove(self) -> None:
        for version in (6, 4):
            self._remove_family(version)

    def _remove_family(self, version: int) -> None:
        tool = _TOOLS[version][0]
        saved = self._save(version)
        for c in CHAINS:
            hook, chain = IPTABLES_HOOKS[c], IPTABLES_CHAINS[c]
            for _ in range(_MAX_JUMP_DELETES):
                if self._runner.run(tool, "-D", hook, "-j", chain, check=False).returncode:
                    break
        for chain in IPTABLES_CHAINS.values():
            if f":{chain} " in saved:
                self._runner.run(tool, "-F", chain)
                self._runner.run(tool, "-X", chain)
