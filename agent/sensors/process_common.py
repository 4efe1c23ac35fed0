"""Process enrichment shared by the netlink and psutil process sensors: an immediate raw
snapshot of /proc/<pid>, and the slower part (parsing, user names, exe SHA-256, parent lookup)
that turns it into a `pb.Process`. It does not receive events or run threads.

Hashing choice: the receive thread never hashes. The enrichment thread hashes an executable
synchronously on a cache miss, so a launch event always carries `exe_sha256` when the file is
readable and under the cap; the LRU keyed by (st_dev, st_ino, st_size, st_mtime_ns) makes a
storm of the same binary cost one hash.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import pwd
import stat as stat_mod
import threading
from typing import NamedTuple

from agent.sensors import procfs
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CHUNK = 1024 * 1024

ExeKey = tuple[int, int, int, int]


class RawSnapshot(NamedTuple):
    """Bytes read from /proc/<pid> right away; None where the read failed."""

    pid: int
    exe: bytes | None
    exe_key: ExeKey | None
    cmdline: bytes | None
    cwd: bytes | None
    stat: bytes | None
    status: bytes | None


def _read(path: str, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks: list[bytes] = []
        total = 0
        while total < limit:
            b = os.read(fd, min(limit - total, 128 * 1024))
            if not b:
                break
            chunks.append(b)
            total += len(b)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_snapshot(pid: int, argv_max_bytes: int) -> RawSnapshot:
    """Read what identifies a process as fast as possible; never raises for a vanished pid."""
    base = f"/proc/{pid}/"
    try:
        exe: bytes | None = os.readlink(base.encode() + b"exe")
    except OSError:
        exe = None
    # cmdline right after exe: both vanish when the process exits, and short-lived processes
    # exit within a millisecond of exec.
    cmdline = _read(base + "cmdline", argv_max_bytes + 1)
    key: ExeKey | None = None
    if exe is not None:
        try:
            st = os.stat(base + "exe")
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
    try:
        cwd: bytes | None = os.readlink(base.encode() + b"cwd")
    except OSError:
        cwd = None
    return RawSnapshot(pid, exe, key, cmdline, cwd, _read(base + "stat", 4096),
                       _read(base + "status", 16384))


class ProcInfo(NamedTuple):
    """What the pid cache remembers of a live process (for parents and exits)."""

    start_ticks: int
    ppid: int
    name: str
    exe: bytes
    uid: int
    user: str


class LRU:
    """A small bounded mapping with least-recently-used eviction (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self._cap = max(1, capacity)
        self._d: collections.OrderedDict[object, object] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> object | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: object, value: object) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self._cap:
                self._d.popitem(last=False)

    def pop(self, key: object) -> object | None:
        with self._lock:
            return self._d.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)


def boot_time_ns() -> int:
    """Boot time from /proc/stat `btime` (seconds resolution, as the kernel gives it)."""
    raw = _read("/proc/stat", 1 << 20) or b""
    for line in raw.split(b"\n"):
        if line.startswith(b"btime "):
            return int(line.split()[1]) * 1_000_000_000
    return 0


class Enricher:
    """Turns raw snapshots into `pb.Process`, with bounded caches for users, hashes and pids."""

    def __init__(self, argv_max_bytes: int, hash_max_bytes: int, hash_cache_entries: int,
                 pid_cache_entries: int) -> None:
        self.argv_max_bytes = argv_max_bytes
        self.hash_max_bytes = hash_max_bytes
        self._hashes = LRU(hash_cache_entries)
        self._users = LRU(1024)
        self.pids = LRU(pid_cache_entries)
        self._boot_ns = boot_time_ns()
        self.hashes_computed = 0

    def user_name(self, uid: int) -> str:
        cached = self._users.get(uid)
        if isinstance(cached, str):
            return cached
        try:
            name = pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            name = ""
        self._users.put(uid, name)
        return name

    def exe_sha256(self, pid: int, exe: bytes, key: ExeKey) -> str | None:
        """Hash of the executable, cached by (dev, ino, size, mtime); None when unreadable/large."""
        cached = self._hashes.get(key)
        if isinstance(cached, str):
            return cached
        if key[2] > self.hash_max_bytes:
            return None
        # /proc/<pid>/exe works for deleted binaries while the process lives; the path is the
        # fallback after it exits, accepted only if it is still the same file.
        for path in (f"/proc/{pid}/exe".encode(), exe):
            digest = _hash_file(path, key)
            if digest is not None:
                self._hashes.put(key, digest)
                self.hashes_computed += 1
                return digest
        return None

    def build(self, snap: RawSnapshot, proc: pb.Process) -> None:
        """Fill `proc` from a snapshot; every field that could not be read goes to unavailable."""
        missing: list[str] = []
        proc.pid = snap.pid
        st: procfs.ProcStat | None = None
        status: procfs.ProcStatus | None = None
        if snap.stat is not None:
            try:
                st = procfs.parse_stat(snap.stat)
            except procfs.ProcParseError:
                st = None
        if snap.status is not None:
            try:
                status = procfs.parse_status(snap.status)
            except procfs.ProcParseError:
                status = None
        if st is not None:
            proc.name = st.comm.decode("utf-8", "backslashreplace")
            proc.ppid = st.ppid
            proc.session_id = st.session & 0xFFFFFFFF
            proc.tty_nr = st.tty_nr & 0xFFFFFFFF
            proc.start_time_ns = self._boot_ns + st.start_ticks * 1_000_000_000 // _CLK_TCK
        else:
            missing += ["start_time", "session_id", "tty_nr"]
        if status is not None:
            proc.uid, proc.euid, proc.gid = status.uid, status.euid, status.gid
            proc.user = self.user_name(status.uid)
            proc.ppid = proc.ppid or status.ppid
            if not proc.name:
                proc.name = status.name.decode("utf-8", "backslashreplace")
        else:
            missing += ["uid", "gid", "euid", "user"]
        if st is None and status is None:
            missing += ["name", "ppid"]
        if snap.exe is not None:
            proc.exe = snap.exe
        else:
            missing.append("exe")
        if snap.cmdline:
            argv, truncated = procfs.split_cmdline(snap.cmdline, self.argv_max_bytes)
            proc.argv.extend(argv)
            proc.argv_truncated = truncated
        else:
            # Empty cmdline: exited (or a kernel thread); either way argv is not known.
            missing.append("argv")
        if snap.cwd is not None:
            proc.cwd = snap.cwd
        else:
            missing.append("cwd")
        digest = None
        if snap.exe is not None and snap.exe_key is not None:
            digest = self.exe_sha256(snap.pid, snap.exe, snap.exe_key)
        if digest is not None:
            proc.exe_sha256 = digest
        else:
            missing.append("exe_sha256")
        proc.unavailable.extend(missing)
        if st is not None:
            self.pids.put(snap.pid, ProcInfo(st.start_ticks, proc.ppid, proc.name, proc.exe,
                                             proc.uid, proc.user))

    def fill_parent(self, ppid: int, parent: pb.Process) -> None:
        """Parent from the pid cache, else a quick /proc read (no hashing)."""
        if ppid == 0:
            return
        info = self.pids.get(ppid)
        if not isinstance(info, ProcInfo):
            info = self.remember(ppid)
        parent.pid = ppid
        if info is None:
            parent.unavailable.extend(["name", "exe", "uid"])
            return
        parent.ppid, parent.name, parent.exe = info.ppid, info.name, info.exe
        parent.uid, parent.user = info.uid, info.user
        parent.start_time_ns = self._boot_ns + info.start_ticks * 1_000_000_000 // _CLK_TCK

    def remember(self, pid: int) -> ProcInfo | None:
        """Read a process's identity into the pid cache (no hash, no argv)."""
        raw_stat = _read(f"/proc/{pid}/stat", 4096)
        if raw_stat is None:
            return None
        try:
            st = procfs.parse_stat(raw_stat)
        except procfs.ProcParseError:
            return None
        status = None
        raw_status = _read(f"/proc/{pid}/status", 16384)
        if raw_status is not None:
            try:
                status = procfs.parse_status(raw_status)
            except procfs.ProcParseError:
                status = None
        try:
            exe = os.readlink(f"/proc/{pid}/exe".encode())
        except OSError:
            exe = b""
        uid = status.uid if status else 0
        info = ProcInfo(st.start_ticks, st.ppid, st.comm.decode("utf-8", "backslashreplace"),
                        exe, uid, self.user_name(uid) if status else "")
        self.pids.put(pid, info)
        return info

    def fill_from_cache(self, pid: int, proc: pb.Process) -> ProcInfo | None:
        """For exits: what the cache knew about the process; missing fields go to unavailable."""
        proc.pid = pid
        info = self.pids.pop(pid)
        if not isinstance(info, ProcInfo):
            proc.unavailable.extend(["name", "exe", "uid", "start_time"])
            return None
        proc.ppid, proc.name, proc.exe = info.ppid, info.name, info.exe
        proc.uid, proc.user = info.uid, info.user
        proc.start_time_ns = self._boot_ns + info.start_ticks * 1_000_000_000 // _CLK_TCK
        return info


def _hash_file(path: bytes, key: ExeKey) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != key:
            return None
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def list_pids() -> list[int]:
    """Numeric entries of /proc (all processes visible to us)."""
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def start_ticks_of(pid: int) -> int | None:
    """A process's start time in ticks (its identity together with the pid), None if gone."""
    raw = _read(f"/proc/{pid}/stat", 4096)
    if raw is None:
        return None
    try:
        return procfs.parse_stat(raw).start_ticks
    except procfs.ProcParseError:
        return None


def launch_event(enricher: Enricher, snap: RawSnapshot, time_ns: int, source: str) -> pb.Event:
    """A ProcessActivity launch (activity 1) from a snapshot, with its parent filled in."""
    ev = pb.Event(time_ns=time_ns, severity_id=1)
    act = ev.process
    act.activity_id = 1
    act.source = source
    enricher.build(snap, act.process)
    enricher.fill_parent(act.process.ppid, act.parent_process)
    return ev
