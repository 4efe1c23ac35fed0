"""File sensor on real files in a temp dir (inotify via watchdog)."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.sensors.config import FileSensorConfig
from agent.sensors.file import IN_Q_OVERFLOW, OVERFLOWS, FileSensor, install_overflow_hook
from proto import ringfence_pb2 as pb


class Sink:
    def __init__(self) -> None:
        self.events: list[pb.Event] = []
        self.lock = threading.Lock()

    def __call__(self, ev: pb.Event) -> None:
        ev.SerializeToString()
        with self.lock:
            self.events.append(ev)

    def files(self, path: bytes) -> list[pb.FileActivity]:
        with self.lock:
            return [e.file for e in self.events if e.WhichOneof("body") == "file"
                    and (e.file.path == path or e.file.new_path == path)]

    def wait(self, pred: Callable[[pb.Event], bool], timeout: float = 5.0) -> pb.Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for ev in self.events:
                    if pred(ev):
                        return ev
            time.sleep(0.02)
        raise AssertionError("no matching event")

    def wait_file(self, path: bytes, activity: int, timeout: float = 5.0) -> pb.FileActivity:
        return self.wait(lambda e: e.WhichOneof("body") == "file" and e.file.path == path
                         and e.file.activity_id == activity, timeout).file


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[bytes, Sink, FileSensor]]:
    cfg = FileSensorConfig(paths=(str(tmp_path),), debounce_ms=100, hash_max_bytes=4096,
                           exclude=("*.swp",))
    sensor = FileSensor(cfg)
    sink = Sink()
    sensor.start(sink)
    time.sleep(0.1)
    try:
        yield os.fsencode(tmp_path), sink, sensor
    finally:
        sensor.stop()


def test_create_update_chmod_rename_delete(watched: tuple[bytes, Sink, FileSensor]) -> None:
    root, sink, sensor = watched
    path = root + b"/payload.sh"
    with open(path, "wb") as f:
        f.write(b"#!/bin/sh\necho one\n")
    created = sink.wait_file(path, 1)
    assert created.sha256 == hashlib.sha256(b"#!/bin/sh\necho one\n").hexdigest()
    st = os.lstat(path)
    assert (created.size, created.mode, created.uid, created.inode, created.mtime_ns) == (
        st.st_size, st.st_mode, st.st_uid, st.st_ino, st.st_mtime_ns)
    assert created.owner == "root" and not created.unavailable
    time.sleep(0.25)
    with open(path, "ab") as f:
        f.write(b"echo two\n")
    updated = sink.wait_file(path, 3)
    assert updated.sha256 == hashlib.sha256(b"#!/bin/sh\necho one\necho two\n").hexdigest()
    time.sleep(0.25)
    os.chmod(path, 0o755)
    attrs = sink.wait_file(path, 6)
    assert stat.S_IMODE(attrs.mode) == 0o755 and attrs.sha256 == ""
    new = root + b"/renamed.sh"
    os.rename(path, new)
    moved = sink.wait_file(path, 5)
    assert moved.new_path == new and moved.inode == st.st_ino
    os.unlink(new)
    deleted = sink.wait_file(new, 4)
    assert deleted.sha256 == "" and deleted.size == 0
    assert sensor.stats()["emitted"] >= 5 and sensor.mode == "inotify"


def test_hostile_names_and_debounce(watched: tuple[bytes, Sink, FileSensor]) -> None:
    root, sink, _ = watched
    path = root + b"/bad\x01\x1b[31m\nname\xff\xfe"
    for i in range(5):
        with open(path, "ab") as f:
            f.write(b"x")
    sink.wait_file(path, 1)
    time.sleep(0.4)
    events = sink.files(path)
    assert 1 <= len(events) <= 3  # five close-after-writes coalesced
    assert events[-1].sha256 == hashlib.sha256(b"xxxxx").hexdigest()


def test_size_cap_symlinks_and_exclusions(watched: tuple[bytes, Sink, FileSensor]) -> None:
    root, sink, _ = watched
    big = root + b"/big.bin"
    with open(big, "wb") as f:
        f.write(b"\0" * 5000)
    ev = sink.wait_file(big, 1)
    assert ev.hash_skipped_size and ev.sha256 == "" and ev.size == 5000
    os.symlink(b"loop-b", root + b"/loop-a")
    os.symlink(b"loop-a", root + b"/loop-b")
    os.symlink(b"/etc/shadow", root + b"/shadow-link")
    for name in (b"/loop-a", b"/loop-b", b"/shadow-link"):
        link = sink.wait_file(root + name, 1)
        assert stat.S_ISLNK(link.mode) and link.sha256 == "" and "sha256" in link.unavailable
    with open(root + b"/.notes.swp", "wb") as f:
        f.write(b"ignored")
    marker = root + b"/after-swp"
    with open(marker, "wb") as f:
        f.write(b"y")
    sink.wait_file(marker, 1)
    assert sink.files(root + b"/.notes.swp") == []


def test_deleted_before_hashing(watched: tuple[bytes, Sink, FileSensor]) -> None:
    root, sink, _ = watched
    path = root + b"/ephemeral"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"gone soon")
    os.unlink(path)
    os.close(fd)
    created = sink.wait_file(path, 1)
    assert "sha256" in created.unavailable and created.sha256 == ""
    sink.wait_file(path, 4)


def test_describe_vanished_path_flags_everything(tmp_path: Path) -> None:
    fa = pb.FileActivity(activity_id=3, path=b"/nonexistent/\xff")
    FileSensor(FileSensorConfig(paths=(str(tmp_path),))).describe(fa.path, fa, True)
    assert {"sha256", "size", "mode", "inode"} <= set(fa.unavailable)
    pb.Event(file=fa).SerializeToString()


def test_inotify_overflow_reports_loss_and_rescans(
        watched: tuple[bytes, Sink, FileSensor]) -> None:
    root, sink, sensor = watched
    changed = root + b"/changed-during-overflow"
    # Written while "events were lost": the sensor must find it by rescanning.
    with open(changed, "wb") as f:
        f.write(b"z")
    time.sleep(0.3)
    with sink.lock:
        sink.events.clear()
    assert install_overflow_hook()
    from watchdog.observers.inotify_c import Inotify
    # The exact record the kernel queues on overflow: wd -1, mask IN_Q_OVERFLOW, no name.
    records = list(Inotify._parse_event_buffer(struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0)))
    assert records == [(-1, IN_Q_OVERFLOW, 0, b"")]
    assert OVERFLOWS.read() >= 1
    loss = sink.wait(lambda e: e.WhichOneof("body") == "sensor_loss")
    assert loss.sensor_loss.sensor == "file"
    assert loss.sensor_loss.reason == "inotify overflow" and loss.sensor_loss.resynced
    rescanned = sink.wait_file(changed, 3)
    assert rescanned.sha256 == hashlib.sha256(b"z").hexdigest()
    assert sensor.stats()["rescans"] == 1


def test_emit_raising_does_not_stop_sensor(tmp_path: Path) -> None:
    calls: list[pb.Event] = []

    def flaky(ev: pb.Event) -> None:
        calls.append(ev)
        raise RuntimeError("spool full")

    sensor = FileSensor(FileSensorConfig(paths=(str(tmp_path),), debounce_ms=50))
    sensor.start(flaky)
    try:
        for name in ("a", "b"):
            (tmp_path / name).write_bytes(b"1")
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(calls) >= 2 and sensor.stats()["emit_errors"] >= 2
    finally:
        sensor.stop()


def test_missing_paths_mean_mode_off(tmp_path: Path) -> None:
    sensor = FileSensor(FileSensorConfig(paths=(str(tmp_path / "nope"),)))
    assert sensor.mode == "off"
    sensor.start(Sink())
    sensor.stop()
