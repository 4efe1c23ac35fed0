"""Policy validation and canonical JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from isolation import AllowRule, CollectorEndpoint, Policy, PolicyError

C4 = CollectorEndpoint("198.18.0.1", 8443)
C6 = CollectorEndpoint("2001:db8::1", 8443)


def _doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "version": 1,
        "collectors": [{"address": "198.18.0.1", "port": 8443}],
    }
    doc.update(over)
    return doc


def test_defaults() -> None:
    p = Policy(collectors=(C4,))
    assert p.dns_resolvers == ()
    assert p.dhcp is True
    assert p.allow == ()
    assert p.confirm_deadline_s == 20.0


def test_no_collector_is_refused() -> None:
    with pytest.raises(PolicyError) as e:
        Policy(collectors=())
    assert e.value.field == "collectors"
    with pytest.raises(PolicyError):
        Policy.from_json(json.dumps(_doc(collectors=[])))


def test_json_round_trip_is_canonical_and_order_independent() -> None:
    a = Policy(
        collectors=(C6, C4),
        dns_resolvers=("2001:db8::53", "198.18.0.53"),
        allow=(AllowRule("198.18.9.0/24", "tcp", 22, "in"), AllowRule("2001:db8:9::/48")),
    )
    b = Policy(
        collectors=(C4, C6, C4),
        dns_resolvers=("198.18.0.53", "2001:DB8:0::53"),
        allow=(AllowRule("2001:db8:9::/48"), AllowRule("198.18.9.0/24", "tcp", 22, "in")),
    )
    assert a == b
    assert a.to_json() == b.to_json()
    assert Policy.from_json(a.to_json()) == a
    text = a.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (
            _doc(collectors=[{"address": "collector.example", "port": 8443}]),
            "collectors[0].address",
        ),
        (_doc(collectors=[{"address": "198.18.0.1", "port": 0}]), "collectors[0].port"),
        (_doc(collectors=[{"address": "198.18.0.1", "port": 65536}]), "collectors[0].port"),
        (_doc(collectors=[{"address": "198.18.0.1", "port": True}]), "collectors[0].port"),
        (
            _doc(collectors=[{"address": "198.18.0.1", "port": 1, "protocol": "udp"}]),
            "collectors.protocol",
        ),
        (_doc(allow=[{"cidr": "198.18.0.0/33"}]), "allow[0].cidr"),
        (_doc(allow=[{"cidr": "198.18.0.1/24"}]), "allow[0].cidr"),
        (_doc(allow=[{"cidr": "0.0.0.0/0"}]), "allow[0].cidr"),
        (_doc(allow=[{"cidr": "::/0"}]), "allow[0].cidr"),
        (
            _doc(allow=[{"cidr": "198.18.0.0/24", "port": 70000, "protocol": "tcp"}]),
            "allow[0].port",
        ),
        (_doc(allow=[{"cidr": "198.18.0.0/24", "port": 22}]), "allow.port"),
        (_doc(allow=[{"cidr": "198.18.0.0/24", "protocol": "icmp"}]), "allow.protocol"),
        (_doc(allow=[{"cidr": "198.18.0.0/24", "direction": "sideways"}]), "allow.direction"),
        (_doc(allow=[{"cidr": "198.18.0.0/24", "extra": 1}]), "allow[0]"),
        (_doc(dns_resolvers=["resolver.example"]), "dns_resolvers[0]"),
        (_doc(dhcp="yes"), "dhcp"),
        (_doc(confirm_deadline_s=0), "confirm_deadline_s"),
        (_doc(confirm_deadline_s=601), "confirm_deadline_s"),
        (_doc(version=2), "version"),
        (_doc(surprise=True), "policy"),
        ({"version": 1}, "policy"),
    ],
)
def test_invalid_policies_name_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as e:
        Policy.from_json(json.dumps(doc))
    assert e.value.field == field


def test_not_json_and_too_large() -> None:
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.from_json("{")
    with pytest.raises(PolicyError, match="larger than"):
        Policy.from_json(" " * (64 * 1024 + 1))
    with pytest.raises(PolicyError, match="JSON object"):
        Policy.from_json("[]")


@given(
    port=st.integers(min_value=1, max_value=65535),
    octet=st.integers(min_value=0, max_value=255),
    dhcp=st.booleans(),
)
def test_round_trip_property(port: int, octet: int, dhcp: bool) -> None:
    p = Policy(collectors=(CollectorEndpoint(f"198.19.0.{octet}", port),), dhcp=dhcp)
    assert Policy.from_json(p.to_json()) == p
