"""The release artifacts of `make package`, built once for this module: the one-file agent binary
run from a temporary directory in a clean environment (no venv, no PYTHONPATH), the .debs
(contents, control data, lintian, systemd units through `systemd-analyze verify` and
`security --offline=yes`), their maintainer scripts run by dpkg against a temporary root
(install with automatic enrollment, upgrade keeping every byte of state, remove, purge), and
the binary isolating and releasing a host inside throwaway network namespaces.

Set RINGFENCE_PACKAGE_DIR to test artifacts built elsewhere instead of running `make package`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.actions.isolation import IsolationController
from agent.config import load_config
from isolation import CollectorEndpoint, Policy
from isolation.backends import FakeBackend
from isolation.lab import CONNECT, ECHO_SERVER, python_argv, topology
from proto import ringfence_pb2 as pb
from tests.integration.fleet import BIN, REPO, cli, running_fleet, wait_for

# pytest-timeout counts fixture set-up, and whichever test runs first pays for `make package`
# (minutes on two shared cores); each step inside the tests is bounded by its own timeout.
pytestmark = pytest.mark.timeout(1500)

VERSION = "0.1.0"
AGENT_DEB = f"ringfence-agent_{VERSION}_amd64.deb"
SERVER_DEB = f"ringfence-server_{VERSION}_amd64.deb"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
AGENT_TOML = """\
[isolation]
backend = "{backend}"
[sensors.process]
mode = "psutil"
poll_interval_s = 0.2
[sensors.file]
enabled = false
[sensors.network]
enabled = false
[spool]
fsync_interval_s = 0.05
[chain]
checkpoint_interval_s = 0.5
[session]
heartbeat_interval_s = 1.0
backoff_initial_s = 0.1
backoff_max_s = 1.0
"""


@pytest.fixture(scope="module")
def dist() -> Path:
    given = os.environ.get("RINGFENCE_PACKAGE_DIR")
    if given:
        return Path(given).resolve()
    started = time.monotonic()
    result = subprocess.run(["make", "-s", "package"], check=False, cwd=REPO, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, f"make package failed:\n{result.stdout}\n{result.stderr}"
    print(f"\nmake package ({time.monotonic() - started:.0f} s):\n{result.stdout}")
    return REPO / "dist"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*argv: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def clean_binary(dist: Path, tmp: Path) -> Path:
    """The agent binary copied alone into a temporary directory."""
    target = tmp / "bin" / "ringfence-agent"
    target.parent.mkdir(parents=True)
    shutil.copy2(dist / "ringfence-agent", target)
    return target


def marked_sleep(tmp: Path, marker: str) -> Path:
    """A copy of sleep(1) named `marker`: its exe and argv carry the marker for as long as it
    runs (`sh -c "sleep N" marker` execs sleep and loses the marker at once)."""
    target = tmp / marker
    shutil.copy2("/bin/sleep", target)
    return target


# -- artifacts ---------------------------------------------------------------------------------

def test_checksums_signatures_and_sizes(dist: Path) -> None:
    sums = dict(reversed(line.split("  ", 1)) for line in
                (dist / "SHA256SUMS").read_text().splitlines())
    expected = {"ringfence-agent", AGENT_DEB, SERVER_DEB, "release.pub"}
    signed = ["ringfence-agent", AGENT_DEB, SERVER_DEB]
    assert set(sums) == expected | {f"{n}.dsse.json" for n in signed}
    for name, digest in sums.items():
        assert sha256(dist / name) == digest, name
    for name in signed:
        out = cli("verify-artifact", str(dist / name), "--signature",
                  str(dist / f"{name}.dsse.json"), "--trust", str(dist / "release.pub")).stdout
        assert out.startswith(f"OK: {name} (sha256 {sums[name]}")
    print("\nartifact sizes: " + ", ".join(
        f"{n} {(dist / n).stat().st_size / 1e6:.1f} MB" for n in signed))


def test_binary_runs_from_a_clean_environment_and_streams(dist: Path, tmp_path: Path) -> None:
    binary = clean_binary(dist, tmp_path)
    version = run(str(binary), "--version", env=CLEAN_ENV, cwd=tmp_path).stdout
    head = run("git", "rev-parse", "HEAD", cwd=REPO).stdout.strip()
    assert version.startswith(f"ringfence-agent {VERSION} (one-file binary; Python 3.11")
    build = re.search(r"build: commit (\S+), built (\S+), Python (\S+)", version)
    assert build, version
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", build.group(1)), version
    print(f"\nbinary --version: {version.strip()} (HEAD {head})")
    with running_fleet(tmp_path) as fleet:
        package = tmp_path / "enroll.package"
        cli("enroll-package", "create", "--data-dir", str(fleet.data_dir), "--out", str(package),
            "--server", fleet.enroll_target, "--tls-name", "localhost")
        state = tmp_path / "state"
        config = tmp_path / "agent.toml"
        config.write_text(AGENT_TOML.format(backend="fake"))
        run(str(binary), "enroll", "--package", str(package), "--state-dir", str(state),
            "--config", str(config), env=CLEAN_ENV, cwd=tmp_path)
        agent_id = json.loads((state / "enrollment.json").read_text())["agent_id"]
        log = (tmp_path / "agent.log").open("w")
        agent = subprocess.Popen([str(binary), "run", "--state-dir", str(state), "--config",
                                  str(config)], env=CLEAN_ENV, cwd=tmp_path, stdout=log,
                                 stderr=subprocess.STDOUT)
        marker = f"rf-bin-{uuid.uuid4().hex[:12]}"
        sleeper: subprocess.Popen[bytes] | None = None
        try:
            # The process sensor polls running processes: start ours once the agent streams.
            wait_for(lambda: list(fleet.store.query_events(agent_id, kind="lifecycle", limit=10)),
                     timeout=60, what="the binary agent's START event")
            sleeper = subprocess.Popen([str(marked_sleep(tmp_path, marker)), "60"])
            def seen() -> bool:
                return any(marker.encode() in b" ".join(pb.Event.FromString(r.data).process
                                                        .process.argv)
                           for r in fleet.store.query_events(agent_id, kind="process",
                                                             limit=100_000))
            wait_for(seen, timeout=60, what="a process event from the binary agent")
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0
        finally:
            if sleeper is not None:
                sleeper.kill()
                sleeper.wait()
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            log.close()
        kinds = [pb.Event.FromString(r.data).lifecycle.kind for r in
                 fleet.store.query_events(agent_id, kind="lifecycle", limit=1000)]
        assert kinds == [pb.AgentLifecycle.START, pb.AgentLifecycle.STOP], \
            (tmp_path / "agent.log").read_text()[-3000:]
        assert fleet.store.alerts(agent_id) == []


# -- .debs -------------------------------------------------------------------------------------

def deb_contents(deb: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode string, owner/group) from `dpkg-deb --contents`."""
    out: dict[str, tuple[str, str]] = {}
    for line in run("dpkg-deb", "--contents", str(deb)).stdout.splitlines():
        fields = line.split()
        out[fields[5].removeprefix(".")] = (fields[0], fields[1])
    return out


def test_agent_deb_contents_control_and_lintian(dist: Path) -> None:
    deb = dist / AGENT_DEB
    info = run("dpkg-deb", "--info", str(deb)).stdout
    for field in ("Package: ringfence-agent", f"Version: {VERSION}", "Architecture: amd64",
                  "Depends: libc6 (>= 2.34), nftables | iptables"):
        assert field in info
    for script in ("postinst", "prerm", "postrm", "conffiles", "md5sums"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*?\s*{script}\b", info, re.MULTILINE), script
    assert run("dpkg-deb", "--field", str(deb), "Installed-Size").stdout.strip().isdigit()
    contents = deb_contents(deb)
    assert contents["/usr/bin/ringfence-agent"] == ("-rwxr-xr-x", "root/root")
    assert contents["/var/lib/ringfence/"] == ("drwx------", "root/root")
    assert contents["/etc/ringfence/agent.toml"] == ("-rw-r--r--", "root/root")
    for unit in ("ringfence-agent.service", "ringfence-isolation.service"):
        assert contents[f"/lib/systemd/system/{unit}"] == ("-rw-r--r--", "root/root")
    assert "/usr/share/doc/ringfence-agent/copyright" in contents
    assert "/usr/share/doc/ringfence-agent/deployment.md" in contents
    assert not any("enroll.package" in p for p in contents)

    lintian = run("lintian", "--tag-display-limit", "0", str(deb), check=False, timeout=300)
    errors = [ln for ln in lintian.stdout.splitlines() if ln.startswith("E:")]
    assert errors == [], lintian.stdout
    print(f"\nlintian {AGENT_DEB}: {len(lintian.stdout.splitlines())} tags, no errors:\n"
          f"{lintian.stdout}")


def test_server_deb_contents_lintian_and_bundled_cli(dist: Path, tmp_path: Path) -> None:
    deb = dist / SERVER_DEB
    contents = deb_contents(deb)
    assert contents["/usr/lib/ringfence-server/ringfence"] == ("-rwxr-xr-x", "root/root")
    assert contents["/usr/bin/ringfence"][0].startswith("lrwxrwxrwx")
    assert contents["/var/lib/ringfence-server/"] == ("drwx------", "root/root")
    assert "/lib/systemd/system/ringfence-server.service" in contents
    assert "/usr/share/lintian/overrides/ringfence-server" in contents
    lintian = run("lintian", "--tag-display-limit", "0", str(deb), check=False, timeout=600)
    errors = [ln for ln in lintian.stdout.splitlines() if ln.startswith("E:")]
    assert errors == [], lintian.stdout
    # The bundled CLI works on its own: set up a fleet and verify the agent's signature.
    root = tmp_path / "root"
    run("dpkg-deb", "-x", str(deb), str(root))
    ringfence = root / "usr/bin/ringfence"
    run(str(ringfence), "server", "init", "--data-dir", str(tmp_path / "data"), env=CLEAN_ENV,
        cwd=tmp_path)
    assert (tmp_path / "data/pki/ca.pem").exists()
    out = run(str(ringfence), "verify-artifact", str(dist / "ringfence-agent"), "--trust",
              str(dist / "release.pub"), env=CLEAN_ENV, cwd=tmp_path).stdout
    assert out.startswith("OK: ringfence-agent")


def test_units_verify_and_security_score(dist: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    # The host's own units (targets the ours order against), then the packages on top: verify
    # resolves every path inside --root, so the packaged binaries are what is checked.
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", symlinks=True)
    for deb in (AGENT_DEB, SERVER_DEB):
        run("dpkg-deb", "-x", str(dist / deb), str(root))
    units = root / "lib/systemd/system"
    for unit in ("ringfence-agent.service", "ringfence-isolation.service",
                 "ringfence-server.service"):
        result = run("systemd-analyze", "verify", "--man=no", f"--root={root}",
                     f"/lib/systemd/system/{unit}", check=False)
        problems = [ln for ln in (result.stdout + result.stderr).splitlines()
                    if unit in ln or "rror" in ln]
        assert result.returncode == 0 and problems == [], result.stdout + result.stderr

    agent = (units / "ringfence-agent.service").read_text()
    for directive in ("Restart=always", "ProtectSystem=strict",
                      "ReadWritePaths=/var/lib/ringfence", "NoNewPrivileges=yes",
                      ("CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_PTRACE "
                       "CAP_DAC_READ_SEARCH CAP_SYS_NICE CAP_KILL"),
                      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET"):
        assert re.search(rf"^{re.escape(directive)}$", agent, re.MULTILINE), directive
    boot = (units / "ringfence-isolation.service").read_text()
    for directive in ("Before=network-pre.target shutdown.target", "Wants=network-pre.target",
                      ("ExecStart=/usr/bin/ringfence-agent isolation reapply --config "
                       "/etc/ringfence/agent.toml"), "CapabilityBoundingSet=CAP_NET_ADMIN"):
        assert re.search(rf"^{re.escape(directive)}$", boot, re.MULTILINE), directive
    server = (units / "ringfence-server.service").read_text()
    assert "ExecStart=/usr/bin/ringfence server run --data-dir /var/lib/ringfence-server" in server
    assert re.search(r"^User=ringfence-server$", server, re.MULTILINE)

    scores = {}
    for unit in ("ringfence-agent.service", "ringfence-isolation.service",
                 "ringfence-server.service"):
        out = run("systemd-analyze", "security", "--offline=yes", "--no-pager",
                  str(units / unit)).stdout
        match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([\d.]+) (\w+)", out)
        assert match, out
        scores[unit] = (float(match.group(1)), match.group(2))
    print("\nsystemd-analyze security --offline=yes: " + ", ".join(
        f"{u} {s} {w}" for u, (s, w) in scores.items()))
    # 10 is an unsandboxed root service; below 5 systemd calls it OK. The agent is root with six
    # capabilities by necessity, the other two are tighter.
    assert scores["ringfence-agent.service"][0] < 5.0
    assert scores["ringfence-isolation.service"][0] < 3.0
    assert scores["ringfence-server.service"][0] < 3.0
    # The shipped default configuration is valid.
    load_config(root / "etc/ringfence/agent.toml")
    for script in ("postinst", "prerm", "postrm"):
        for package in ("ringfence-agent", "ringfence-server"):
            run("sh", "-n", str(REPO / "packaging/deb" / package / script))


# -- maintainer scripts against a temporary root -------------------------------------------------

def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Chrootless: the scripts run on this system with DPKG_ROOT=root and touch only paths under
    # it; they never start, stop or enable units of this machine (they check DPKG_ROOT).
    return run("dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends",
               f"--log={root}/dpkg.log", *args, timeout=300,
               env={**CLEAN_ENV, "DEBIAN_FRONTEND": "noninteractive"})


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(directory)): (stat.S_IMODE(p.stat().st_mode),
                                             sha256(p) if p.is_file() else "dir")
            for p in sorted(directory.rglob("*"))}


@pytest.mark.root
def test_install_enrolls_upgrade_keeps_state_remove_keeps_purge_deletes(
        dist: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "var/lib/dpkg/updates").mkdir(parents=True)
    (root / "var/lib/dpkg/info").mkdir()
    (root / "var/lib/dpkg/status").touch()
    state = root / "var/lib/ringfence"
    with running_fleet(tmp_path) as fleet:
        package = root / "etc/ringfence/enroll.package"
        package.parent.mkdir(parents=True)
        cli("enroll-package", "create", "--data-dir", str(fleet.data_dir), "--out", str(package),
            "--server", fleet.enroll_target, "--tls-name", "localhost")

        out = dpkg(root, "--install", str(dist / AGENT_DEB))
        assert "enrolled from" in out.stdout, out.stdout + out.stderr
        assert not package.exists(), "postinst must remove the token file after enrolling"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        agent_id = json.loads((state / "enrollment.json").read_text())["agent_id"]
        assert [a.agent_id for a in fleet.store.list_agents()] == [agent_id]
        wants = root / "etc/systemd/system"
        assert (wants / "multi-user.target.wants/ringfence-agent.service").is_symlink()
        assert (wants / "sysinit.target.wants/ringfence-isolation.service").is_symlink()

        # Give the installed agent real state: run it until it streamed, and persist an
        # isolation as the controller does.
        config = tmp_path / "agent.toml"
        config.write_text(AGENT_TOML.format(backend="fake"))
        agent = subprocess.Popen([str(root / "usr/bin/ringfence-agent"), "run", "--state-dir",
                                  str(state), "--config", str(config)], env=CLEAN_ENV,
                                 cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: list(fleet.store.query_events(agent_id, limit=10)), timeout=60,
                     what="events from the installed agent")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
    IsolationController(FakeBackend(), state / "isolation", lambda t: None, lambda: True
                        ).isolate(Policy(collectors=(CollectorEndpoint("198.18.0.1", 8443),)),
                                  "cmd-upgrade", "IR-9")
    assert list((state / "spool").iterdir())
    conffile = root / "etc/ringfence/agent.toml"
    conffile.write_text(conffile.read_text() + "\n[spool]\nmax_bytes = 123456789\n")
    before = snapshot(state)
    for name in ("tls.key", "identity.key", "agent.pem", "ca.pem", "enrollment.json",
                 "commands.json", "isolation/isolation.json"):
        if name != "commands.json":
            assert name in before, name

    # Upgrade to a newer version of the same package.
    unpacked = tmp_path / "unpacked"
    run("dpkg-deb", "-R", str(dist / AGENT_DEB), str(unpacked))
    control = unpacked / "DEBIAN/control"
    control.write_text(control.read_text().replace(f"Version: {VERSION}",
                                                   f"Version: {VERSION}+upgrade1"))
    upgrade = tmp_path / "upgrade.deb"
    run("dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(unpacked),
        str(upgrade))
    dpkg(root, "--force-confold", "--install", str(upgrade))
    status = (root / "var/lib/dpkg/status").read_text()
    assert f"Version: {VERSION}+upgrade1" in status
    assert snapshot(state) == before
    assert "max_bytes = 123456789" in conffile.read_text()
    after = json.loads(run(str(root / "usr/bin/ringfence-agent"), "status", "--state-dir",
                           str(state), "--config", str(config), env=CLEAN_ENV).stdout)
    assert after["agent_id"] == agent_id and after["isolated"] is True

    # Remove keeps evidence, keys, enrollment, isolation state and the conffile.
    dpkg(root, "--remove", "ringfence-agent")
    assert not (root / "usr/bin/ringfence-agent").exists()
    assert snapshot(state) == before
    assert conffile.exists()
    assert not (wants / "multi-user.target.wants/ringfence-agent.service").exists()
    assert not (wants / "sysinit.target.wants/ringfence-isolation.service").exists()
    # Purge deletes them.
    dpkg(root, "--purge", "ringfence-agent")
    assert not state.exists()
    assert not conffile.exists()


# -- isolation with the binary in network namespaces ---------------------------------------------

@pytest.mark.root
@pytest.mark.netns
@pytest.mark.nftables
def test_binary_agent_isolates_reapplies_at_boot_and_releases(dist: Path, tmp_path: Path) -> None:
    binary = clean_binary(dist, tmp_path)
    data, state = tmp_path / "server", tmp_path / "agent"
    config = tmp_path / "agent.toml"
    config.write_text(AGENT_TOML.format(backend="nftables"))
    with topology(["collector", "endpoint", "attacker"]) as topo:
        c, a = topo["collector"], topo["attacker"]

        def admin(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
            result = topo.run("collector", str(BIN / "ringfence"), *args, "--data-dir", str(data),
                              check=False, timeout=timeout)
            assert result.returncode == 0, result.stdout + result.stderr
            return result

        def reaches_attacker() -> bool:
            return topo.python("endpoint", CONNECT, a.ipv4, "4444", "0.7").returncode == 0

        def start_agent() -> subprocess.Popen[str]:
            return topo.spawn("endpoint", [str(binary), "run", "--state-dir", str(state),
                                           "--config", str(config)],
                              log=tmp_path / "agent.log", env=CLEAN_ENV)

        topo.spawn("attacker", python_argv(ECHO_SERVER, "4444"))
        topo.run("collector", str(BIN / "ringfence"), "server", "init", "--data-dir", str(data),
                 "--address", c.ipv4)
        server = topo.spawn("collector", [str(BIN / "ringfence"), "server", "run", "--data-dir",
                                          str(data), "--listen", "[::]:8443", "--enroll",
                                          "[::]:8442", "--admin", "127.0.0.1:8444"],
                            log=tmp_path / "server.log")
        try:
            for port in (8442, 8443, 8444):
                topo.wait_port("collector", port, timeout_s=20, proc=server)
            topo.wait_port("attacker", 4444)
            package = tmp_path / "enroll.package"
            admin("enroll-package", "create", "--out", str(package))
            topo.run("endpoint", str(binary), "enroll", "--package", str(package),
                     "--state-dir", str(state), "--config", str(config), timeout=60,
                     env=CLEAN_ENV)
            agent_id = json.loads((state / "enrollment.json").read_text())["agent_id"]
            agent = start_agent()

            def online() -> bool:
                hosts = json.loads(admin("hosts", "--json").stdout)
                return any(h["agent_id"] == agent_id and h["online"] for h in hosts)

            wait_for(online, timeout=60, interval=0.5, what="the binary agent online")
            marker = f"rf-netns-{uuid.uuid4().hex[:12]}"
            sleeper = topo.spawn("endpoint", [str(marked_sleep(tmp_path, marker)), "60"])
            wait_for(lambda: marker in admin("events", agent_id, "--kind", "process",
                                             "--json", "--limit", "100000").stdout,
                     timeout=60, interval=0.5, what="a process event from the endpoint")
            topo.kill(sleeper)
            before = topo.run("endpoint", "nft", "list", "ruleset").stdout
            assert reaches_attacker()

            isolated = json.loads(admin("isolate", agent_id, "--reason", "packaged e2e",
                                        "--wait", "--json", "--timeout", "60").stdout)
            assert isolated["status"] == "succeeded", isolated
            assert not reaches_attacker()

            # "Reboot": the agent dies, the kernel forgets the rules, the boot unit's command
            # re-applies them before anything connects.
            topo.kill(agent)
            topo.run("endpoint", "nft", "delete", "table", "inet", "ringfence")
            assert reaches_attacker()
            reapplied = topo.run("endpoint", str(binary), "isolation", "reapply", "--state-dir",
                                 str(state), "--config", str(config), env=CLEAN_ENV, timeout=60)
            assert f"re-applied isolation {isolated['command_id']} (isolated" in \
                reapplied.stdout, reapplied.stdout + reapplied.stderr
            assert not reaches_attacker()

            start_agent()
            wait_for(online, timeout=60, interval=0.5, what="the restarted agent online")
            released = json.loads(admin("release", agent_id, "--reason", "packaged e2e done",
                                        "--wait", "--json", "--timeout", "60").stdout)
            assert released["status"] == "succeeded", released
            assert topo.run("endpoint", "nft", "list", "ruleset").stdout == before
            assert reaches_attacker()
        except BaseException:
            for name in ("server.log", "agent.log"):
                path = tmp_path / name
                if path.exists():
                    print(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}")
            raise


@pytest.fixture(autouse=True)
def _no_leftover_units() -> Iterator[None]:
    """Safety net: nothing here may enable units of this machine."""
    wants = Path("/etc/systemd/system/multi-user.target.wants/ringfence-agent.service")
    existed = wants.exists()
    yield
    assert wants.exists() == existed, "a test touched this machine's systemd configuration"
