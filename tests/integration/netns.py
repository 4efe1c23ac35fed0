"""Throwaway network-namespace topologies for integration tests (root only).

`topology(["collector", "endpoint", "attacker"])` builds one namespace per host, all joined by
a Linux bridge in a separate namespace, host number i (1-based, in the order given) getting
198.18.0.i/24 and 2001:db8::i/64 (nodad). It never touches the caller's own namespace; every
namespace and spawned process is removed on exit, also when the test fails. Namespace names
include the pid and a counter so parallel runs do not collide.

Typical use::

    with topology(["collector", "endpoint"]) as topo:
        server = topo.spawn("collector", python_argv(ECHO_SERVER, "8443"))
        topo.wait_port("collector", 8443)
        assert topo.python("endpoint", CONNECT, "198.18.0.1", "8443").returncode == 0
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_COUNTER = itertools.count()
MAX_HOSTS = 50


@dataclass(frozen=True)
class Host:
    """One host: logical `name`, namespace `ns`, addresses without prefix length."""

    name: str
    ns: str
    ipv4: str
    ipv6: str


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


def python_argv(code: str, *args: str) -> list[str]:
    """argv running `code` with the test's interpreter (unbuffered)."""
    return [sys.executable, "-u", "-c", code, *args]


class Topology:
    """Named hosts in namespaces on one bridge. Use `topology()` to get one."""

    def __init__(self, names: Sequence[str], prefix: str = "rf") -> None:
        if not 0 < len(names) <= MAX_HOSTS or len(set(names)) != len(names):
            raise ValueError("need 1..50 distinct host names")
        tag = f"{prefix}{os.getpid()}x{next(_COUNTER)}"
        self.bridge_ns = f"{tag}-br"
        self.hosts = {
            n: Host(n, f"{tag}-{n}", f"198.18.0.{i}", f"2001:db8::{i:x}")
            for i, n in enumerate(names, start=1)
        }
        self._procs: list[subprocess.Popen[str]] = []
        self._created: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def build(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self._created.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts.values(), start=1):
            _ip("netns", "add", host.ns)
            self._created.append(host.ns)
            _ip("-n", host.ns, "link", "set", "lo", "up")
            _ip(
                "-n",
                self.bridge_ns,
                "link",
                "add",
                f"vh{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.ns,
            )
            _ip("-n", self.bridge_ns, "link", "set", f"vh{i}", "master", "br0", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ipv4}/24", "dev", "eth0")
            _ip("-n", host.ns, "addr", "add", f"{host.ipv6}/64", "dev", "eth0", "nodad")
            _ip("-n", host.ns, "link", "set", "eth0", "up")

    def run(
        self,
        host: str,
        *argv: str,
        check: bool = True,
        timeout: float = 10.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside host's namespace and wait (bounded by `timeout`)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[host].ns, *argv],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
        )

    def python(
        self, host: str, code: str, *args: str, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run Python `code` (with argv `args`) inside host's namespace."""
        return self.run(host, *python_argv(code, *args), check=False, timeout=timeout)

    def spawn(self, host: str, argv: Sequence[str]) -> subprocess.Popen[str]:
        """Start a long-running process in host's namespace; killed at teardown."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host].ns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._procs.append(proc)
        return proc

    def wait_port(self, host: str, port: int, timeout_s: float = 5.0) -> None:
        """Wait until something listens on TCP `port` in host's namespace."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            out = self.run(host, "ss", "-Hltn", f"sport = :{port}", check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on {host}:{port}")

    def close(self) -> None:
        """Kill spawned processes and delete every namespace (best effort, never raises)."""
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.communicate(timeout=5)
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        self._created.clear()


@contextlib.contextmanager
def topology(names: Sequence[str], prefix: str = "rf") -> Iterator[Topology]:
    """Build a topology, yield it, and always tear it down."""
    topo = Topology(names, prefix)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


# Small programs to run inside hosts. -------------------------------------------------------

ECHO_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1]); udp = len(sys.argv) > 2 and sys.argv[2] == "udp"
kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
if udp:
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
s.listen(64)
def serve(c):
    with c:
        while True:
            data = c.recv(2048)
            if not data:
                return
            c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# argv: address port [timeout_s] [udp]. Exit 0 when an echo came back, 1 otherwise.
CONNECT = r"""
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
udp = len(sys.argv) > 4 and sys.argv[4] == "udp"
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
try:
    if udp:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.sendto(b"probe", (addr, port)); ok = s.recvfrom(2048)[0] == b"probe"
    else:
        s = socket.create_connection((addr, port), timeout=timeout)
        s.sendall(b"probe"); ok = s.recv(2048) == b"probe"
except OSError as e:
    print(f"fail {e!r}"); sys.exit(1)
sys.exit(0 if ok else 1)
"""

# argv: address port. Holds one TCP connection; for each stdin line sends it and prints
# "ok" when echoed within 1 s, else "fail ...".
HOLD = r"""
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((addr, port), timeout=2)
s.settimeout(1.0)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode()); data = s.recv(2048)
        print("ok" if data == line.encode() else f"fail {data!r}", flush=True)
    except OSError as e:
        print(f"fail {e!r}", flush=True)
"""


def hold_exchange(proc: subprocess.Popen[str], timeout_s: float = 5.0) -> str:
    """Ask a HOLD process to exchange one message; return its verdict line."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("ping\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        return "fail no answer"
    return proc.stdout.readline().strip()


def start_hold(topo: Topology, host: str, addr: str, port: int) -> subprocess.Popen[str]:
    """Open a held TCP connection from `host` to addr:port and wait until it is connected."""
    proc = topo.spawn(host, python_argv(HOLD, addr, str(port)))
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 5.0)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "connected":
        raise RuntimeError(f"could not connect {host} -> {addr}:{port}: {line!r}")
    return proc
