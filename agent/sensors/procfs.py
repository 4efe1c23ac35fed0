"""Pure parsers for Linux /proc text and proc-connector netlink bytes (linux/cn_proc.h).

Nothing here does IO: callers read the bytes and decide what to tolerate; every parser raises
`ProcParseError` on malformed input instead of guessing.
"""

from __future__ import annotations

import logging
import struct
from typing import NamedTuple

from agent.sensors.base import SensorError

logger = logging.getLogger(__name__)


class ProcParseError(SensorError, ValueError):
    """Bytes from /proc or the proc connector did not have the expected shape."""


# --- /proc/<pid>/stat ----------------------------------------------------------------------


class ProcStat(NamedTuple):
    pid: int
    comm: bytes
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    start_ticks: int  # starttime, clock ticks since boot


def parse_stat(raw: bytes) -> ProcStat:
    """Parse /proc/<pid>/stat; comm may contain spaces and parentheses, so split at the last ')'."""
    open_i = raw.find(b"(")
    close_i = raw.rfind(b")")
    if open_i < 0 or close_i < open_i:
        raise ProcParseError("stat: no (comm)")
    try:
        pid = int(raw[:open_i].strip())
        rest = raw[close_i + 1:].split()
        # rest[0] is field 3 (state); starttime is field 22 -> rest[19].
        return ProcStat(
            pid=pid,
            comm=raw[open_i + 1:close_i],
            state=rest[0].decode("ascii", "replace"),
            ppid=int(rest[1]),
            pgrp=int(rest[2]),
            session=int(rest[3]),
            tty_nr=int(rest[4]),
            start_ticks=int(rest[19]),
        )
    except (ValueError, IndexError) as e:
        raise ProcParseError(f"stat: {e}") from e


# --- /proc/<pid>/status --------------------------------------------------------------------


class ProcStatus(NamedTuple):
    name: bytes
    ppid: int
    uid: int
    euid: int
    gid: int
    egid: int


def parse_status(raw: bytes) -> ProcStatus:
    """Parse the Name, PPid, Uid and Gid lines of /proc/<pid>/status."""
    fields: dict[bytes, bytes] = {}
    for line in raw.split(b"\n"):
        key, sep, value = line.partition(b":")
        if sep and key in (b"Name", b"PPid", b"Uid", b"Gid"):
            fields[key] = value.strip(b" \t")
    try:
        uids = fields[b"Uid"].split()
        gids = fields[b"Gid"].split()
        return ProcStatus(
            name=fields.get(b"Name", b""),
            ppid=int(fields[b"PPid"]),
            uid=int(uids[0]),
            euid=int(uids[1]),
            gid=int(gids[0]),
            egid=int(gids[1]),
        )
    except (KeyError, ValueError, IndexError) as e:
        raise ProcParseError(f"status: missing or bad field {e}") from e


# --- /proc/<pid>/cmdline -------------------------------------------------------------------


def split_cmdline(raw: bytes, max_bytes: int) -> tuple[list[bytes], bool]:
    """Split NUL-separated argv, keeping at most `max_bytes` of it; returns (argv, truncated).

    Bytes are kept raw (arguments need not be UTF-8). A missing trailing NUL is tolerated, as
    is a process that rewrote its argv area into one space-separated string.
    """
    truncated = len(raw) > max_bytes
    if truncated:
        raw = raw[:max_bytes]
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    if not raw:
        return [], truncated
    return raw.split(b"\0"), truncated


def render_cmdline(argv: list[bytes]) -> str:
    """The space-joined, backslash-escaped rendering of raw argv (OCSF cmd_line)."""
    return " ".join(a.decode("utf-8", "backslashreplace") for a in argv)


# --- proc connector (netlink) --------------------------------------------------------------

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3

PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_UID = 0x4
PROC_EVENT_GID = 0x40
PROC_EVENT_SID = 0x80
PROC_EVENT_PTRACE = 0x100
PROC_EVENT_COMM = 0x200
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")      # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")       # idx, val, seq, ack, len, flags
_PROC_HDR = struct.Struct("=IIQ")        # what, cpu, timestamp_ns (monotonic)
_FORK = struct.Struct("=IIII")           # parent_pid, parent_tgid, child_pid, child_tgid
_EXEC = struct.Struct("=II")             # process_pid, process_tgid
_EXIT = struct.Struct("=IIII")           # process_pid, process_tgid, exit_code, exit_signal
_EXIT_PARENT = struct.Struct("=II")      # parent_pid, parent_tgid (kernel >= 4.17)


class ProcEvent(NamedTuple):
    """One proc-connector event. For fork, pid/tgid are the child and ppid/ptgid the parent."""

    what: int
    pid: int
    tgid: int
    ppid: int = 0
    ptgid: int = 0
    exit_status: int = 0     # raw wait status (exit events)
    timestamp_ns: int = 0    # kernel monotonic clock


def build_mcast_message(port_id: int, op: int = PROC_CN_MCAST_LISTEN) -> bytes:
    """The nlmsghdr + cn_msg + op datagram that (un)subscribes from proc events."""
    payload = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0)
    total = _NLMSGHDR.size + len(cn) + len(payload)
    return _NLMSGHDR.pack(total, NLMSG_DONE, 0, 0, port_id) + cn + payload


def parse_netlink(buf: bytes) -> list[ProcEvent]:
    """Parse every proc event in one netlink datagram; skip other connector messages."""
    events: list[ProcEvent] = []
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        nl_len, nl_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if nl_len < _NLMSGHDR.size or off + nl_len > len(buf):
            raise ProcParseError(f"netlink: bad nlmsg_len {nl_len} at {off}")
        if nl_type == NLMSG_ERROR:
            raise ProcParseError("netlink: NLMSG_ERROR")
        body = off + _NLMSGHDR.size
        end = off + nl_len
        if end - body >= _CN_MSG.size:
            idx, val, _s, _a, cn_len, _f = _CN_MSG.unpack_from(buf, body)
            data = body + _CN_MSG.size
            if idx == CN_IDX_PROC and val == CN_VAL_PROC and data + cn_len <= end:
                ev = _parse_proc_event(buf, data, data + cn_len)
                if ev is not None:
                    events.append(ev)
        off += (nl_len + 3) & ~3  # NLMSG_ALIGN
    return events


def _parse_proc_event(buf: bytes, off: int, end: int) -> ProcEvent | None:
    if end - off < _PROC_HDR.size:
        raise ProcParseError("proc_event: short header")
    what, _cpu, ts = _PROC_HDR.unpack_from(buf, off)
    off += _PROC_HDR.size
    try:
        if what == PROC_EVENT_FORK:
            ppid, ptgid, pid, tgid = _FORK.unpack_from(buf, off)
            return ProcEvent(what, pid, tgid, ppid, ptgid, 0, ts)
        if what == PROC_EVENT_EXEC:
            pid, tgid = _EXEC.unpack_from(buf, off)
            return ProcEvent(what, pid, tgid, 0, 0, 0, ts)
        if what == PROC_EVENT_EXIT:
            pid, tgid, status, _sig = _EXIT.unpack_from(buf, off)
            ppid = ptgid = 0
            if end - off >= _EXIT.size + _EXIT_PARENT.size:
                ppid, ptgid = _EXIT_PARENT.unpack_from(buf, off + _EXIT.size)
            return ProcEvent(what, pid, tgid, ppid, ptgid, status, ts)
    except struct.error as e:
        raise ProcParseError(f"proc_event {what:#x}: short body") from e
    if what == PROC_EVENT_NONE:
        return None  # the ack of our LISTEN request
    return None  # uid/gid/sid/comm/ptrace/coredump: not used yet


def wait_status_to_exit_code(status: int) -> int:
    """Exit code as `os.waitstatus_to_exitcode` renders it: code, or -signal when killed."""
    sig = status & 0x7F
    if sig:
        return -sig
    return (status >> 8) & 0xFF
