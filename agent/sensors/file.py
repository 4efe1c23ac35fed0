"""File sensor: watchdog (inotify) on configured paths -> FileActivity events with lstat
metadata and a SHA-256 taken after close-after-write, debounced per path. It never follows
symlinks for hashing and never reads files over the size cap; it does not baseline the tree.

It runs watchdog's InotifyEmitter per root without an Observer: the emitter puts straight into
the sensor's bounded queue (`_RawQueue`) and the sensor's own worker is the only consumer, so
an event crosses two threads instead of four, and the emitter's event filter keeps the kernel
from queueing open/access/close-nowrite records the sensor never used.

watchdog drops IN_Q_OVERFLOW records silently (inotify_c.Inotify.read_events skips wd == -1),
so `install_overflow_hook` wraps its record parser once per process and counts overflows; each
FileSensor compares that counter, reports a SensorLoss event and rescans its paths for files
changed since. With several FileSensors in one process every one of them rescans (over-report,
never under-report).
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import logging
import os
import pwd
import queue
import re
import stat as stat_mod
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter

from agent.sensors.base import Emit, SafeEmitter, Sensor, new_event, sensor_loss_event
from agent.sensors.config import FileSensorConfig
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

IN_Q_OVERFLOW = 0x4000
_IDLE_WAKE_S = 1.0
_CHUNK = 1024 * 1024

ACTIVITY_CREATE = 1
ACTIVITY_UPDATE = 3
ACTIVITY_DELETE = 4
ACTIVITY_RENAME = 5
ACTIVITY_SET_ATTRIBUTES = 6


class _OverflowCounter:
    """Process-wide count of inotify queue overflows seen by watchdog's parser."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.installed = False

    def bump(self) -> None:
        with self._lock:
            self.count += 1

    def read(self) -> int:
        with self._lock:
            return self.count


OVERFLOWS = _OverflowCounter()


def install_overflow_hook() -> bool:
    """Wrap watchdog's inotify record parser to count IN_Q_OVERFLOW; False if not possible."""
    with OVERFLOWS._lock:
        if OVERFLOWS.installed:
            return True
        try:
            from watchdog.observers.inotify_c import Inotify
            original = Inotify._parse_event_buffer
        except (ImportError, AttributeError):
            logger.warning("file sensor: cannot hook watchdog; inotify overflow goes unnoticed")
            return False

        def parse(event_buffer: bytes) -> Iterator[tuple[int, int, int, bytes]]:
            for wd, mask, cookie, name in original(event_buffer):
                if wd == -1 and mask & IN_Q_OVERFLOW:
                    OVERFLOWS.bump()
                yield wd, mask, cookie, name

        setattr(Inotify, "_parse_event_buffer", staticmethod(parse))
        OVERFLOWS.installed = True
        return True


class _Raw(NamedTuple):
    kind: str        # created | modified | closed | deleted | moved
    path: bytes
    dest: bytes
    is_dir: bool
    time_ns: int


class _Pending(NamedTuple):
    activity: int    # ACTIVITY_CREATE, or ACTIVITY_UPDATE for "modified, not yet classified"
    first_ns: int
    deadline: float  # monotonic seconds
    closed: bool


# The watchdog event classes the sensor uses. Handing them to the emitter as its filter also
# narrows the inotify mask (watchdog's get_event_mask_from_filter), so the kernel never queues
# IN_OPEN, IN_ACCESS or IN_CLOSE_NOWRITE, which are most of the traffic on a busy tree (our
# own hashing reads each file once more) and which the sensor always threw away.
_KINDS: dict[type[FileSystemEvent], str] = {
    FileCreatedEvent: "created", DirCreatedEvent: "created",
    FileModifiedEvent: "modified",
    FileClosedEvent: "closed",
    FileDeletedEvent: "deleted", DirDeletedEvent: "deleted",
    FileMovedEvent: "moved", DirMovedEvent: "moved",
}
_EVENT_FILTER: list[type[FileSystemEvent]] = list(_KINDS)


class _RawQueue(EventQueue):
    """The queue watchdog's emitter threads put into, read by the sensor's worker directly.

    Using the emitter without an Observer saves the Observer's dispatch thread and one queue
    hop per event. `put` runs on the emitter thread: it classifies and filters (nothing slow),
    never blocks (a full queue is counted as loss, reported and repaired by a rescan), and
    skips an event equal to the one before it, as the Observer's EventQueue did.
    """

    def __init__(self, sensor: FileSensor, maxsize: int) -> None:
        super().__init__(maxsize)
        self._sensor = sensor
        self._last_event: FileSystemEvent | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        event: FileSystemEvent = item[0]
        if event == self._last_event:
            return
        self._last_event = event
        kind = _KINDS.get(type(event))
        if kind is None:
            return  # defensive: the emitter already filters on _EVENT_FILTER
        sensor = self._sensor
        path = os.fsencode(event.src_path)
        dest = os.fsencode(event.dest_path) if event.dest_path else b""
        if sensor._excluded(path) and (not dest or sensor._excluded(dest)):
            return
        try:
            queue.Queue.put(self, _Raw(kind, path, dest, event.is_directory, time.time_ns()),
                            block=False)
        except queue.Full:
            sensor._count_drop()


class FileSensor(Sensor):
    """inotify via watchdog; mode "inotify" (or "off" when no configured path exists)."""

    name = "file"
    mode = "inotify"

    def __init__(self, config: FileSensorConfig = FileSensorConfig()) -> None:
        self._config = config
        self._roots = _watch_roots(config.paths)
        if not self._roots:
            self.mode = "off"
        self._queue = _RawQueue(self, config.queue_max)
        self._exclude = _compile_globs(config.exclude)
        self._stop = threading.Event()
        self._emitters: list[InotifyEmitter] = []
        self._thread: threading.Thread | None = None
        self._emitter: SafeEmitter | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._last_emit: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._users: dict[int, str] = {}
        self._lock = threading.Lock()
        self._dropped = 0
        self._dropped_reported = 0
        self._overflows_seen = 0
        self._counts = {"overflows": 0, "rescans": 0, "hashed": 0, "coalesced": 0}
        self._since_ns = time.time_ns()
        self._debounce_s = config.debounce_ms / 1000.0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        self._emitter = SafeEmitter(emit, "file")
        install_overflow_hook()
        self._overflows_seen = OVERFLOWS.read()
        self._since_ns = time.time_ns()
        self._thread = threading.Thread(target=self._loop, name="rf-file", daemon=True)
        self._thread.start()
        if not self._roots:
            logger.warning("file sensor: none of the configured paths exists")
            return
        for root in self._roots:
            watch = ObservedWatch(os.fsdecode(root), recursive=True, event_filter=_EVENT_FILTER)
            emitter = InotifyEmitter(self._queue, watch, event_filter=_EVENT_FILTER)
            try:
                emitter.start()  # adds the inotify watches in this thread: errors surface here
            except OSError as e:
                logger.warning("file sensor: cannot watch %r: %s", root, e)
                continue
            self._emitters.append(emitter)
        logger.info("file sensor started on %d paths", len(self._roots))

    def stop(self) -> None:
        self._stop.set()
        for emitter in self._emitters:
            emitter.stop()
        for emitter in self._emitters:
            emitter.join(timeout=3.0)
        if self._thread is not None:
            self._thread.join(timeout=3.0)

    def stats(self) -> dict[str, int]:
        em = self._emitter
        with self._lock:
            out = dict(self._counts)
            out["lost"] = self._dropped
        out["emitted"] = em.emitted if em else 0
        out["emit_errors"] = em.errors if em else 0
        out["queued"] = self._queue.qsize()
        out["pending"] = len(self._pending)
        return out

    # --- watchdog thread side ----------------------------------------------------------------

    def _count_drop(self) -> None:
        with self._lock:
            self._dropped += 1

    def _excluded(self, path: bytes) -> bool:
        if self._exclude is None:
            return False
        text = path.decode("utf-8", "surrogateescape")
        return (self._exclude.match(text) is not None
                or self._exclude.match(text.rsplit("/", 1)[-1]) is not None)

    # --- worker ------------------------------------------------------------------------------

    def _loop(self) -> None:
        tick = max(0.02, min(self._debounce_s, 0.1))
        next_check = 0.0
        while not self._stop.is_set():
            # Wake every tick only while something waits for its debounce deadline; otherwise
            # once a second, to notice an overflow (it arrives without any event of ours).
            try:
                raw: _Raw | None = self._queue.get(
                    timeout=tick if self._pending else _IDLE_WAKE_S)
            except queue.Empty:
                raw = None
            try:
                if raw is not None:
                    self._handle(raw)
                now = time.monotonic()
                # Deadlines are checked once per tick, not after every event: walking the
                # pending table per event cost more than the events under a write storm.
                if raw is None or now >= next_check:
                    next_check = now + tick
                    self._flush_due()
                    self._check_loss()
            except Exception:  # never let one path kill the sensor
                logger.exception("file sensor: failed to handle an event")
        self._flush_due(force=True)

    def _handle(self, raw: _Raw) -> None:
        now = time.monotonic()
        if raw.is_dir:
            if raw.kind in ("created", "deleted", "moved"):
                activity = {"created": ACTIVITY_CREATE, "deleted": ACTIVITY_DELETE,
                            "moved": ACTIVITY_RENAME}[raw.kind]
                self._emit_file(activity, raw.path, raw.dest, raw.time_ns, hash_it=False,
                                is_dir=True)
            return
        path = raw.path
        if raw.kind == "created":
            self._pending[path] = _Pending(ACTIVITY_CREATE, raw.time_ns, now + self._debounce_s,
                                           False)
        elif raw.kind == "modified":
            p = self._pending.get(path)
            if p is None:
                self._pending[path] = _Pending(ACTIVITY_UPDATE, raw.time_ns,
                                               self._not_before(path, now), False)
            else:
                with self._lock:
                    self._counts["coalesced"] += 1
        elif raw.kind == "closed":
            p = self._pending.get(path)
            if p is None and not os.path.lexists(path):
                return  # closed after delete/rename: those events already told the story
            activity = p.activity if p else ACTIVITY_UPDATE
            first = p.first_ns if p else raw.time_ns
            # A close after write is the moment to hash; a writer that closes again and again
            # within the debounce window is coalesced into one event at the window's end.
            self._pending[path] = _Pending(activity, first, self._not_before(path, now), True)
        elif raw.kind == "deleted":
            p = self._pending.pop(path, None)
            if p is not None:
                # Created/updated and deleted before we hashed: report it with what we lack.
                self._emit_file(p.activity, path, b"", p.first_ns, hash_it=True)
            self._emit_file(ACTIVITY_DELETE, path, b"", raw.time_ns, hash_it=False)
        elif raw.kind == "moved":
            p = self._pending.pop(path, None)
            self._emit_file(ACTIVITY_RENAME, path, raw.dest, raw.time_ns,
                            hash_it=p is not None)
        if len(self._pending) > self._config.queue_max:
            self._flush_due(force=True)

    def _not_before(self, path: bytes, now: float) -> float:
        last = self._last_emit.get(path)
        if last is not None and now - last < self._debounce_s:
            return last + self._debounce_s
        return now

    def _flush_due(self, force: bool = False) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        for path, p in list(self._pending.items()):
            if not (force or (p.closed and p.deadline <= now)
                    or (p.deadline + self._debounce_s <= now)):
                continue
            del self._pending[path]
            activity = p.activity
            if activity == ACTIVITY_UPDATE and not p.closed:
                activity = _classify_unclosed(path)
            self._emit_file(activity, path, b"", p.first_ns,
                            hash_it=activity != ACTIVITY_SET_ATTRIBUTES)

    def _emit_file(self, activity: int, path: bytes, dest: bytes, time_ns: int,
                   hash_it: bool, is_dir: bool = False, source_note: str = "") -> None:
        ev = new_event(time_ns)
        fa = ev.file
        fa.activity_id = activity
        fa.path = path
        if dest:
            fa.new_path = dest
        fa.is_directory = is_dir
        if activity != ACTIVITY_DELETE:
            self.describe(dest or path, fa, hash_it and not is_dir)
        assert self._emitter is not None
        self._emitter(ev)
        self._last_emit[path] = time.monotonic()
        self._last_emit.move_to_end(path)
        while len(self._last_emit) > 4096:
            self._last_emit.popitem(last=False)

    def describe(self, path: bytes, fa: pb.FileActivity, hash_it: bool) -> None:
        """lstat metadata and (optionally) content hash; what cannot be read -> unavailable."""
        try:
            st = os.lstat(path)
        except OSError:
            fa.unavailable.extend(["size", "mode", "uid", "gid", "inode", "mtime", "owner"])
            if hash_it:
                fa.unavailable.append("sha256")
            return
        fa.size, fa.mode, fa.uid, fa.gid = st.st_size, st.st_mode, st.st_uid, st.st_gid
        fa.inode, fa.mtime_ns = st.st_ino, st.st_mtime_ns
        fa.owner = self._user(st.st_uid)
        fa.is_directory = stat_mod.S_ISDIR(st.st_mode)
        if not hash_it or fa.is_directory:
            return
        if not stat_mod.S_ISREG(st.st_mode):
            fa.unavailable.append("sha256")  # symlinks, fifos, devices: never opened
            return
        if st.st_size > self._config.hash_max_bytes:
            fa.hash_skipped_size = True
            return
        digest = _hash_regular(path, st.st_ino, self._config.hash_max_bytes)
        if digest is None:
            fa.unavailable.append("sha256")
        elif digest == "":
            fa.hash_skipped_size = True
        else:
            fa.sha256 = digest
            with self._lock:
                self._counts["hashed"] += 1

    def _user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = ""
            if len(self._users) < 1024:
                self._users[uid] = name
        return name

    # --- loss and rescan ---------------------------------------------------------------------

    def _check_loss(self) -> None:
        assert self._emitter is not None
        overflows = OVERFLOWS.read()
        with self._lock:
            dropped = self._dropped - self._dropped_reported
            self._dropped_reported = self._dropped
        if overflows != self._overflows_seen:
            self._overflows_seen = overflows
            with self._lock:
                self._counts["overflows"] += 1
            self._emitter(sensor_loss_event("file", "inotify overflow", 0, True))
            self.rescan()
        elif dropped > 0:
            self._emitter(sensor_loss_event("file", "queue full", dropped, True))
            self.rescan()

    def rescan(self) -> int:
        """Report files under the watched roots changed since the last rescan (or start);
        returns how many. Bounded by `rescan_max_files`; never follows symlinks."""
        with self._lock:
            self._counts["rescans"] += 1
        since = self._since_ns - 2_000_000_000  # cover events in flight at the last mark
        self._since_ns = time.time_ns()
        budget = self._config.rescan_max_files
        reported = 0
        for root in self._roots:
            for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                for fname in filenames:
                    budget -= 1
                    if budget < 0 or self._stop.is_set():
                        return reported
                    path = os.path.join(dirpath, fname)
                    if self._excluded(path):
                        continue
                    try:
                        st = os.lstat(path)
                    except OSError:
                        continue
                    if max(st.st_mtime_ns, st.st_ctime_ns) >= since:
                        self._emit_file(ACTIVITY_UPDATE, path, b"", time.time_ns(),
                                        hash_it=True)
                        reported += 1
        return reported


def _compile_globs(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex equivalent to `any(fnmatch.fnmatchcase(name, g) for g in globs)`."""
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def _classify_unclosed(path: bytes) -> int:
    """A modify that was never followed by close-after-write is either an attribute change
    (chmod/chown: only ctime moves) or a write through a still-open or mmapped file (mtime and
    ctime move together). watchdog reports both as "modified", so tell them apart by lstat."""
    try:
        st = os.lstat(path)
    except OSError:
        return ACTIVITY_UPDATE
    return ACTIVITY_UPDATE if st.st_mtime_ns == st.st_ctime_ns else ACTIVITY_SET_ATTRIBUTES


def _hash_regular(path: bytes, inode: int, cap: int) -> str | None:
    """SHA-256 of a regular file without following symlinks; None if unreadable or replaced
    (inode changed), "" if it grew past the cap while reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_ino != inode:
            return None
        h = hashlib.sha256()
        total = 0
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > cap:
                return ""
            h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def _watch_roots(paths: tuple[str, ...]) -> list[bytes]:
    """Existing directories among `paths`, without those nested in another (one watch each)."""
    existing: list[bytes] = []
    for p in paths:
        real = os.path.realpath(os.fsencode(p))
        if os.path.isdir(real):
            existing.append(real)
    existing = sorted(set(existing))
    roots: list[bytes] = []
    for d in existing:
        if not any(d == r or d.startswith(r.rstrip(b"/") + b"/") for r in roots):
            roots.append(d)
    return roots
