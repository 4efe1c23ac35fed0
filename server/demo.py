"""`make demo`: ringfence's main job end to end on the embedded default, narrated.

It builds a throwaway lab of network namespaces (collector, endpoint, attacker; addresses from
198.18.0.0/15 and 2001:db8::/32 only), runs the real `ringfence` server and `ringfence-agent`
inside them, shows events, isolates the endpoint and releases it, builds and verifies an
evidence bundle offline, and removes everything it made, also on failure. It never touches the
machine's own network namespace. Without root it runs the loopback part and says why it
skips isolation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from isolation.lab import (
    CONNECT,
    ECHO_SERVER,
    Topology,
    hold_exchange,
    python_argv,
    start_hold,
    topology,
)

BIN = Path(sys.executable).parent
RINGFENCE = str(BIN / "ringfence")
AGENT = str(BIN / "ringfence-agent")
WIDTH = 96


class DemoError(Exception):
    """A demo step did not do what it should; the message says which and why."""


def say(text: str) -> None:
    print(textwrap.fill(text, WIDTH), flush=True)


def step(number: int, title: str) -> None:
    print(f"\n\033[1m== {number}. {title}\033[0m", flush=True)


def show(argv: Sequence[str], result: subprocess.CompletedProcess[str],
         max_lines: int = 14) -> None:
    shown = " ".join(a if " " not in a else repr(a) for a in argv)
    print(f"$ {shown}", flush=True)
    lines = (result.stdout or "").rstrip().splitlines()
    for line in lines[:max_lines]:
        print(f"  {line[:WIDTH + 40]}")
    if len(lines) > max_lines:
        print(f"  ... ({len(lines) - max_lines} more lines)")
    if result.returncode != 0 and result.stderr:
        for line in result.stderr.rstrip().splitlines()[-5:]:
            print(f"  ! {line}")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


class Lab:
    """The demo's hosts and the ringfence processes running in them."""

    def __init__(self, topo: Topology, work: Path) -> None:
        self.topo = topo
        self.work = work
        self.data = work / "server"
        self.state = work / "agent"
        self.collector = topo.hosts["collector"]
        self.endpoint = topo.hosts["endpoint"]
        self.attacker = topo.hosts["attacker"]
        self.agent_proc: subprocess.Popen[str] | None = None

    def rf(self, *args: str, check: bool = True, echo: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A responder command, run on the collector host against its admin API."""
        argv = [RINGFENCE, *args]
        result = self.topo.run("collector", *argv, "--data-dir", str(self.data), check=False,
                               timeout=timeout)
        if echo:
            show(["ringfence", *args], result)
        if check and result.returncode != 0:
            raise DemoError(f"`ringfence {' '.join(args)}` failed: {result.stderr.strip()}")
        return result

    def hosts(self) -> list[dict[str, Any]]:
        out = self.rf("hosts", "--json", echo=False).stdout
        return list(json.loads(out))

    def connect(self, src: str, addr: str, port: int) -> bool:
        return self.topo.python(src, CONNECT, addr, str(port), "1.0").returncode == 0


def run_lab(work: Path) -> None:
    with topology(["collector", "endpoint", "attacker"], prefix="rfdemo") as topo:
        lab = Lab(topo, work)
        c, e, a = lab.collector, lab.endpoint, lab.attacker
        say(f"Lab built: collector {c.ipv4} / {c.ipv6}, endpoint {e.ipv4} / {e.ipv6}, "
            f"attacker {a.ipv4} / {a.ipv6}, each in its own network namespace on one bridge.")

        step(1, "Initialize the server: fleet CA, server certificate, signing key, admin identity")
        argv = [RINGFENCE, "server", "init", "--data-dir", str(lab.data), "--address", c.ipv4,
                "--address", c.ipv6]
        show(["ringfence", *argv[1:]], subprocess.run(argv, capture_output=True, text=True,
                                                       check=True))

        step(2, "Start the server on the collector host (SQLite store under the data dir)")
        server = topo.spawn("collector", [RINGFENCE, "server", "run", "--data-dir",
                                          str(lab.data), "--listen", "[::]:8443",
                                          "--enroll", "[::]:8442", "--admin",
                                          "127.0.0.1:8444"])
        topo.wait_port("collector", 8443, timeout_s=20)
        topo.wait_port("collector", 8444, timeout_s=20)
        say("Listening: enrollment :8442 (TLS), agents :8443 (mutual TLS), admin 127.0.0.1:8444 "
            "(mutual TLS, responder certificates).")

        step(3, "Enroll the endpoint with a single-use token, then run the agent")
        token = lab.rf("token", "create", "--uses", "1", "--ttl", "10m", echo=False)
        print("$ ringfence token create --uses 1 --ttl 10m\n  rft_… (printed once; stored "
              "hashed)")
        enroll = topo.run("endpoint", AGENT, "enroll", "--server", f"{c.ipv4}:8442", "--token",
                          token.stdout.strip(), "--ca", str(lab.data / "pki" / "ca.pem"),
                          "--state-dir", str(lab.state), check=False, timeout=60)
        show(["ringfence-agent", "enroll", "--server", f"{c.ipv4}:8442", "--token", "rft_…",
              "--ca", "ca.pem"], enroll)
        if enroll.returncode != 0:
            raise DemoError(f"enrollment failed: {enroll.stderr.strip()}")
        watched = work / "watched"
        watched.mkdir()
        config = work / "agent.toml"
        # Inside a network namespace the kernel's proc connector is out of reach, so the
        # process sensor polls; every 0.2 s here, to show short-lived commands.
        config.write_text(textwrap.dedent(f"""\
            [sensors.process]
            poll_interval_s = 0.2
            [sensors.file]
            paths = ["{watched}"]
            [sensors.network]
            dns = false
            [isolation]
            backend = "nftables"
            """))
        lab.agent_proc = topo.spawn("endpoint", [AGENT, "run", "--state-dir", str(lab.state),
                                                 "--config", str(config)])
        wait_for(lambda: any(h["online"] for h in lab.hosts()), 30, "the agent to connect")
        lab.rf("hosts")
        host = lab.hosts()[0]["agent_id"]

        step(4, "Activity on the endpoint arrives as hash-chained, signed evidence")
        marker = f"demo-{uuid.uuid4().hex[:8]}"
        topo.run("endpoint", "sh", "-c", f"sleep 1.5; id >/dev/null; "
                 f"echo {marker} > {watched}/dropper.sh; chmod +x {watched}/dropper.sh")
        wait_for(lambda: marker in lab.rf("events", host, "--kind", "process", "--limit",
                                          "100000", "--json", echo=False).stdout,
                 30, "the spawned processes to be stored")
        lab.rf("events", host, "--since", "2m", "--kind", "process", "--limit", "8")
        lab.rf("events", host, "--since", "2m", "--kind", "file", "--limit", "4")

        step(5, "An attacker holds a connection to the endpoint (think: reverse shell)")
        topo.spawn("attacker", python_argv(ECHO_SERVER, "4444"))
        topo.wait_port("attacker", 4444)
        held_v4 = start_hold(topo, "endpoint", a.ipv4, 4444)
        held_v6 = start_hold(topo, "endpoint", a.ipv6, 4444)
        say(f"endpoint -> attacker:4444 over IPv4: {hold_exchange(held_v4)}; over IPv6: "
            f"{hold_exchange(held_v6)}")

        step(6, "Isolate the endpoint: one atomic nftables transaction, IPv4 and IPv6")
        lab.rf("isolate", host, "--reason", "DEMO-1: suspected reverse shell", "--wait")
        lab.rf("hosts")
        v4, v6 = hold_exchange(held_v4), hold_exchange(held_v6)
        say(f"The attacker's established connections: IPv4 {v4}, IPv6 {v6} (cut).")
        new_in = lab.connect("attacker", e.ipv4, 22) or lab.connect("attacker", e.ipv6, 22)
        new_out = lab.connect("endpoint", a.ipv4, 4444) or lab.connect("endpoint", a.ipv6, 4444)
        say(f"New connections attacker->endpoint: {'OPEN (!)' if new_in else 'refused'}; "
            f"endpoint->attacker: {'OPEN (!)' if new_out else 'refused'}.")
        if not v4.startswith("fail") or not v6.startswith("fail") or new_out:
            raise DemoError("isolation did not cut the attacker off")
        marker2 = f"isolated-{uuid.uuid4().hex[:8]}"
        topo.run("endpoint", "sh", "-c", f"sleep 1.5; true {marker2}")
        wait_for(lambda: marker2 in lab.rf("events", host, "--kind", "process", "--limit",
                                           "100000", "--json", echo=False).stdout,
                 30, "events from the isolated host")
        say("The agent still streams through the isolation: a process started after isolation "
            "has arrived at the collector.")
        lab.rf("events", host, "--kind", "isolation", "--limit", "6")

        step(7, "Release: the firewall returns exactly to its pre-isolation state")
        lab.rf("release", host, "--reason", "DEMO-1: host cleaned", "--wait")
        restored = lab.connect("endpoint", a.ipv4, 4444) and lab.connect("endpoint", a.ipv6, 4444)
        say(f"endpoint -> attacker after release: {'works again' if restored else 'STILL BLOCKED'}")
        if not restored:
            raise DemoError("traffic did not come back after release")

        say("Every responder action, allowed or denied, is in the hash-chained audit log:")
        lab.rf("audit")

        step(8, "Package the evidence as a signed bundle and verify it offline")
        bundle = work / "DEMO-1.zip"
        time.sleep(1.2)  # let the agent sign a checkpoint covering the latest events
        lab.rf("bundle", "create", host, "--case", "DEMO-1", "--reason", "demo hand-over",
               "-o", str(bundle))
        agent_key = work / "agent.pub"
        agent_key.write_text(lab.rf("agent", "key", host, echo=False).stdout)
        server.terminate()
        server.wait(timeout=20)
        say("The server is now stopped: verification needs only the bundle and pinned keys.")
        argv = [RINGFENCE, "bundle", "verify", str(bundle), "--trust",
                str(lab.data / "pki" / "signing.pub"), "--trust-agent", str(agent_key)]
        result = subprocess.run(argv, capture_output=True, text=True)
        show(["ringfence", "bundle", "verify", bundle.name, "--trust", "signing.pub",
              "--trust-agent", "agent.pub"], result, max_lines=20)
        if result.returncode != 0:
            raise DemoError("the bundle did not verify")

        step(9, "Stop the agent; clean up")
        if lab.agent_proc is not None:
            lab.agent_proc.terminate()
            lab.agent_proc.wait(timeout=20)


def run_loopback(work: Path) -> None:
    """Without root: the evidence path on loopback, no isolation."""
    data, state = work / "server", work / "agent"
    step(1, "Initialize and start the server on loopback")
    subprocess.run([RINGFENCE, "server", "init", "--data-dir", str(data)], check=True)
    server = subprocess.Popen([RINGFENCE, "server", "run", "--data-dir", str(data), "--listen",
                               "127.0.0.1:0", "--enroll", "127.0.0.1:0", "--admin",
                               "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    agent = None
    try:
        run_file = data / "run" / "server.json"
        wait_for(run_file.exists, 30, "the server to start")
        ports = json.loads(run_file.read_text())
        token = subprocess.run([RINGFENCE, "token", "create", "--data-dir", str(data)],
                               capture_output=True, text=True, check=True).stdout.strip()
        step(2, "Enroll and run an agent")
        subprocess.run([AGENT, "enroll", "--server", f"127.0.0.1:{ports['enroll_port']}",
                        "--token", token, "--ca", str(data / "pki" / "ca.pem"), "--tls-name",
                        "localhost", "--state-dir", str(state)], check=True)
        config = work / "agent.toml"
        config.write_text('[sensors.file]\nenabled = false\n[isolation]\nbackend = "fake"\n')
        agent = subprocess.Popen([AGENT, "run", "--state-dir", str(state), "--config",
                                  str(config)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        step(3, "Spawn processes and query them")
        time.sleep(3)
        subprocess.run(["sh", "-c", "id >/dev/null; uname -a >/dev/null"], check=True)
        time.sleep(2)
        for args in (["hosts"], ["events", os.uname().nodename, "--kind", "process",
                                 "--limit", "8"]):
            argv = [RINGFENCE, *args, "--data-dir", str(data)]
            show(["ringfence", *args], subprocess.run(argv, capture_output=True, text=True))
    finally:
        for proc in (agent, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=20)


def can_isolate() -> str | None:
    """Why the isolation part cannot run here, or None."""
    if os.geteuid() != 0:
        return "isolation needs root (network namespaces and nftables)"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def main() -> int:
    print("\033[1mringfence demo\033[0m: enroll an agent, stream signed evidence, isolate a "
          "host and release it, hand over a verifiable bundle.")
    work = Path(tempfile.mkdtemp(prefix="ringfence-demo-"))
    work.chmod(0o700)
    try:
        reason = can_isolate()
        if reason is None:
            run_lab(work)
        else:
            say(f"Running the loopback part only: {reason}.")
            run_loopback(work)
    except (DemoError, subprocess.CalledProcessError, subprocess.TimeoutExpired,
            TimeoutError) as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print("\ncleaned up: namespaces, processes and the temporary data directory removed.")
    print("\ndemo complete.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
