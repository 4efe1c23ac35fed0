"""Blocking indicators without isolating: a separate `table inet ringfence_block` that drops
traffic to and from a list of addresses, IPv4 and IPv6, in one atomic nft transaction.

`plan_block(networks)` is pure and deterministic (validated, normalized, de-duplicated,
sorted): it returns the nft script and the exact listing nft prints for it, so the applied
table can be read back and compared like isolation's. `BlockFirewall` applies, verifies and
removes it. The table never touches `inet ringfence` (isolation) or anything else: both can
be in force at once, and a drop in either wins. Policy `accept`: only the listed addresses
are dropped, in every state (existing connections to them die as well). Standard library only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from isolation._run import Runner
from isolation.backends.base import normalize_lines
from isolation.errors import CommandError, DriftError, PolicyError

logger = logging.getLogger(__name__)

BLOCK_TABLE = "ringfence_block"
BLOCK_FAMILY = "inet"
MAX_NETWORKS = 4096
# Before isolation's chains (priority filter): a block is dropped even if isolation allows it.
PRIORITY = -10
_RESET = f"add table {BLOCK_FAMILY} {BLOCK_TABLE}\ndelete table {BLOCK_FAMILY} {BLOCK_TABLE}\n"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BlockRuleSet:
    networks: tuple[str, ...]    # normalized, sorted (IPv4 first)
    nft_script: str
    nft_listing: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.nft_listing.encode()).hexdigest()


def _parse(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise PolicyError(f"{text!r} is not an IP address or CIDR", field="networks",
                          value=text) from e


def _show(net: Network) -> str:
    """How nft prints a network: a host route as the bare address, else address/prefix."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def normalize_networks(networks: Sequence[str]) -> tuple[str, ...]:
    """Validate, normalize, de-duplicate and sort; fail closed on an empty list."""
    if not networks:
        raise PolicyError("at least one address or CIDR is needed", field="networks")
    if len(networks) > MAX_NETWORKS:
        raise PolicyError(f"at most {MAX_NETWORKS} networks can be blocked",
                          field="networks", value=len(networks))
    parsed = {_parse(n) for n in networks}
    for net in parsed:
        if net.prefixlen == 0:
            raise PolicyError(f"{net} blocks every address; isolate the host instead",
                              field="networks", value=str(net))
        if net.is_loopback or net.network_address.is_loopback:
            raise PolicyError(f"{net} is loopback; blocking it breaks the host itself",
                              field="networks", value=str(net))
    ordered = sorted(parsed, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return tuple(_show(n) for n in ordered)


def _rules(direction: str, networks: tuple[str, ...]) -> list[str]:
    lines = []
    for text in networks:
        family = "ip6" if ":" in text else "ip"
        lines.append(f"{family} {direction} {text} drop")
    return lines


def plan_block(networks: Sequence[str]) -> BlockRuleSet:
    """The table that drops traffic to and from `networks`. Pure."""
    nets = normalize_networks(networks)
    chains = [("input", _rules("saddr", nets)), ("output", _rules("daddr", nets)),
              ("forward", _rules("saddr", nets) + _rules("daddr", nets))]
    body: list[str] = [f"table {BLOCK_FAMILY} {BLOCK_TABLE} {{"]
    for i, (hook, rules) in enumerate(chains):
        if i:
            body.append("")
        body.append(f"\tchain {hook} {{")
        body.append(f"\t\ttype filter hook {hook} priority filter - {-PRIORITY}; policy accept;")
        body.extend(f"\t\t{r}" for r in rules)
        body.append("\t}")
    body.append("}")
    listing = "\n".join(body) + "\n"
    return BlockRuleSet(nets, _RESET + listing, listing)


class BlockFirewall:
    """Applies and removes the block table with nft, in `netns` (tests) or the agent's own
    network namespace (production)."""

    name = "nftables"

    def __init__(self, netns: str | None = None) -> None:
        self._runner = Runner("nftables", netns)

    def listing(self) -> str | None:
        result = self._runner.run("nft", "list", "table", BLOCK_FAMILY, BLOCK_TABLE, check=False)
        if result.returncode == 0:
            return result.stdout
        if "No such file or directory" in result.stderr:
            return None
        raise CommandError(f"nft list table failed: {result.stderr.strip()[:500]}",
                           backend=self.name, argv=("nft", "list", "table", BLOCK_TABLE),
                           returncode=result.returncode, stderr=result.stderr)

    def apply(self, ruleset: BlockRuleSet) -> str:
        """Apply atomically (replacing any previous block table) and verify the read-back;
        returns the listing in force. On a mismatch the table is removed (fail closed would
        mean blocking unknown things) and DriftError raised."""
        self._runner.run("nft", "-f", "-", stdin=ruleset.nft_script)
        found = self.listing()
        if found is None or normalize_lines(found) != normalize_lines(ruleset.nft_listing):
            self.remove()
            raise DriftError("the block table read back differs from the plan; removed it",
                             backend=self.name, kind="missing" if found is None else "altered",
                             expected_sha256=ruleset.sha256, found=found, diff="")
        return found

    def remove(self) -> bool:
        """Delete the table; returns whether it existed."""
        existed = self.listing() is not None
        self._runner.run("nft", "-f", "-", stdin=_RESET)
        return existed
