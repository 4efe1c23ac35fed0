"""Throwaway network namespaces for demos and tests; never touches the caller's namespace.

`topology(["collector", "endpoint", "attacker"])` builds one namespace per host, all joined by
a Linux bridge in a separate namespace, host number i (1-based, in the order given) getting
198.18.0.i/24 and 2001:db8::i/64 (nodad; benchmarking addresses only, RFC 2544 / RFC 3849).
Every namespace and every process spawned in it is removed on exit, also when the caller
fails: process groups are killed, any process still inside a namespace is killed, and the
namespaces are deleted. Namespace names include the pid and a counter so parallel runs do not
collide. Standard library only; needs root and iproute2.

Typical use::

    with topology(["collector", "endpoint"]) as topo:
        topo.spawn("collector", python_argv(ECHO_SERVER, "8443"))
        topo.wait_port("collector", 8443)
        assert topo.python("endpoint", CONNECT, "198.18.0.1", "8443").returncode == 0
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

logger = logging.getLogger(__name__)

_COUNTER = itertools.count()
MAX_HOSTS = 50
IP_TIMEOUT_S = 10.0


class LabError(Exception):
    """A namespace could not be built or a process in it did not come up."""


@dataclass(frozen=True)
class Host:
    """One host: logical `name`, namespace `ns`, addresses without prefix length."""

    name: str
    ns: str
    ipv4: str
    ipv6: str


def _ip(*argv: str) -> None:
    try:
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=IP_TIMEOUT_S)
    except subprocess.CalledProcessError as e:
        raise LabError(f"ip {' '.join(argv)} failed: {e.stderr.decode(errors='replace')}") from e


def python_argv(code: str, *args: str) -> list[str]:
    """argv running `code` with this interpreter (unbuffered)."""
    return [sys.executable, "-u", "-c", code, *args]


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL, wait_s: float = 5.0) -> None:
    """Send `sig` to the process group of `proc` (spawned with its own session) and reap it.
    Never raises: the group may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


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
        self._logs: list[IO[str]] = []
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
            _ip("-n", self.bridge_ns, "link", "add", f"vh{i}", "type", "veth",
                "peer", "name", "eth0", "netns", host.ns)
            _ip("-n", self.bridge_ns, "link", "set", f"vh{i}", "master", "br0", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ipv4}/24", "dev", "eth0")
            _ip("-n", host.ns, "addr", "add", f"{host.ipv6}/64", "dev", "eth0", "nodad")
            _ip("-n", host.ns, "link", "set", "eth0", "up")

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """argv that runs `argv` inside host's namespace."""
        return ["ip", "netns", "exec", self.hosts[host].ns, *argv]

    def run(
        self,
        host: str,
        *argv: str,
        check: bool = True,
        timeout: float = 10.0,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside host's namespace and wait (bounded by `timeout`)."""
        return subprocess.run(
            self.exec_argv(host, argv),
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            env=None if env is None else dict(env),
        )

    def python(
        self, host: str, code: str, *args: str, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run Python `code` (with argv `args`) inside host's namespace."""
        return self.run(host, *python_argv(code, *args), check=False, timeout=timeout)

    def spawn(
        self,
        host: str,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start a long-running process in host's namespace, in its own process group; it and
        its children are killed at teardown.

        Without `log` stdin/stdout/stderr are pipes (for small interactive helpers); with `log`
        stdout and stderr are appended to that file and stdin is /dev/null, so a chatty
        daemon can never block on a full pipe.
        """
        if log is None:
            proc = subprocess.Popen(
                self.exec_argv(host, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=True,
                env=None if env is None else dict(env))
        else:
            handle = log.open("a")
            self._logs.append(handle)
            proc = subprocess.Popen(
                self.exec_argv(host, argv), stdin=subprocess.DEVNULL, stdout=handle,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                env=None if env is None else dict(env))
        self._procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
        """Signal a spawned process's group and reap it (SIGKILL by default)."""
        kill_group(proc, sig)

    def wait_port(self, host: str, port: int, timeout_s: float = 5.0,
                  proc: subprocess.Popen[str] | None = None) -> None:
        """Wait until something listens on TCP `port` in host's namespace; fail early when
        `proc` (the process expected to listen) exits."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            out = self.run(host, "ss", "-Hltn", f"sport = :{port}", check=False).stdout
            if out.strip():
                return
            if proc is not None and proc.poll() is not None:
                raise LabError(f"process {proc.args!r} exited {proc.returncode} before "
                               f"listening on {host}:{port}")
            time.sleep(0.05)
        raise LabError(f"nothing listens on {host}:{port} after {timeout_s} s")

    def close(self) -> None:
        """Kill spawned processes (whole groups), anything left inside the namespaces, and
        delete every namespace. Best effort for each step; never raises."""
        for proc in reversed(self._procs):
            kill_group(proc)
        self._procs.clear()
        for ns in reversed(self._created):
            try:
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True, timeout=IP_TIMEOUT_S, check=False).stdout
            except (OSError, subprocess.SubprocessError) as e:
                logger.warning("cannot list processes in %s: %s", ns, e)
                pids = ""
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                               timeout=IP_TIMEOUT_S, check=False)
            except (OSError, subprocess.SubprocessError) as e:
                logger.error("could not delete namespace %s: %s", ns, e)
        self._created.clear()
        for handle in self._logs:
            with contextlib.suppress(OSError):
                handle.close()
        self._logs.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def topology(names: Sequence[str], prefix: str = "rf") -> Iterator[Topology]:
    """Build a topology, yield it, and always tear it down (also if building fails halfway)."""
    topo = Topology(names, prefix)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


# Small programs to run inside hosts. -------------------------------------------------------

# argv: port [udp]. Echoes every TCP stream (or UDP datagram) back, dual-stack.
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
    if proc.stdin is None or proc.stdout is None:
        raise LabError("hold_exchange needs a process spawned without a log (pipes)")
    try:
        proc.stdin.write("ping\n")
        proc.stdin.flush()
    except OSError as e:
        return f"fail {e!r}"
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        return "fail no answer"
    return proc.stdout.readline().strip() or "fail closed"


def start_hold(topo: Topology, host: str, addr: str, port: int) -> subprocess.Popen[str]:
    """Open a held TCP connection from `host` to addr:port and wait until it is connected."""
    proc = topo.spawn(host, python_argv(HOLD, addr, str(port)))
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 5.0)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "connected":
        raise LabError(f"could not connect {host} -> {addr}:{port}: {line!r}")
    return proc


__all__ = [
    "CONNECT",
    "ECHO_SERVER",
    "HOLD",
    "Host",
    "LabError",
    "Topology",
    "hold_exchange",
    "kill_group",
    "python_argv",
    "start_hold",
    "topology",
]
