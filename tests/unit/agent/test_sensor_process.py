"""Process sensors against real processes: netlink proc connector (root) and psutil polling."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from agent.sensors import build_sensors, procfs
from agent.sensors.config import ProcessSensorConfig, SensorsConfig
from agent.sensors.process_common import Enricher, RawSnapshot, read_snapshot
from agent.sensors.process_netlink import NetlinkProcessSensor
from agent.sensors.process_psutil import PsutilProcessSensor
from proto import ringfence_pb2 as pb


class Sink:
    def __init__(self) -> None:
        self.events: list[pb.Event] = []
        self.lock = threading.Lock()

    def __call__(self, ev: pb.Event) -> None:
        ev.SerializeToString()  # every event must serialize
        with self.lock:
            self.events.append(ev)

    def wait(self, pred: Callable[[pb.Event], bool], timeout: float = 5.0) -> pb.Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for ev in self.events:
                    if pred(ev):
                        return ev
            time.sleep(0.02)
        raise AssertionError("no matching event")


def _launch_with(marker: bytes) -> Callable[[pb.Event], bool]:
    return lambda ev: (ev.WhichOneof("body") == "process" and ev.process.activity_id == 1
                       and marker in ev.process.process.argv)


@pytest.fixture
def netlink_sensor() -> NetlinkProcessSensor:
    try:
        return NetlinkProcessSensor(ProcessSensorConfig())
    except Exception as e:  # pragma: no cover - depends on the host
        pytest.skip(f"proc connector unavailable: {e}")


@pytest.mark.root
def test_netlink_exec_and_exit_full_enrichment(netlink_sensor: NetlinkProcessSensor,
                                               tmp_path: object) -> None:
    sink = Sink()
    netlink_sensor.start(sink)
    try:
        marker = f"rf-{uuid.uuid4().hex}".encode()
        bad = b"\xff\xfe-not-utf8"
        proc = subprocess.Popen([b"/bin/sh", b"-c", b"sleep 0.3; exit 7", marker, bad])
        launch = sink.wait(_launch_with(marker))
        p = launch.process.process
        assert launch.process.source == "netlink" and launch.time_ns > 0
        assert launch.seq == 0 and launch.agent_id == ""
        assert p.pid == proc.pid and p.ppid == os.getpid()
        assert p.exe == os.path.realpath("/bin/sh").encode()
        assert p.argv[-1] == bad and p.argv[0] == b"/bin/sh"
        assert p.cwd == os.getcwd().encode()
        assert p.uid == os.getuid() and p.user == "root"
        assert len(p.exe_sha256) == 64 and not p.unavailable
        assert p.start_time_ns > 0 and abs(p.start_time_ns - launch.time_ns) < 5e9
        assert launch.process.parent_process.pid == os.getpid()
        assert proc.wait() == 7
        exit_ev = sink.wait(lambda ev: ev.WhichOneof("body") == "process"
                            and ev.process.activity_id == 2
                            and ev.process.process.pid == proc.pid)
        assert exit_ev.process.exit_code == 7
        assert exit_ev.process.process.exe == p.exe
        killed = subprocess.Popen(["/bin/sleep", "30"])
        sink.wait(lambda ev: ev.process.process.pid == killed.pid)
        killed.kill()
        killed.wait()
        ev = sink.wait(lambda ev: ev.process.activity_id == 2 and ev.process.process.pid
                       == killed.pid)
        assert ev.process.exit_code == -9
    finally:
        netlink_sensor.stop()
    assert netlink_sensor.stats()["emitted"] >= 4


@pytest.mark.root
def test_netlink_one_mib_argv_is_capped(netlink_sensor: NetlinkProcessSensor) -> None:
    sink = Sink()
    netlink_sensor.start(sink)
    try:
        marker = f"rf-{uuid.uuid4().hex}".encode()
        # 16 x 64 KiB = 1 MiB of arguments (one argument may not exceed 128 KiB).
        big = [b"A" * 65536] * 16
        proc = subprocess.Popen([b"/bin/sleep", b"0.5", marker, *big],
                                stderr=subprocess.DEVNULL)
        ev = sink.wait(_launch_with(marker))
        p = ev.process.process
        assert p.argv_truncated
        assert sum(len(a) + 1 for a in p.argv) <= 64 * 1024 + 1
        assert p.exe == os.path.realpath("/bin/sleep").encode()
        assert len(ev.SerializeToString()) < 80 * 1024
        proc.wait()
    finally:
        netlink_sensor.stop()


@pytest.mark.root
def test_netlink_emit_that_raises_does_not_kill_sensor(netlink_sensor: NetlinkProcessSensor
                                                       ) -> None:
    got: list[pb.Event] = []

    def flaky(ev: pb.Event) -> None:
        if len(got) % 2 == 0:
            got.append(ev)
            raise RuntimeError("backpressure")
        got.append(ev)

    netlink_sensor.start(flaky)
    try:
        for _ in range(4):
            subprocess.run(["/bin/true"], check=True)
        deadline = time.monotonic() + 5
        while len(got) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(got) >= 8
        assert netlink_sensor.stats()["emit_errors"] >= 4
    finally:
        netlink_sensor.stop()


@pytest.mark.root
def test_netlink_enobufs_reports_loss_and_resyncs() -> None:
    sensor = NetlinkProcessSensor(ProcessSensorConfig(rcvbuf_bytes=1))  # kernel minimum
    sink = Sink()
    # Subscribe before the receive thread runs so the tiny buffer overflows for real.
    sensor._sock.send(procfs.build_mcast_message(sensor._sock.getsockname()[0]))
    sensor._seed()  # what start() does first; the survivor below is then unknown to it
    marker = f"rf-{uuid.uuid4().hex}".encode()
    survivor = subprocess.Popen([b"/bin/sh", b"-c", b"sleep 5", marker])
    for _ in range(60):
        subprocess.run(["/bin/true"], check=True)
    sensor.start(sink)
    try:
        loss = sink.wait(lambda ev: ev.WhichOneof("body") == "sensor_loss")
        assert loss.sensor_loss.sensor == "process"
        assert loss.sensor_loss.reason == "ENOBUFS" and loss.sensor_loss.resynced
        ev = sink.wait(lambda ev: ev.process.source == "resync"
                       and marker in ev.process.process.argv)
        assert ev.process.process.pid == survivor.pid
        assert sensor.stats()["enobufs"] >= 1 and sensor.stats()["lost"] >= 1
    finally:
        sensor.stop()
        survivor.kill()
        survivor.wait()


def test_process_gone_before_enrichment_yields_valid_event() -> None:
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    snap = read_snapshot(proc.pid, 65536)
    assert snap.exe is None and snap.stat is None
    enricher = Enricher(65536, 1 << 26, 16, 16)
    p = pb.Process()
    enricher.build(snap, p)
    assert p.pid == proc.pid
    assert {"exe", "argv", "cwd", "uid", "start_time", "exe_sha256"} <= set(p.unavailable)
    pb.Event(process=pb.ProcessActivity(activity_id=1, process=p)).SerializeToString()


def test_partial_snapshot_zombie_like() -> None:
    # A zombie still has stat/status but no exe, cmdline or cwd.
    stat = b"99 (z (x)) Z 1 99 99 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"
    status = b"Name:\tz\nPPid:\t1\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
    snap = RawSnapshot(99, None, None, b"", None, stat, status)
    p = pb.Process()
    Enricher(65536, 1 << 26, 16, 16).build(snap, p)
    assert p.name == "z (x)" and p.ppid == 1 and p.user == "root"
    assert set(p.unavailable) == {"exe", "argv", "cwd", "exe_sha256"}


def test_exe_hash_cached_by_identity(tmp_path: object) -> None:
    enricher = Enricher(65536, 1 << 26, 16, 16)
    snap = read_snapshot(os.getpid(), 65536)
    assert snap.exe is not None and snap.exe_key is not None
    first = enricher.exe_sha256(os.getpid(), snap.exe, snap.exe_key)
    second = enricher.exe_sha256(os.getpid(), snap.exe, snap.exe_key)
    assert first is not None and first == second and enricher.hashes_computed == 1
    small = Enricher(65536, 10, 16, 16)  # hash cap below the interpreter's size
    assert small.exe_sha256(os.getpid(), snap.exe, snap.exe_key) is None


def test_psutil_sensor_reports_launch_and_exit() -> None:
    sensor = PsutilProcessSensor(ProcessSensorConfig(poll_interval_s=0.05))
    sink = Sink()
    sensor.start(sink)
    try:
        marker = f"rf-{uuid.uuid4().hex}".encode()
        proc = subprocess.Popen([b"/bin/sh", b"-c", b"sleep 0.6", marker])
        ev = sink.wait(_launch_with(marker))
        assert ev.process.source == "psutil" and ev.process.process.pid == proc.pid
        assert ev.process.process.exe == os.path.realpath("/bin/sh").encode()
        proc.wait()
        gone = sink.wait(lambda e: e.process.activity_id == 2 and e.process.process.pid
                         == proc.pid)
        assert "exit_code" in gone.process.process.unavailable
        assert sensor.mode == "psutil"
    finally:
        sensor.stop()


def test_build_sensors_picks_process_mode() -> None:
    cfg = SensorsConfig.from_dict({"file": {"enabled": False}, "network": {"enabled": False}})
    (sensor,) = build_sensors(cfg)
    expected = "netlink" if os.geteuid() == 0 else "psutil"
    assert sensor.name == "process" and sensor.mode == expected
    if isinstance(sensor, NetlinkProcessSensor):
        sensor.stop()
    forced = build_sensors(SensorsConfig.from_dict({
        "process": {"mode": "psutil"}, "file": {"enabled": False},
        "network": {"enabled": False}}))
    assert [s.mode for s in forced] == ["psutil"]
