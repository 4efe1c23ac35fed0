"""plan_block: golden listing, normalization, and fail-closed refusals."""

from __future__ import annotations

import pytest

from isolation.block import MAX_NETWORKS, normalize_networks, plan_block
from isolation.errors import PolicyError

GOLDEN = """\
table inet ringfence_block {
\tchain input {
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tip saddr 198.18.0.3 drop
\t\tip saddr 198.18.4.0/24 drop
\t\tip6 saddr 2001:db8::3 drop
\t}

\tchain output {
\t\ttype filter hook output priority filter - 10; policy accept;
\t\tip daddr 198.18.0.3 drop
\t\tip daddr 198.18.4.0/24 drop
\t\tip6 daddr 2001:db8::3 drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tip saddr 198.18.0.3 drop
\t\tip saddr 198.18.4.0/24 drop
\t\tip6 saddr 2001:db8::3 drop
\t\tip daddr 198.18.0.3 drop
\t\tip daddr 198.18.4.0/24 drop
\t\tip6 daddr 2001:db8::3 drop
\t}
}
"""


def test_golden_listing_and_atomic_script() -> None:
    rs = plan_block(["2001:db8:0::3/128", "198.18.4.7/24", "198.18.0.3", "198.18.0.3/32"])
    assert rs.networks == ("198.18.0.3", "198.18.4.0/24", "2001:db8::3")
    assert rs.nft_listing == GOLDEN
    assert rs.nft_script.startswith("add table inet ringfence_block\n"
                                     "delete table inet ringfence_block\n")
    assert rs.nft_script.endswith(GOLDEN)
    assert len(rs.sha256) == 64
    assert plan_block(list(reversed(rs.networks))).sha256 == rs.sha256


@pytest.mark.parametrize("bad", [[], ["not-an-ip"], ["0.0.0.0/0"], ["::/0"], ["127.0.0.1"],
                                 ["::1"], ["198.18.0.1", "10.0.0.0/33"]])
def test_refuses_bad_input(bad: list[str]) -> None:
    with pytest.raises(PolicyError):
        normalize_networks(bad)


def test_refuses_too_many() -> None:
    too_many = [f"198.18.{i // 256}.{i % 256}" for i in range(MAX_NETWORKS + 1)]
    with pytest.raises(PolicyError, match="at most"):
        normalize_networks(too_many)
