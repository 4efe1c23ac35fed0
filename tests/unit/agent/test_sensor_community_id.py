"""Community ID v1 against the spec's published vectors."""

from __future__ import annotations

import pytest

from agent.sensors.community_id import community_id

VECTORS = [
    ("128.232.110.120", "66.35.250.204", 34855, 80, 6, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    ("192.168.1.52", "8.8.8.8", 54585, 53, 17, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    ("2001:470:e5bf:dead:4957:2174:e82c:4887", "2607:f8b0:400c:c03::1a", 63943, 25, 6,
     "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
    ("192.168.170.8", "192.168.170.56", 7, 80, 132, "1:jQgCxbku+pNGw8WPbEc/TS/uTpQ="),
    ("192.168.0.89", "192.168.0.1", 8, 0, 1, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),
    ("3ffe:501:0:1802:260:97ff:feb6:7ff0", "3ffe:507:0:1:200:86ff:fe05:80da", 3, 0, 58,
     "1:bnQKq8A2r//dWnkRW2EYcMhShjc="),
]


@pytest.mark.parametrize("src,dst,sport,dport,proto,expected", VECTORS)
def test_spec_vectors(src: str, dst: str, sport: int, dport: int, proto: int,
                      expected: str) -> None:
    assert community_id(src, dst, sport, dport, proto) == expected


@pytest.mark.parametrize("src,dst,sport,dport,proto,expected", VECTORS[:4])
def test_direction_independent(src: str, dst: str, sport: int, dport: int, proto: int,
                               expected: str) -> None:
    assert community_id(dst, src, dport, sport, proto) == expected


def test_protocol_name_and_seed_change_hash() -> None:
    base = community_id("128.232.110.120", "66.35.250.204", 34855, 80, "tcp")
    assert base == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    assert community_id("128.232.110.120", "66.35.250.204", 34855, 80, 6, seed=1) != base


def test_icmp_echo_request_and_reply_match() -> None:
    req = community_id("192.168.0.89", "192.168.0.1", 8, 0, 1)
    rep = community_id("192.168.0.1", "192.168.0.89", 0, 0, 1)
    assert req == rep


def test_mixed_families_rejected() -> None:
    with pytest.raises(ValueError):
        community_id("192.0.2.1", "2001:db8::1", 1, 2, 6)
