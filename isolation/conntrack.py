"""Cut tracked connections that an isolation rule set does not allow, via `conntrack`.

Parsing and the allow decision are pure (`parse_flows`, `is_allowed`); `cut_connections`
runs `conntrack -L`/`-D`. It does not change firewall rules.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from isolation._run import Runner
from isolation.errors import CommandError, ConntrackUnavailableError
from isolation.plan import RuleSet

logger = logging.getLogger(__name__)

MAX_FLOWS = 100_000


@dataclass(frozen=True)
class Flow:
    """The original-direction tuple of one conntrack entry."""

    family: str  # "ip" or "ip6"
    l4: str
    src: str
    dst: str
    sport: int = 0
    dport: int = 0


def parse_flows(text: str) -> list[Flow]:
    """Parse `conntrack -L -o extended` output; lines that are not entries are skipped."""
    flows: list[Flow] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] not in ("ipv4", "ipv6"):
            continue
        values: dict[str, str] = {}
        for f in fields:
            key, sep, value = f.partition("=")
            if sep and key not in values:  # first occurrence = original direction
                values[key] = value
        if "src" not in values or "dst" not in values:
            continue
        flows.append(
            Flow(
                family="ip" if fields[0] == "ipv4" else "ip6",
                l4=fields[2],
                src=ipaddress.ip_address(values["src"]).compressed,
                dst=ipaddress.ip_address(values["dst"]).compressed,
                sport=int(values.get("sport", "0")),
                dport=int(values.get("dport", "0")),
            )
        )
        if len(flows) >= MAX_FLOWS:
            break
    return flows


def is_allowed(flow: Flow, ruleset: RuleSet) -> bool:
    """Whether both directions of `flow` pass `ruleset`, whichever end is local.

    Loopback flows (and flows from an address to itself) are always allowed, as the rules
    accept everything on `lo`.
    """
    src, dst = ipaddress.ip_address(flow.src), ipaddress.ip_address(flow.dst)
    if src.is_loopback or dst.is_loopback or src == dst:
        return True
    f, p = flow.family, flow.l4
    local_initiated = ruleset.accepts(
        "output", f, flow.src, flow.dst, p, flow.sport, flow.dport, original=True
    ) and ruleset.accepts("input", f, flow.dst, flow.src, p, flow.dport, flow.sport)
    remote_initiated = ruleset.accepts(
        "input", f, flow.src, flow.dst, p, flow.sport, flow.dport, original=True
    ) and ruleset.accepts("output", f, flow.dst, flow.src, p, flow.dport, flow.sport)
    return local_initiated or remote_initiated


PROC_TABLE = Path("/proc/net/nf_conntrack")


def _flows_from_proc(table: Path) -> list[Flow] | None:
    """The caller's own namespace's flows read from the kernel's table (same line format as
    `conntrack -L -o extended`, both families), or None when it cannot be used."""
    if shutil.which("conntrack") is None:
        return None  # the -L path below reports the missing tool loudly
    try:
        return parse_flows(table.read_text())
    except (OSError, ValueError) as e:
        logger.info("cannot read %s (%s); listing with conntrack -L", table, e)
        return None


def cut_connections(runner: Runner, ruleset: RuleSet, proc_table: Path | None = None) -> int:
    """Delete every tracked flow `ruleset` does not allow; return the number deleted.

    With `proc_table` (only valid when `runner` runs in the caller's own namespace) flows are
    read from that file, which costs no process start; otherwise, or when it is unreadable,
    with `conntrack -L`. Raises ConntrackUnavailableError when the conntrack tool is missing
    or listing fails.
    """
    if proc_table is not None and runner.netns is None:
        listed_flows = _flows_from_proc(proc_table)
        if listed_flows is not None:
            return _delete(runner, ruleset, listed_flows)
    flows: list[Flow] = []
    # Both families are listed concurrently: each listing is a process start, and this runs
    # between applying the rules and reporting the host contained.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="conntrack") as pool:
        listings = [
            pool.submit(runner.run, "conntrack", "-L", "-f", family, "-o", "extended")
            for family in ("ipv4", "ipv6")
        ]
        for listing in listings:
            try:
                listed = listing.result()
            except CommandError as e:
                raise ConntrackUnavailableError(
                    f"cannot list connections with conntrack: {e.message}", backend="conntrack"
                ) from e
            flows.extend(parse_flows(listed.stdout))
    return _delete(runner, ruleset, flows)


def _delete(runner: Runner, ruleset: RuleSet, flows: list[Flow]) -> int:
    cut = 0
    for flow in flows:
        if is_allowed(flow, ruleset):
            continue
        argv = [
            "conntrack",
            "-D",
            "-f",
            "ipv4" if flow.family == "ip" else "ipv6",
            "-p",
            flow.l4,
            "-s",
            flow.src,
            "-d",
            flow.dst,
        ]
        if flow.l4 in ("tcp", "udp", "sctp", "dccp", "udplite"):
            argv += ["--sport", str(flow.sport), "--dport", str(flow.dport)]
        try:
            result = runner.run(*argv, check=False)
        except CommandError as e:
            raise ConntrackUnavailableError(
                f"conntrack -D failed: {e.message}", backend="conntrack"
            ) from e
        if result.returncode == 0:
            cut += 1
            logger.info(
                "cut %s %s %s:%d -> %s:%d",
                flow.family,
                flow.l4,
                flow.src,
                flow.sport,
                flow.dst,
                flow.dport,
            )
        else:
            # Usually the entry expired between listing and deleting.
            logger.debug("conntrack -D found nothing for %s: %s", flow, result.stderr.strip())
    return cut
