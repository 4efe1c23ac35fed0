"""Pure /proc and proc-connector parsers on canned bytes."""

from __future__ import annotations

import struct

import pytest

from agent.sensors import procfs
from agent.sensors.procfs import ProcParseError

STAT_PLAIN = (b"4242 (bash) S 4100 4242 4242 34817 4300 4194304 1000 0 0 0 10 5 0 0 20 0 1 0 "
              b"987654 10000000 500 18446744073709551615 1 1 0 0 0 0 65536 3670020 1266777851 "
              b"0 0 0 17 1 0 0 0 0 0\n")
# comm with spaces, parentheses and a fake ") S 1 " inside it.
STAT_HOSTILE = (b"77 (a) S 1 (x y)) R 55 77 9 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 "
                b"123 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")

STATUS = (b"Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t900\nNgid:\t0\nPid:\t900\n"
          b"PPid:\t850\nTracerPid:\t0\nUid:\t1000\t0\t0\t0\nGid:\t100\t101\t101\t101\n"
          b"FDSize:\t64\n")


def test_stat_plain() -> None:
    st = procfs.parse_stat(STAT_PLAIN)
    assert (st.pid, st.comm, st.state, st.ppid, st.session, st.tty_nr, st.start_ticks) == (
        4242, b"bash", "S", 4100, 4242, 34817, 987654)


def test_stat_comm_with_parentheses_and_spaces() -> None:
    st = procfs.parse_stat(STAT_HOSTILE)
    assert st.comm == b"a) S 1 (x y)"
    assert (st.state, st.ppid, st.session, st.start_ticks) == ("R", 55, 9, 123)


@pytest.mark.parametrize("raw", [b"", b"12 bash S 1", b"12 (bash) S", b"x (a) S 1 2 3"])
def test_stat_malformed_raises(raw: bytes) -> None:
    with pytest.raises(ProcParseError):
        procfs.parse_stat(raw)


def test_status() -> None:
    s = procfs.parse_status(STATUS)
    assert (s.name, s.ppid, s.uid, s.euid, s.gid, s.egid) == (b"sleep", 850, 1000, 0, 100, 101)


def test_status_missing_uid_raises() -> None:
    with pytest.raises(ProcParseError):
        procfs.parse_status(b"Name:\tx\nPPid:\t1\n")


def test_cmdline_nul_and_invalid_utf8() -> None:
    raw = b"/bin/echo\0\xff\xfe bad\0\0last\0"
    argv, truncated = procfs.split_cmdline(raw, 1024)
    assert argv == [b"/bin/echo", b"\xff\xfe bad", b"", b"last"]
    assert not truncated
    assert procfs.render_cmdline(argv) == "/bin/echo \\xff\\xfe bad  last"


def test_cmdline_truncated_and_empty() -> None:
    argv, truncated = procfs.split_cmdline(b"a" * 100 + b"\0b\0", 10)
    assert argv == [b"a" * 10] and truncated
    assert procfs.split_cmdline(b"", 10) == ([], False)
    assert procfs.split_cmdline(b"no-trailing-nul", 100) == ([b"no-trailing-nul"], False)


def _nl(what: int, body: bytes, seq: int = 0) -> bytes:
    ev = struct.pack("=IIQ", what, 0, 123456789) + body
    cn = struct.pack("=IIIIHH", 1, 1, seq, 0, len(ev), 0) + ev
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, seq, 0) + cn


# Captured from a real kernel 6.x socket (LISTEN ack, exec and exit of /bin/true); the exit
# record's status and parent fields were then edited to exercise exit code 1 and the parent.
REAL = [bytes.fromhex(h) for h in (
    "4c000000030000000000000000000000" "0100000001000000000000000100000028000000"
    "00000000010000005c621f2e5600000000000000000000000000000000000000000000000000000000000000",
    "4c000000030000000200000000000000" "0100000001000000020000000000000028000000"
    "0200000001000000cca29b2e560000004f1d00004f1d00000000000000000000000000000000000000000000",
    "4c000000030000000300000000000000" "0100000001000000030000000000000028000000"
    "0000008001000000ff32a32e560000004f1d00004f1d00000001000000000000111100001111000000000000",
)]


def test_real_captured_datagrams() -> None:
    assert procfs.parse_netlink(REAL[0]) == []
    (exe,) = procfs.parse_netlink(REAL[1])
    assert exe.what == procfs.PROC_EVENT_EXEC and exe.pid == exe.tgid == 0x1D4F
    (ex,) = procfs.parse_netlink(REAL[2])
    assert ex.what == procfs.PROC_EVENT_EXIT and ex.pid == 0x1D4F
    assert procfs.wait_status_to_exit_code(ex.exit_status) == 1
    assert ex.ppid == 0x1111


def test_fork_exec_exit_synthetic_and_batched() -> None:
    buf = (_nl(procfs.PROC_EVENT_FORK, struct.pack("=IIII", 10, 10, 11, 11))
           + _nl(procfs.PROC_EVENT_EXEC, struct.pack("=II", 11, 11))
           + _nl(procfs.PROC_EVENT_EXIT, struct.pack("=IIII", 11, 11, 9, 9)))
    fork, exe, ex = procfs.parse_netlink(buf)
    assert (fork.pid, fork.ppid) == (11, 10)
    assert exe.what == procfs.PROC_EVENT_EXEC and exe.timestamp_ns == 123456789
    assert procfs.wait_status_to_exit_code(ex.exit_status) == -9
    assert ex.ppid == 0  # old kernels: no parent in the exit record


def test_other_event_kinds_ignored() -> None:
    assert procfs.parse_netlink(_nl(procfs.PROC_EVENT_UID, struct.pack("=IIII", 1, 1, 0, 0))) == []


@pytest.mark.parametrize("buf", [
    struct.pack("=IHHII", 200, 3, 0, 0, 0) + b"\0" * 20,       # nlmsg_len beyond buffer
    struct.pack("=IHHII", 4, 3, 0, 0, 0),                       # nlmsg_len below header
    _nl(procfs.PROC_EVENT_EXEC, b"\x01\x00"),                    # short exec body
])
def test_malformed_netlink_raises(buf: bytes) -> None:
    with pytest.raises(ProcParseError):
        procfs.parse_netlink(buf)


def test_mcast_message_layout() -> None:
    msg = procfs.build_mcast_message(1234)
    assert len(msg) == 40
    assert struct.unpack_from("=IHHII", msg) == (40, 3, 0, 0, 1234)
    assert struct.unpack_from("=IIIIHHI", msg, 16) == (1, 1, 0, 0, 4, 0, 1)
