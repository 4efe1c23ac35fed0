"""Killing the one process a responder named, never a process that reused its pid.

The command carries the process identity (pid, start time, executable) taken from the stored
launch event or given by the responder. The agent pins the process with a pidfd, re-reads its
identity from /proc and signals only through that pidfd, so a pid reused between the check and
the signal cannot be hit. With `tree`, every descendant is stopped first (no new forks slip
through), then the whole tree is killed. It does not decide who may kill (the server does).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from agent.actions.errors import ActionRefused
from agent.sensors.procfs import ProcParseError, parse_stat

logger = logging.getLogger(__name__)

# One clock tick at USER_HZ=100: the start time of a process is known to a tick, so two
# readings of the same process may differ by at most that much.
START_TIME_TOLERANCE_NS = 10_000_000
MAX_TREE = 4096
STABLE_SCANS = 5
EXIT_WAIT_S = 5.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_DELETED = " (deleted)"


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time_ns: int
    exe: str
    deleted: bool = False          # the executable was deleted from disk after it started

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "start_time_ns": self.start_time_ns, "exe": self.exe,
                "exe_deleted": self.deleted}


@dataclass
class KillReport:
    target: ProcessIdentity
    killed: list[ProcessIdentity] = field(default_factory=list)
    exited: list[int] = field(default_factory=list)
    vanished: list[int] = field(default_factory=list)   # exited on their own before the signal

    def as_dict(self) -> dict[str, object]:
        return {"target": self.target.as_dict(),
                "killed": [p.as_dict() for p in self.killed],
                "exited": sorted(self.exited), "vanished": sorted(self.vanished)}


def boot_time_ns() -> int:
    with open("/proc/stat", "rb") as f:
        for line in f.read(1 << 20).split(b"\n"):
            if line.startswith(b"btime "):
                return int(line.split()[1]) * 1_000_000_000
    raise OSError("no btime in /proc/stat")


def read_identity(pid: int, boot_ns: int) -> ProcessIdentity:
    """The identity of the process now holding `pid`; ProcessLookupError when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = parse_stat(f.read())
    except FileNotFoundError as e:
        raise ProcessLookupError(pid) from e
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError as e:
        raise ProcessLookupError(pid) from e
    except OSError:
        exe = ""                   # kernel thread, or a zombie
    deleted = exe.endswith(_DELETED)
    if deleted:
        exe = exe[: -len(_DELETED)]
    return ProcessIdentity(pid, boot_ns + st.start_ticks * 1_000_000_000 // _CLK_TCK, exe,
                           deleted)


def identity_mismatch(expected: ProcessIdentity, found: ProcessIdentity) -> str:
    """Why `found` is not the process meant by `expected` ("" when it is). Pure."""
    if expected.start_time_ns and abs(expected.start_time_ns - found.start_time_ns) > \
            START_TIME_TOLERANCE_NS:
        return (f"pid {found.pid} now belongs to a process started at {found.start_time_ns} ns, "
                f"not {expected.start_time_ns} ns: the pid was reused")
    if expected.exe and expected.exe != found.exe:
        return (f"pid {found.pid} now runs {found.exe or '(no executable)'}, not "
                f"{expected.exe}: the pid was reused or the process exec'd")
    if not expected.start_time_ns and not expected.exe:
        return "no start time or executable to check the process identity against"
    return ""


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                st = parse_stat(f.read())
        except (OSError, ProcParseError):
            continue
        children.setdefault(st.ppid, []).append(st.pid)
    return children


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid` (breadth first), bounded by MAX_TREE."""
    children = _children_map()
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo and len(found) < MAX_TREE:
        child = todo.pop(0)
        if child in found or child == pid:
            continue
        found.append(child)
        todo.extend(children.get(child, []))
    return found


class _Pinned:
    """A process held by a pidfd together with the identity read after pinning it."""

    def __init__(self, pid: int, boot_ns: int) -> None:
        self.fd = os.pidfd_open(pid)
        try:
            self.identity = read_identity(pid, boot_ns)
        except BaseException:
            os.close(self.fd)
            raise

    def signal(self, sig: int) -> bool:
        try:
            signal.pidfd_send_signal(self.fd, sig)
            return True
        except ProcessLookupError:
            return False

    def wait_exit(self, timeout_s: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(timeout_s, 0.0))
        return bool(ready)

    def close(self) -> None:
        os.close(self.fd)


def _pin(pid: int, boot_ns: int) -> _Pinned | None:
    try:
        return _Pinned(pid, boot_ns)
    except (ProcessLookupError, FileNotFoundError):
        return None


def _iter_new(pids: list[int], pinned: dict[int, _Pinned]) -> Iterator[int]:
    return (p for p in pids if p not in pinned)


def kill_process(expected: ProcessIdentity, tree: bool) -> KillReport:
    """Kill the process `expected` names (and its descendants with `tree`).

    Raises ActionRefused, changing nothing, when the pid is gone, protected, or now belongs to
    another process."""
    if expected.pid <= 1:
        raise ActionRefused(f"refusing to kill pid {expected.pid}")
    if expected.pid == os.getpid():
        raise ActionRefused("refusing to kill the ringfence agent itself")
    boot_ns = boot_time_ns()
    root = _pin(expected.pid, boot_ns)
    if root is None:
        raise ActionRefused(f"no process with pid {expected.pid}: it has already exited")
    pinned: dict[int, _Pinned] = {expected.pid: root}
    try:
        mismatch = identity_mismatch(expected, root.identity)
        if mismatch:
            raise ActionRefused(f"{mismatch}; nothing was killed")
        if not root.identity.exe:
            raise ActionRefused(f"pid {expected.pid} is a kernel thread; nothing was killed")
        report = KillReport(root.identity)
        if tree:
            # Freeze the tree first so nothing in it can fork a new child we would miss.
            root.signal(signal.SIGSTOP)
            for _ in range(STABLE_SCANS):
                new = list(_iter_new(descendants(expected.pid), pinned))
                if not new:
                    break
                for pid in new:
                    held = _pin(pid, boot_ns)
                    if held is None:
                        report.vanished.append(pid)
                        continue
                    pinned[pid] = held
                    held.signal(signal.SIGSTOP)
        for pid, held in pinned.items():
            if held.signal(signal.SIGKILL):
                report.killed.append(held.identity)
            else:
                report.vanished.append(pid)
        deadline = time.monotonic() + EXIT_WAIT_S
        for pid, held in pinned.items():
            if held.wait_exit(deadline - time.monotonic()):
                report.exited.append(pid)
        logger.warning("killed pid %d (%s)%s", expected.pid, root.identity.exe,
                       f" and {len(report.killed) - 1} descendants" if tree else "")
        return report
    finally:
        for held in pinned.values():
            held.close()
