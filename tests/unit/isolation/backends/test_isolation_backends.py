"""The backend template methods, the fake backend, selection, and the nft/iptables backends
against a scripted command runner (no real firewall is touched)."""

from __future__ import annotations

import pytest

from isolation import (
    BackendError,
    BackendUnavailableError,
    CollectorEndpoint,
    CommandError,
    DriftError,
    Policy,
    StateError,
    plan,
    select_backend,
    verify,
)
from isolation._run import Result, Runner
from isolation.backends import FakeBackend, IptablesBackend, NftablesBackend, Snapshot

RS = plan(Policy(collectors=(CollectorEndpoint("198.18.0.1", 8443),)))


class ScriptedRunner(Runner):
    """Answers commands from a list of (argv prefix, Result) and records what ran."""

    def __init__(self, answers: list[tuple[tuple[str, ...], Result]]) -> None:
        super().__init__("scripted")
        object.__setattr__(self, "answers", answers)
        object.__setattr__(self, "ran", [])

    def run(self, *argv: str, stdin: str | None = None, check: bool = True) -> Result:
        self.ran.append((argv, stdin))  # type: ignore[attr-defined]
        for prefix, result in self.answers:  # type: ignore[attr-defined]
            if argv[: len(prefix)] == prefix:
                if check and result.returncode:
                    raise CommandError(
                        "scripted failure",
                        backend="scripted",
                        argv=argv,
                        returncode=result.returncode,
                        stderr=result.stderr,
                    )
                return result
        raise AssertionError(f"unexpected command {argv}")


def test_fake_apply_verify_snapshot_restore() -> None:
    fake = FakeBackend(preexisting="table inet ringfence {\nold\n}")
    snap = fake.snapshot()
    assert snap.existed
    fake.apply(RS)
    assert verify(fake, RS).ruleset_sha256 == RS.sha256
    fake.restore(snap)
    assert fake.listing == "table inet ringfence {\nold\n}"
    assert fake.applied == [RS]


def test_failures_are_translated_with_cause() -> None:
    fake = FakeBackend()
    fake.fail_next("apply", OSError("boom"))
    with pytest.raises(BackendError) as e:
        fake.apply(RS)
    assert isinstance(e.value.__cause__, OSError)
    assert e.value.backend == "fake"


def test_drift_missing_and_altered() -> None:
    fake = FakeBackend()
    fake.apply(RS)
    fake.drift("altered")
    with pytest.raises(DriftError) as e:
        verify(fake, RS)
    assert e.value.kind == "altered"
    assert "+ct state established accept" in e.value.diff
    fake.drift("missing")
    with pytest.raises(DriftError) as e:
        verify(fake, RS)
    assert e.value.kind == "missing"
    assert e.value.found is None


def test_restore_refuses_foreign_snapshot() -> None:
    with pytest.raises(BackendError, match="taken by backend"):
        FakeBackend().restore(Snapshot("nftables", False))


def test_snapshot_round_trips_through_dict() -> None:
    s = Snapshot("iptables", True, (("v4", "*filter\nCOMMIT\n"), ("v6", "")))
    assert Snapshot.from_dict(s.to_dict()) == s


def test_select_backend() -> None:
    assert isinstance(select_backend("fake", None), FakeBackend)
    with pytest.raises(BackendUnavailableError, match="unknown"):
        select_backend("pf", None)
    assert issubclass(StateError, Exception)


def test_nftables_read_back_missing_and_present() -> None:
    nft = NftablesBackend()
    nft._runner = ScriptedRunner(
        [  # type: ignore[assignment]
            (("nft", "list", "table"), Result(1, "", "Error: No such file or directory")),
        ]
    )
    assert nft.read_back() is None
    with pytest.raises(DriftError):
        nft.verify(RS)
    nft._runner = ScriptedRunner(
        [  # type: ignore[assignment]
            (("nft", "list", "table"), Result(0, RS.nft_listing.replace("\t", "    "), "")),
        ]
    )
    assert nft.verify(RS).listing == nft.expected_listing(RS)


def test_nftables_other_list_errors_raise() -> None:
    nft = NftablesBackend()
    nft._runner = ScriptedRunner(
        [  # type: ignore[assignment]
            (("nft", "list", "table"), Result(1, "", "Error: Operation not permitted")),
        ]
    )
    with pytest.raises(CommandError):
        nft.read_back()


def test_nftables_restore_scripts() -> None:
    nft = NftablesBackend()
    runner = ScriptedRunner([(("nft", "-f", "-"), Result(0, "", ""))])
    nft._runner = runner  # type: ignore[assignment]
    nft.restore(Snapshot("nftables", False, (("listing", ""),)))
    nft.restore(Snapshot("nftables", True, (("listing", "table inet ringfence {\n}\n"),)))
    scripts = [stdin for _, stdin in runner.ran]  # type: ignore[attr-defined]
    assert scripts[0] == "add table inet ringfence\ndelete table inet ringfence\n"
    assert scripts[1].endswith("delete table inet ringfence\ntable inet ringfence {\n}\n")


def test_iptables_apply_does_not_duplicate_jumps() -> None:
    ipt = IptablesBackend()
    saved = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j RINGFENCE-IN\nCOMMIT\n"
    runner = ScriptedRunner(
        [
            (("iptables-save",), Result(0, saved, "")),
            (("ip6tables-save",), Result(0, "", "")),
            (("iptables-restore",), Result(0, "", "")),
            (("ip6tables-restore",), Result(0, "", "")),
        ]
    )
    ipt._runner = runner  # type: ignore[assignment]
    ipt.apply(RS)
    restores = {
        argv[0]: stdin
        for argv, stdin in runner.ran  # type: ignore[attr-defined]
        if argv[0].endswith("restore")
    }
    assert "-I INPUT 1 -j RINGFENCE-IN" not in restores["iptables-restore"]
    assert "-I OUTPUT 1 -j RINGFENCE-OUT" in restores["iptables-restore"]
    assert "-I INPUT 1 -j RINGFENCE-IN" in restores["ip6tables-restore"]


def test_iptables_expected_listing_is_what_save_prints() -> None:
    ipt = IptablesBackend()
    v4 = "\n".join(["*filter", ":RINGFENCE-IN - [0:0]", *RS.iptables_v4.splitlines()])
    v4 = v4.replace("-I INPUT 1 -j RINGFENCE-IN", "-A INPUT -j RINGFENCE-IN")
    v4 = v4.replace("-I FORWARD 1 -j RINGFENCE-FWD", "-A FORWARD -j RINGFENCE-FWD")
    v4 = v4.replace("-I OUTPUT 1 -j RINGFENCE-OUT", "-A OUTPUT -j RINGFENCE-OUT")
    v6 = RS.iptables_v6.replace("-I INPUT 1 -j RINGFENCE-IN", "-A INPUT -j RINGFENCE-IN")
    v6 = v6.replace("-I FORWARD 1 -j RINGFENCE-FWD", "-A FORWARD -j RINGFENCE-FWD")
    v6 = v6.replace("-I OUTPUT 1 -j RINGFENCE-OUT", "-A OUTPUT -j RINGFENCE-OUT")
    ipt._runner = ScriptedRunner(
        [  # type: ignore[assignment]
            (("iptables-save",), Result(0, v4, "")),
            (("ip6tables-save",), Result(0, v6, "")),
        ]
    )
    assert ipt.verify(RS).ruleset_sha256 == RS.sha256
