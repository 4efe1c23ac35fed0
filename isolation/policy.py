"""Isolation policy: what stays reachable while a host is isolated, with strict validation.

A `Policy` holds addresses only (never host names: names are resolved on the server, never on
the compromised host) and is canonical: equal policies serialize to identical JSON. It plans
no rules and touches no system state; see `isolation.plan` for that.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any

from isolation.errors import PolicyError

logger = logging.getLogger(__name__)

POLICY_VERSION = 1
MAX_POLICY_JSON_BYTES = 64 * 1024
MAX_ENTRIES = 256
MIN_CONFIRM_DEADLINE_S = 1.0
MAX_CONFIRM_DEADLINE_S = 600.0

PROTOCOLS = ("tcp", "udp", "any")
DIRECTIONS = ("in", "out", "both")


def _address(value: object, where: str) -> str:
    """Return the canonical text of an IPv4/IPv6 address or raise PolicyError."""
    if not isinstance(value, str):
        raise PolicyError("must be an IP address string", field=where, value=value)
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError as e:
        raise PolicyError(
            f"not an IPv4/IPv6 address (host names are not accepted): {value!r}",
            field=where,
            value=value,
        ) from e


def _cidr(value: object, where: str) -> str:
    """Return the canonical text of a network (host bits must be zero) or raise PolicyError."""
    if not isinstance(value, str):
        raise PolicyError("must be a CIDR string", field=where, value=value)
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise PolicyError(f"bad CIDR {value!r}: {e}", field=where, value=value) from e
    if network.prefixlen == 0:
        # A /0 allow rule would silently turn isolation into no isolation.
        raise PolicyError("a /0 network would allow everything", field=where, value=value)
    return network.compressed


def _port(value: object, where: str, *, allow_zero: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError("must be an integer", field=where, value=value)
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise PolicyError(f"port {value} out of range {low}..65535", field=where, value=value)
    return value


@dataclass(frozen=True, order=True)
class CollectorEndpoint:
    """A collector address the agent must keep reaching: `address` and TCP `port`."""

    address: str
    port: int
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _address(self.address, "collectors.address"))
        _port(self.port, "collectors.port", allow_zero=False)
        if self.protocol != "tcp":
            raise PolicyError(
                "collector protocol must be 'tcp'", field="collectors.protocol", value=self.protocol
            )

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True, order=True)
class AllowRule:
    """A responder allowlist entry.

    `protocol` is tcp, udp or any; `port` 0 means any port (and is the only value allowed with
    protocol any). `direction` out means the isolated host initiates towards `cidr` (port is the
    peer's port), in means hosts in `cidr` initiate towards this host (port is the local port),
    both means either.
    """

    cidr: str
    protocol: str = "any"
    port: int = 0
    direction: str = "both"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cidr", _cidr(self.cidr, "allow.cidr"))
        if self.protocol not in PROTOCOLS:
            raise PolicyError(
                f"protocol must be one of {PROTOCOLS}", field="allow.protocol", value=self.protocol
            )
        _port(self.port, "allow.port", allow_zero=True)
        if self.protocol == "any" and self.port != 0:
            raise PolicyError(
                "a port needs protocol tcp or udp", field="allow.port", value=self.port
            )
        if self.direction not in DIRECTIONS:
            raise PolicyError(
                f"direction must be one of {DIRECTIONS}",
                field="allow.direction",
                value=self.direction,
            )

    @property
    def version(self) -> int:
        return ipaddress.ip_network(self.cidr).version


@dataclass(frozen=True)
class Policy:
    """Everything the isolated host may still talk to.

    Defaults: no DNS resolvers, DHCP (and DHCPv6 + router discovery) allowed, empty allowlist,
    20 s confirm deadline. A policy without a collector endpoint is refused (fail closed: the
    agent would lock the responder out). Entries are sorted and de-duplicated on construction,
    so equal policies compare and serialize identically.
    """

    collectors: tuple[CollectorEndpoint, ...]
    dns_resolvers: tuple[str, ...] = ()
    dhcp: bool = True
    allow: tuple[AllowRule, ...] = ()
    confirm_deadline_s: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.collectors, tuple) or not self.collectors:
            raise PolicyError(
                "at least one collector endpoint is required (refusing to isolate without a "
                "management channel)",
                field="collectors",
                value=self.collectors,
            )
        for name in ("collectors", "dns_resolvers", "allow"):
            entries = getattr(self, name)
            if not isinstance(entries, tuple):
                raise PolicyError("must be a tuple", field=name, value=entries)
            if len(entries) > MAX_ENTRIES:
                raise PolicyError(
                    f"more than {MAX_ENTRIES} entries", field=name, value=len(entries)
                )
        for c in self.collectors:
            if not isinstance(c, CollectorEndpoint):
                raise PolicyError("must be CollectorEndpoint", field="collectors", value=c)
        for a in self.allow:
            if not isinstance(a, AllowRule):
                raise PolicyError("must be AllowRule", field="allow", value=a)
        resolvers = tuple(_address(r, "dns_resolvers") for r in self.dns_resolvers)
        if not isinstance(self.dhcp, bool):
            raise PolicyError("must be a boolean", field="dhcp", value=self.dhcp)
        deadline = self.confirm_deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
            raise PolicyError("must be a number", field="confirm_deadline_s", value=deadline)
        if not MIN_CONFIRM_DEADLINE_S <= deadline <= MAX_CONFIRM_DEADLINE_S:
            raise PolicyError(
                f"must be within {MIN_CONFIRM_DEADLINE_S}..{MAX_CONFIRM_DEADLINE_S} s",
                field="confirm_deadline_s",
                value=deadline,
            )
        object.__setattr__(self, "collectors", _canonical(self.collectors, _endpoint_key))
        object.__setattr__(self, "dns_resolvers", _canonical(resolvers, _address_key))
        object.__setattr__(self, "allow", _canonical(self.allow, _allow_key))
        object.__setattr__(self, "confirm_deadline_s", float(deadline))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": POLICY_VERSION,
            "collectors": [
                {"address": c.address, "port": c.port, "protocol": c.protocol}
                for c in self.collectors
            ],
            "dns_resolvers": list(self.dns_resolvers),
            "dhcp": self.dhcp,
            "allow": [
                {"cidr": a.cidr, "protocol": a.protocol, "port": a.port, "direction": a.direction}
                for a in self.allow
            ],
            "confirm_deadline_s": self.confirm_deadline_s,
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no insignificant whitespace, sorted entries."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError("policy must be a JSON object", field="policy", value=type(data))
        _keys(
            data,
            "policy",
            required={"version", "collectors"},
            optional={"dns_resolvers", "dhcp", "allow", "confirm_deadline_s"},
        )
        if data["version"] != POLICY_VERSION:
            raise PolicyError(
                f"unsupported policy version (expected {POLICY_VERSION})",
                field="version",
                value=data["version"],
            )
        collectors = []
        for i, raw in enumerate(_list(data["collectors"], "collectors")):
            where = f"collectors[{i}]"
            if not isinstance(raw, dict):
                raise PolicyError("must be an object", field=where, value=raw)
            _keys(raw, where, required={"address", "port"}, optional={"protocol"})
            collectors.append(
                CollectorEndpoint(
                    address=_address(raw["address"], f"{where}.address"),
                    port=_port(raw["port"], f"{where}.port", allow_zero=False),
                    protocol=_str(raw.get("protocol", "tcp"), f"{where}.protocol"),
                )
            )
        allow = []
        for i, raw in enumerate(_list(data.get("allow", []), "allow")):
            where = f"allow[{i}]"
            if not isinstance(raw, dict):
                raise PolicyError("must be an object", field=where, value=raw)
            _keys(raw, where, required={"cidr"}, optional={"protocol", "port", "direction"})
            allow.append(
                AllowRule(
                    cidr=_cidr(raw["cidr"], f"{where}.cidr"),
                    protocol=_str(raw.get("protocol", "any"), f"{where}.protocol"),
                    port=_port(raw.get("port", 0), f"{where}.port", allow_zero=True),
                    direction=_str(raw.get("direction", "both"), f"{where}.direction"),
                )
            )
        resolvers = [
            _address(r, f"dns_resolvers[{i}]")
            for i, r in enumerate(_list(data.get("dns_resolvers", []), "dns_resolvers"))
        ]
        return cls(
            collectors=tuple(collectors),
            dns_resolvers=tuple(resolvers),
            dhcp=data.get("dhcp", True),
            allow=tuple(allow),
            confirm_deadline_s=data.get("confirm_deadline_s", 20.0),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Policy:
        """Parse and validate policy JSON; raise PolicyError naming the bad field."""
        if len(text) > MAX_POLICY_JSON_BYTES:
            raise PolicyError(
                f"policy JSON larger than {MAX_POLICY_JSON_BYTES} bytes",
                field="policy",
                value=len(text),
            )
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise PolicyError(f"not valid JSON: {e}", field="policy") from e
        return cls.from_dict(data)


def _canonical(entries: tuple[Any, ...], key: Any) -> tuple[Any, ...]:
    return tuple(sorted(set(entries), key=key))


def _address_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


def _endpoint_key(c: CollectorEndpoint) -> tuple[int, int, int, str]:
    return (*_address_key(c.address), c.port, c.protocol)


def _allow_key(a: AllowRule) -> tuple[int, int, int, str, int, str]:
    net = ipaddress.ip_network(a.cidr)
    return (net.version, int(net.network_address), net.prefixlen, a.protocol, a.port, a.direction)


def _keys(raw: dict[str, Any], where: str, *, required: set[str], optional: set[str]) -> None:
    missing = required - raw.keys()
    if missing:
        raise PolicyError(f"missing keys {sorted(missing)}", field=where)
    unknown = raw.keys() - required - optional
    if unknown:
        raise PolicyError(f"unknown keys {sorted(unknown)}", field=where)


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError("must be a list", field=where, value=value)
    if len(value) > MAX_ENTRIES:
        raise PolicyError(f"more than {MAX_ENTRIES} entries", field=where, value=len(value))
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise PolicyError("must be a string", field=where, value=value)
    return value


__all__ = ["POLICY_VERSION", "AllowRule", "CollectorEndpoint", "Policy"]
