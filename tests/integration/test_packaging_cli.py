"""Fleet-admin commands end to end with the console scripts against a real server: enrollment
packages (create, enroll, reuse refused, unreachable address skipped), release artifact
signing and verification (tamper matrix), and `ringfence-agent isolation reapply` with the
fake backend. The packaged binary and .debs are tested in test_packaging_artifacts.py."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.actions.isolation import IsolationController
from agent.enroll_package import ENROLL_PACKAGE_TYPE, EnrollPackage, EnrollPackageError
from evidence.dsse import sign_envelope
from evidence.keys import load_private_key
from isolation import CollectorEndpoint, Policy
from isolation.backends import FakeBackend
from server.cli_packaging import ARTIFACT_TYPE, artifact_statement
from tests.integration.fleet import agent_cli, cli, running_fleet


def test_enroll_package_enrolls_once_and_skips_unreachable_servers(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        data = str(fleet.data_dir)
        package = tmp_path / "site.package"
        # The first address answers nothing (loopback port 1): the agent moves on to the next.
        out = cli("enroll-package", "create", "--data-dir", data, "--out", str(package),
                  "--server", "127.0.0.1:1", "--server", fleet.enroll_target,
                  "--tls-name", "localhost", "--ttl", "1h").stdout
        assert "token id" in out and "0600" in out
        assert stat.S_IMODE(package.stat().st_mode) == 0o600
        raw = json.loads(package.read_text())
        assert raw["type"] == ENROLL_PACKAGE_TYPE
        assert raw["servers"] == ["127.0.0.1:1", fleet.enroll_target]
        assert raw["ca_pem"].encode() == fleet.paths.ca_cert.read_bytes()
        assert raw["token"].startswith("rft_")
        assert raw["token"] not in out  # the token is only in the 0600 file

        first = agent_cli("enroll", "--package", str(package), "--state-dir",
                          str(tmp_path / "a1"))
        assert "enrolled: agent id" in first.stdout
        agents = fleet.store.list_agents()
        assert len(agents) == 1
        assert json.loads((tmp_path / "a1" / "enrollment.json").read_text())["agent_id"] == \
            agents[0].agent_id

        # One use: a second host with the same package is refused, and nothing is written.
        second = agent_cli("enroll", "--package", str(package), "--state-dir",
                           str(tmp_path / "a2"), check=False)
        assert second.returncode == 1
        assert "token is invalid, expired or used up" in second.stderr, second.stderr
        assert not (tmp_path / "a2" / "enrollment.json").exists()
        assert len(fleet.store.list_agents()) == 1

        # --package is exclusive with the explicit flags; an existing --out is not overwritten.
        mixed = agent_cli("enroll", "--package", str(package), "--token", "rft_x",
                          "--state-dir", str(tmp_path / "a3"), check=False)
        assert mixed.returncode == 1 and "--package" in mixed.stderr
        again = cli("enroll-package", "create", "--data-dir", data, "--out", str(package),
                    check=False)
        assert again.returncode == 1 and "--force" in again.stderr


def test_enroll_package_defaults_to_fleet_addresses_and_rejects_garbage(tmp_path: Path) -> None:
    with running_fleet(tmp_path, addresses=("ir.example.net", "2001:db8::10")) as fleet:
        package = tmp_path / "p.json"
        cli("enroll-package", "create", "--data-dir", str(fleet.data_dir), "--out",
            str(package), "--token-uses", "5")
        parsed = EnrollPackage.from_json(package.read_bytes())
        assert parsed.servers == ("ir.example.net:8442", "[2001:db8::10]:8442")
        assert parsed.tls_name is None
        unreachable = agent_cli("enroll", "--package", str(package), "--state-dir",
                                str(tmp_path / "a"), check=False)
        # Nothing listens there: every address fails, the error names them all.
        assert unreachable.returncode == 1
        assert "ir.example.net:8442" in unreachable.stderr
        assert "[2001:db8::10]:8442" in unreachable.stderr

    for bad, why in ((b"not json", "not JSON"), (b'{"type": "x"}', "not a ringfence"),
                     (b" " * 70_000, "limit")):
        with pytest.raises(EnrollPackageError, match=why):
            EnrollPackage.from_json(bad)
    good = json.loads(package.read_text())
    for field, value, why in (("servers", [], "1..16 servers"),
                              ("servers", ["no-port"], "HOST:PORT"),
                              ("token", "secret", "token"),
                              ("ca_pem", "x", "CA certificate"),
                              ("servers", "a:1", "wrong types")):
        with pytest.raises(EnrollPackageError, match=why):
            EnrollPackage.from_json(json.dumps({**good, field: value}).encode())
    garbage = tmp_path / "garbage"
    garbage.write_text("nope")
    result = agent_cli("enroll", "--package", str(garbage), "--state-dir", str(tmp_path / "g"),
                       check=False)
    assert result.returncode == 1 and "not JSON" in result.stderr


def test_sign_and_verify_artifact_tamper_matrix(tmp_path: Path) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    out = cli("release-key", "create", "--out", str(keys)).stdout
    assert "never commit" in out
    assert stat.S_IMODE((keys / "release.key").stat().st_mode) == 0o600
    cli("release-key", "create", "--out", str(other))
    refused = cli("release-key", "create", "--out", str(keys), check=False)
    assert refused.returncode == 1 and "refusing to overwrite" in refused.stderr

    artifact = tmp_path / "ringfence-agent_0.1.0_amd64.deb"
    artifact.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    cli("sign-artifact", str(artifact), "--key", str(keys / "release.key"))
    signature = tmp_path / (artifact.name + ".dsse.json")
    envelope = json.loads(signature.read_text())
    assert envelope["payloadType"] == ARTIFACT_TYPE

    def verify(path: Path, *extra: str, trust: Path = keys / "release.pub",
               sig: Path = signature) -> tuple[int, str]:
        r = cli("verify-artifact", str(path), "--signature", str(sig), "--trust", str(trust),
                *extra, check=False)
        return r.returncode, r.stdout + r.stderr

    code, text = verify(artifact)
    assert code == 0 and text.startswith("OK: ringfence-agent_0.1.0_amd64.deb"), text
    assert artifact_statement(artifact).sha256 in text

    code, text = verify(artifact, trust=other / "release.pub")
    assert code == 1 and "untrusted key" in text

    flipped = tmp_path / "flipped" / artifact.name
    flipped.parent.mkdir()
    data = bytearray(artifact.read_bytes())
    data[100] ^= 1
    flipped.write_bytes(bytes(data))
    code, text = verify(flipped)
    assert code == 1 and "signed sha256" in text

    truncated = tmp_path / "truncated" / artifact.name
    truncated.parent.mkdir()
    truncated.write_bytes(artifact.read_bytes()[:-1])
    code, text = verify(truncated)
    assert code == 1 and "signed size" in text

    renamed = tmp_path / "ringfence-agent_0.0.9_amd64.deb"
    renamed.write_bytes(artifact.read_bytes())
    code, text = verify(renamed)
    assert code == 1 and "signed name" in text

    # Correctly signed by the release key, but not an artifact statement.
    wrong_type = tmp_path / "wrong-type.dsse.json"
    wrong_type.write_bytes(sign_envelope("application/vnd.ringfence.checkpoint.v1+json",
                                         artifact_statement(artifact).to_json(),
                                         load_private_key(keys / "release.key")))
    code, text = verify(artifact, sig=wrong_type)
    assert code == 1 and "checkpoint" in text

    forged = dict(envelope, signatures=[{"keyid": envelope["signatures"][0]["keyid"],
                                         "sig": envelope["signatures"][0]["sig"][:-4] + "AAA="}])
    forged_path = tmp_path / "forged.dsse.json"
    forged_path.write_text(json.dumps(forged))
    code, text = verify(artifact, sig=forged_path)
    assert code == 1 and "invalid signature" in text

    no_trust = cli("verify-artifact", str(artifact), check=False)
    assert no_trust.returncode == 1 and "--trust" in no_trust.stderr


def test_isolation_reapply_without_connecting(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    config = tmp_path / "agent.toml"
    config.write_text('[isolation]\nbackend = "fake"\n')
    nothing = agent_cli("isolation", "reapply", "--state-dir", str(state), "--config",
                        str(config))
    assert "nothing to re-apply" in nothing.stdout

    policy = Policy(collectors=(CollectorEndpoint("198.18.0.1", 8443),))
    controller = IsolationController(FakeBackend(), state / "isolation", lambda t: None,
                                     lambda: True)
    outcome = controller.isolate(policy, "cmd-boot", "IR-7")
    assert outcome.state == "isolated"
    done = agent_cli("isolation", "reapply", "--state-dir", str(state), "--config", str(config))
    assert "re-applied isolation cmd-boot (isolated" in done.stdout
    # Re-applying never consumes the persisted state: the agent re-applies and records it later.
    assert json.loads((state / "isolation" / "isolation.json").read_text())["status"] == \
        "isolated"

    (state / "isolation" / "isolation.json").write_text("{broken")
    corrupt = agent_cli("isolation", "reapply", "--state-dir", str(state), "--config",
                        str(config), check=False)
    assert corrupt.returncode == 1 and "NOT isolated" in corrupt.stderr
