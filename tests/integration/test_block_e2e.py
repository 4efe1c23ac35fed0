"""Blocking indicators end to end inside throwaway network namespaces: a real server and a real
agent with the nftables backend (the lab of test_isolation_e2e). `ringfence block` drops the
attacker (IPv4 and IPv6, both directions) with a separate `table inet ringfence_block` while
every other peer stays reachable and the agent keeps streaming; `ringfence unblock` restores
the ruleset exactly. Rules are only ever applied in the endpoint's namespace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration import test_isolation_e2e as lab_e2e

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.nftables, pytest.mark.timeout(150)]


def _block_table(lab: lab_e2e.Lab) -> str | None:
    result = lab.topo.run("endpoint", "nft", "list", "table", "inet", "ringfence_block",
                          check=False)
    return result.stdout if result.returncode == 0 else None


def test_block_and_unblock_indicators_without_isolation(tmp_path: Path) -> None:
    with lab_e2e.running_lab(tmp_path, "ipv4") as lab:
        topo = lab.topo
        before = lab.ruleset()
        lab_e2e.assert_open(lab)
        attacker, peer = topo["attacker"], topo["peer"]

        refused = lab.admin("block", lab.agent_id, "--ip", topo["collector"].ipv4,
                            "--reason", "IR: would cut the agent off", check=False)
        assert refused.returncode == 1 and "collector" in refused.stderr
        refused = lab.admin("block", lab.agent_id, "--domain", "localhost", "--reason",
                            "IR: loopback", check=False)
        assert refused.returncode == 1 and "loopback" in refused.stderr
        assert _block_table(lab) is None

        result = lab.admin("block", lab.agent_id, "--ip", attacker.ipv4, "--ip",
                           f"{attacker.ipv6}/128", "--reason", "IR: C2 addresses", "--wait",
                           "--json", "--timeout", "60", timeout=90)
        status: dict[str, Any] = json.loads(result.stdout)
        assert status["status"] == "succeeded", status
        assert status["detail"]["networks"] == [attacker.ipv4, attacker.ipv6]
        table = _block_table(lab)
        assert table is not None and f"ip daddr {attacker.ipv4} drop" in table
        assert f"ip6 saddr {attacker.ipv6} drop" in table
        assert "table inet ringfence {" not in lab.ruleset()      # no isolation table
        for fam in ("ipv4", "ipv6"):
            a, e, p = (getattr(h, fam) for h in (attacker, topo["endpoint"], peer))
            assert not lab.reaches("endpoint", a, 4444), f"endpoint -> attacker ({fam})"
            assert not lab.reaches("attacker", e, 2222), f"attacker -> endpoint ({fam})"
            assert lab.reaches("endpoint", p, 5555), f"other peers stay reachable ({fam})"
        assert lab.host()["isolation"]["state"] == "none"
        lab_e2e.streams_new_events(lab)

        records = lab_e2e.wait_until(
            lambda: [e for e in lab.events("response") if e["action"] == "block"], 15,
            "the block record in the chain")
        detail = json.loads(records[0]["detail_json"])
        assert records[0]["outcome"] == "succeeded" and len(detail["ruleset_sha256"]) == 64

        result = lab.admin("unblock", lab.agent_id, "--reason", "IR: C2 taken down", "--wait",
                           "--json", "--timeout", "60", timeout=90)
        assert json.loads(result.stdout)["status"] == "succeeded"
        assert _block_table(lab) is None
        assert lab.ruleset() == before
        lab_e2e.assert_open(lab)
        audit = json.loads(lab.admin("audit", "--json").stdout)["records"]
        actions = [(r["action"], r["reason"]) for r in audit if r["action"] in ("block",
                                                                               "unblock")]
        assert ("block", "IR: C2 addresses") in actions
        assert ("unblock", "IR: C2 taken down") in actions
