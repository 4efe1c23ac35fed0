"""Durable, bounded, crash-safe on-disk spool for serialized evidence records on the agent.

It stores opaque, already-serialized and already-chained records, recovers them after crashes
and torn writes, and hands out only fsynced data; it does not serialize, hash-chain, sign or
send anything (the chain, checkpoints and the session do that).

On-disk format (version 1)
--------------------------
The spool directory holds segment files named ``{first_seq:020d}.seg`` (the seq of the first
record written to the segment) and one ack marker ``acked.bin``. A segment is a plain
concatenation of frames; there is no file header. Each frame is a 56-byte little-endian header
followed by the data::

    offset size field
         0    4 magic       b"RFSr"
         4    1 version     1
         5    1 kind        RecordKind (1 = EVENT, 2 = CHECKPOINT)
         6    1 flags       bit 0 = priority; other bits must be 0
         7    1 reserved    0
         8    8 seq         u64, >= 1
        16   32 chain_hash  the chain head after this record (EVENT) or covered (CHECKPOINT)
        48    4 length      u32, length of data, <= MAX_RECORD_DATA_BYTES
        52    4 crc         zlib.crc32 over header bytes 0..51 followed by the data
        56    n data

Records are appended in non-decreasing seq order. A segment is rotated (a new file started)
once it holds ``segment_bytes``, but only between records of different seq, so every seq lives
in exactly one segment and segment names sort in append order.

``acked.bin`` (68 bytes, replaced atomically: tmp + fsync + rename + directory fsync)::

    magic b"RFSa", version u8 = 1, flags u8 (bit 0: a last event is present), 2 bytes zero,
    acked_seq u64, last_seq u64, last_event_seq u64, last_event_hash 32 bytes,
    crc u32 = zlib.crc32 of the preceding 64 bytes

It persists the collector's cumulative ack, and the durable chain position at that moment so
that the chain can be resumed even when every segment has been acked and deleted.

Recovery (on open): every segment is scanned and every frame checked. An incomplete frame with
no valid frame after it is a torn tail: it is truncated and counted. A frame whose checksum
fails but whose length leads exactly to the end of the file or to a valid frame is skipped as
one corrupt record (its claimed seq reported); any other damage is skipped by scanning forward
for the next magic whose frame checks out, and counted as one corrupt record. Nothing damaged
is rewritten. `last_seq` never goes below the seq named by a damaged or torn frame whose magic
survived (or the intact seq before it plus one, when the named seq is more than 2**16 away):
a seq that may have been sent is never reused; skipping one is a visible gap. The findings are
returned as a `RecoveryReport` and logged as a warning, so the
agent can put the loss into its chain.

Durability: `append` only buffers (in memory, then page cache); a background flusher thread
writes and fsyncs whatever was appended at most ``fsync_interval_s`` ago (plus the duration of
one fsync). `read_durable` never returns data that has not been fsynced, and never triggers a
flush itself; call `flush` first when the newest records are needed now.

Memory: 16 bytes per intact record are held in an in-memory index (seq, offset).

Errors::

    SpoolError
    ├── SpoolFull          the bound refused a record (policy, not failure); carries dropped_seq
    ├── SpoolRecordError   the caller's record is bad (also a ValueError): length, order
    ├── SpoolClosed        the spool was closed
    └── SpoolIOError       the OS failed (errno, op, path)
        └── SpoolDiskFull  ENOSPC / EDQUOT
"""

from __future__ import annotations

import bisect
import enum
import errno as errno_mod
import logging
import os
import re
import struct
import threading
import time
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

HASH_BYTES = 32
MAX_RECORD_DATA_BYTES = 64 << 20  # a single record; larger lengths are treated as corrupt
FORMAT_VERSION = 1

_MAGIC = b"RFSr"
_HEAD = struct.Struct("<4sBBBxQ32sI")  # header up to (excluding) the crc
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEAD.size + _CRC.size  # 56
_FLAG_PRIORITY = 0x01

_MARKER_NAME = "acked.bin"
_MARKER_MAGIC = b"RFSa"
_MARKER_BODY = struct.Struct("<4sBBxxQQQ32s")
_MARKER_BYTES = _MARKER_BODY.size + _CRC.size  # 68
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")

# How far past the last intact seq a damaged frame's claimed seq is still believed.
_MAX_CLAIMED_SEQ_JUMP = 1 << 16

# Buffered bytes handed to the kernel in one write; bounds what sits in process memory.
_WRITE_CHUNK_BYTES = 64 << 10


class RecordKind(enum.IntEnum):
    """What a spooled record holds."""

    EVENT = 1  # serialized event bytes; seq = the event's seq
    CHECKPOINT = 2  # a signed checkpoint envelope; seq = the seq it covers


_KINDS = frozenset(int(k) for k in RecordKind)


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled record; `chain_hash` is the chain head after (or covered by) this record."""

    kind: RecordKind
    seq: int
    chain_hash: bytes
    data: bytes
    priority: bool = False


@dataclass(frozen=True)
class SpoolConfig:
    """Spool limits. Sizes are in bytes, times in seconds."""

    max_bytes: int = 1 << 30  # bound for all segments together (default 1 GiB)
    segment_bytes: int = 16 << 20  # rotate after this many bytes (default 16 MiB)
    fsync_interval_s: float = 0.5  # appended data is fsynced at most this long after append
    # Kept free for priority records (command results, isolation and gap events) once
    # telemetry is refused (default 8 MiB).
    priority_reserve_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if self.segment_bytes <= 0 or self.max_bytes <= 0:
            raise ValueError("segment_bytes and max_bytes must be positive")
        if not 0 <= self.priority_reserve_bytes < self.max_bytes:
            raise ValueError("priority_reserve_bytes must be in [0, max_bytes)")
        if not self.fsync_interval_s > 0:
            raise ValueError("fsync_interval_s must be positive")


@dataclass(frozen=True)
class LastRecord:
    """Kind, seq and chain hash of a record."""

    kind: RecordKind
    seq: int
    chain_hash: bytes


@dataclass(frozen=True)
class CorruptSpan:
    """Bytes skipped during a scan because they did not form a valid record."""

    segment: str
    offset: int
    length: int
    seq: int | None  # the seq the damaged header claims, when its frame boundaries held
    reason: str


@dataclass(frozen=True)
class RecoveryReport:
    """What opening the spool found on disk."""

    segments_scanned: int
    records_intact: int
    torn_tails: int  # segments whose incomplete tail was truncated
    torn_bytes_truncated: int
    corrupt_skipped: int
    corrupt: tuple[CorruptSpan, ...]
    last_record: LastRecord | None  # last intact record found in the segments
    acked_seq: int
    marker_damaged: bool  # acked.bin unreadable: acked_seq restarted from 0 (resend, not loss)

    @property
    def clean(self) -> bool:
        """True when nothing was truncated, skipped or unreadable."""
        return not (self.torn_bytes_truncated or self.corrupt_skipped or self.marker_damaged)


@dataclass(frozen=True)
class SpoolStats:
    """Counters of an open spool."""

    records: int  # intact records held (on disk or buffered)
    bytes_used: int  # bytes counted against max_bytes: segment files plus buffered frames
    bytes_unsynced: int  # part of bytes_used not yet fsynced
    segments: int
    pending_records: int  # records with seq > acked_seq
    acked_seq: int
    last_seq: int
    durable_seq: int  # highest seq that is fsynced
    dropped_refused: int  # appends refused by the bound (SpoolFull)
    corrupt_skipped: int  # at recovery and since
    torn_bytes_truncated: int


# ---------------------------------------------------------------------------------------------
# Errors


class SpoolError(Exception):
    """Root of all spool errors."""


class SpoolFull(SpoolError):
    """The bound refused a record; the caller must account for `dropped_seq` as lost."""

    def __init__(self, dropped_seq: int, size: int, priority: bool, used: int, limit: int):
        self.dropped_seq = dropped_seq
        self.size = size
        self.priority = priority
        self.used = used
        self.limit = limit
        what = "priority record" if priority else "record"
        super().__init__(
            f"spool full: {what} seq {dropped_seq} ({size} bytes) refused, "
            f"{used} of {limit} bytes used"
        )


class SpoolRecordError(SpoolError, ValueError):
    """The record handed to `append` is malformed or out of order."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"bad spool record seq {seq}: {reason}")


class SpoolClosed(SpoolError):
    """The spool has been closed."""


class SpoolIOError(SpoolError):
    """The operating system refused a spool operation."""

    def __init__(self, op: str, path: str, errno: int | None, strerror: str | None) -> None:
        self.op = op
        self.path = path
        self.errno = errno
        self.strerror = strerror
        super().__init__(f"spool {op} failed on {path}: [errno {errno}] {strerror}")


class SpoolDiskFull(SpoolIOError):
    """The filesystem is out of space (ENOSPC) or quota (EDQUOT)."""


def _io_error(op: str, path: Path | str, e: OSError) -> SpoolIOError:
    cls = SpoolDiskFull if e.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT) else SpoolIOError
    return cls(op, str(path), e.errno, e.strerror)


# ---------------------------------------------------------------------------------------------
# Pure format code


def encode_frame(record: SpoolRecord) -> bytes:
    """Return the on-disk frame of `record` (header + data); the record must be valid."""
    head = _HEAD.pack(
        _MAGIC,
        FORMAT_VERSION,
        int(record.kind),
        _FLAG_PRIORITY if record.priority else 0,
        record.seq,
        record.chain_hash,
        len(record.data),
    )
    return head + _CRC.pack(zlib.crc32(record.data, zlib.crc32(head))) + record.data


class _Frame(enum.Enum):
    OK = 0
    SHORT = 1  # the frame does not fit in the buffer
    BAD_HEADER = 2  # magic, version, kind, flags or length implausible
    BAD_CRC = 3  # header plausible and frame fits, but the checksum fails


def _check_frame(buf: bytes | memoryview, pos: int) -> tuple[_Frame, int, int]:
    """Classify the frame at `pos`; return (status, seq, data length) as far as known."""
    if len(buf) - pos < HEADER_BYTES:
        return _Frame.SHORT, 0, 0
    magic, version, kind, flags, seq, _h, length = _HEAD.unpack_from(buf, pos)
    if (
        magic != _MAGIC
        or version != FORMAT_VERSION
        or kind not in _KINDS
        or flags & ~_FLAG_PRIORITY
        or length > MAX_RECORD_DATA_BYTES
        or seq == 0
    ):
        return _Frame.BAD_HEADER, seq, length
    end = pos + HEADER_BYTES + length
    if end > len(buf):
        return _Frame.SHORT, seq, length
    (crc,) = _CRC.unpack_from(buf, pos + _HEAD.size)
    if zlib.crc32(buf[pos + HEADER_BYTES : end], zlib.crc32(buf[pos : pos + _HEAD.size])) != crc:
        return _Frame.BAD_CRC, seq, length
    return _Frame.OK, seq, length


def _decode_frame(buf: bytes | memoryview, pos: int) -> SpoolRecord:
    """Decode a frame already checked by `_check_frame`."""
    _m, _v, kind, flags, seq, chain_hash, length = _HEAD.unpack_from(buf, pos)
    start = pos + HEADER_BYTES
    return SpoolRecord(
        RecordKind(kind),
        seq,
        bytes(chain_hash),
        bytes(buf[start : start + length]),
        bool(flags & _FLAG_PRIORITY),
    )


def _next_valid(buf: bytes, start: int) -> int:
    """Offset of the next frame at or after `start` that checks out, or -1."""
    pos = buf.find(_MAGIC, start)
    while pos >= 0:
        if _check_frame(buf, pos)[0] is _Frame.OK:
            return pos
        pos = buf.find(_MAGIC, pos + 1)
    return -1


@dataclass
class _ScanResult:
    seqs: array[int] = field(default_factory=lambda: array("Q"))
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    corrupt: list[CorruptSpan] = field(default_factory=list)
    valid_end: int = 0  # where the file should end (after truncating a torn tail)
    last: LastRecord | None = None
    last_event: tuple[int, bytes] | None = None
    claimed_seq: int = 0  # highest plausible seq claimed by a complete but damaged frame


def _scan(buf: bytes, name: str, min_seq: int) -> _ScanResult:
    """Find the intact frames of a segment image, in order; records below `min_seq` (the last
    seq of earlier segments) or going backwards are out of order and count as corrupt."""
    res = _ScanResult()
    prev = min_seq
    pos = 0
    n = len(buf)
    while pos < n:
        status, seq, length = _check_frame(buf, pos)
        if status is _Frame.OK:
            end = pos + HEADER_BYTES + length
            if seq < prev:
                res.corrupt.append(CorruptSpan(name, pos, end - pos, seq, "seq out of order"))
            else:
                kind, chain_hash = buf[pos + 5], buf[pos + 16 : pos + 48]
                res.seqs.append(seq)
                res.offsets.append(pos)
                res.last = LastRecord(RecordKind(kind), seq, chain_hash)
                if kind == RecordKind.EVENT:
                    res.last_event = (seq, chain_hash)
                prev = seq
            pos = end
            res.valid_end = end
            continue
        if buf[pos : pos + 4] == _MAGIC:
            # A damaged or incomplete frame that still names a seq may have been sent (or was
            # about to be): never reuse its seq. Skipping a seq is a visible gap; reusing one
            # is a fork. A flipped bit in the seq field must not make the chain jump far.
            claimed = seq if prev <= seq <= prev + _MAX_CLAIMED_SEQ_JUMP else prev + 1
            res.claimed_seq = max(res.claimed_seq, claimed)
        if status is _Frame.BAD_CRC:
            end = pos + HEADER_BYTES + length
            if end == n or _check_frame(buf, end)[0] is _Frame.OK:
                # The frame's boundaries hold: one record with damaged contents.
                res.corrupt.append(CorruptSpan(name, pos, end - pos, seq, "checksum mismatch"))
                pos = res.valid_end = end
                continue
        nxt = _next_valid(buf, pos + 1)
        if nxt < 0:
            break  # nothing valid follows: a torn tail
        reason = "checksum mismatch" if status is _Frame.BAD_CRC else "bad header"
        res.corrupt.append(CorruptSpan(name, pos, nxt - pos, None, reason))
        pos = res.valid_end = nxt
    return res


def _encode_marker(acked: int, last_seq: int, last_event: tuple[int, bytes] | None) -> bytes:
    ev_seq, ev_hash = last_event if last_event is not None else (0, bytes(HASH_BYTES))
    body = _MARKER_BODY.pack(
        _MARKER_MAGIC, FORMAT_VERSION, 1 if last_event else 0, acked, last_seq, ev_seq, ev_hash
    )
    return body + _CRC.pack(zlib.crc32(body))


def _decode_marker(raw: bytes) -> tuple[int, int, tuple[int, bytes] | None] | None:
    """Return (acked_seq, last_seq, last_event) or None when the marker is damaged."""
    if len(raw) != _MARKER_BYTES or _CRC.unpack_from(raw, _MARKER_BODY.size)[0] != zlib.crc32(
        raw[: _MARKER_BODY.size]
    ):
        return None
    magic, version, flags, acked, last_seq, ev_seq, ev_hash = _MARKER_BODY.unpack_from(raw)
    if magic != _MARKER_MAGIC or version != FORMAT_VERSION:
        return None
    return acked, last_seq, ((ev_seq, ev_hash) if flags & 1 else None)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The spool


class _Segment:
    """Mutable in-memory state of one segment file; guarded by Spool._lock."""

    __slots__ = (
        "durable_count",
        "durable_size",
        "fd",
        "first_seq",
        "offsets",
        "path",
        "seqs",
        "size",
        "written",
        "written_count",
    )

    def __init__(self, first_seq: int, path: Path) -> None:
        self.first_seq = first_seq
        self.path = path
        self.fd = -1  # open for writing while active or awaiting its final fsync
        self.size = 0  # bytes in the file plus bytes buffered for it
        self.written = 0  # bytes handed to the kernel
        self.written_count = 0  # records handed to the kernel
        self.durable_size = 0  # bytes fsynced
        self.durable_count = 0  # records fsynced
        self.seqs: array[int] = array("Q")  # intact records, in file order
        self.offsets: array[int] = array("Q")

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else self.first_seq


class Spool:
    """A directory of append-only segments; see the module docstring for format and rules.

    Thread-safe: `append` may be called from several threads while another reads and acks.
    """

    def __init__(self, directory: Path, config: SpoolConfig = SpoolConfig()) -> None:
        self._dir = Path(directory)
        self._config = config
        self._lock = threading.Lock()  # all in-memory state; never held across fsync
        self._cond = threading.Condition(self._lock)  # wakes the flusher
        self._marker_dirty = False  # an ack newer than acked.bin is held in memory only
        self._synced = threading.Condition(self._lock)  # notified after each fsync
        self._sync_lock = threading.Lock()  # serialises fsync rounds; taken before _lock
        self._ack_lock = threading.Lock()  # serialises marker writes; taken before _lock

        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._retired: list[_Segment] = []  # rotated out, fd still open until fsynced
        self._dir_dirty = False
        self._buf = bytearray()  # frames appended to the active segment, not yet written
        self._buf_last_event: tuple[int, bytes] | None = None
        self._buf_last_seq = 0
        self._written_last_event: tuple[int, bytes] | None = None
        self._written_last_seq = 0
        self._dirty_since: float | None = None  # monotonic time of the oldest unsynced append
        self._total = 0
        self._closing = False
        self._closed = False
        self._broken: SpoolIOError | None = None
        self._dropped = 0
        self._corrupt_seen: set[tuple[int, int]] = set()  # (segment first_seq, offset)
        self._resume: tuple[int, int, int] | None = None  # (after_seq, segment, index)

        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error("mkdir", self._dir, e) from e
        self._recovery = self._recover()
        self._corrupt = self._recovery.corrupt_skipped
        self._torn = self._recovery.torn_bytes_truncated

        self._flusher = threading.Thread(
            target=self._run_flusher, name="spool-flusher", daemon=True
        )
        self._flusher.start()

    # -- recovery --------------------------------------------------------------------------

    def _recover(self) -> RecoveryReport:
        marker_damaged = False
        acked, marker_last_seq, marker_event = 0, 0, None
        try:
            raw = (self._dir / _MARKER_NAME).read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as e:
            raise _io_error("read", self._dir / _MARKER_NAME, e) from e
        if raw is not None:
            decoded = _decode_marker(raw)
            if decoded is None:
                marker_damaged = True
            else:
                acked, marker_last_seq, marker_event = decoded
        try:
            (self._dir / (_MARKER_NAME + ".tmp")).unlink(missing_ok=True)
            names = sorted(p.name for p in self._dir.iterdir() if _SEGMENT_RE.match(p.name))
        except OSError as e:
            raise _io_error("list", self._dir, e) from e

        corrupt: list[CorruptSpan] = []
        torn_tails = torn_bytes = intact = 0
        last: LastRecord | None = None
        last_event = marker_event
        prev_seq = claimed = 0
        for name in names:
            path = self._dir / name
            try:
                buf = path.read_bytes()
            except OSError as e:
                raise _io_error("read", path, e) from e
            res = _scan(buf, name, prev_seq)
            corrupt.extend(res.corrupt)
            claimed = max(claimed, res.claimed_seq)
            if res.valid_end < len(buf):
                torn_tails += 1
                torn_bytes += len(buf) - res.valid_end
                logger.warning(
                    "spool segment %s: truncating torn tail of %d bytes at offset %d",
                    name,
                    len(buf) - res.valid_end,
                    res.valid_end,
                )
            if res.valid_end == 0:
                try:
                    path.unlink()
                except OSError as e:
                    raise _io_error("unlink", path, e) from e
                continue
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    if res.valid_end < len(buf):
                        os.ftruncate(fd, res.valid_end)
                    # After a crash the page cache may hold data never fsynced; make it durable
                    # before it can be sent.
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise _io_error("truncate", path, e) from e
            seg = _Segment(int(name[:20]), path)
            seg.seqs, seg.offsets = res.seqs, res.offsets
            seg.size = seg.written = seg.durable_size = res.valid_end
            seg.written_count = seg.durable_count = len(res.seqs)
            self._segments.append(seg)
            self._total += seg.size
            intact += len(res.seqs)
            if res.last is not None:
                last = res.last
                prev_seq = res.last.seq
            if res.last_event is not None and (
                last_event is None or res.last_event[0] >= last_event[0]
            ):
                last_event = res.last_event
        if torn_tails:
            try:
                _fsync_dir(self._dir)
            except OSError as e:
                raise _io_error("fsync", self._dir, e) from e

        # A segment's name is the seq of the first record written to it, so no seq at or below
        # it may be reused even if its records were lost.
        names_seq = self._segments[-1].first_seq if self._segments else 0
        last_seq = max(acked, marker_last_seq, last.seq if last else 0, names_seq, claimed)
        self._acked = acked
        self._last_seq = self._durable_seq = self._written_last_seq = last_seq
        self._last_event = self._written_last_event = self._durable_last_event = last_event
        self._drop_acked_at_open(acked)
        if self._segments:
            active = self._segments[-1]
            try:
                active.fd = os.open(active.path, os.O_WRONLY)
            except OSError as e:
                raise _io_error("open", active.path, e) from e
            self._active = active

        report = RecoveryReport(
            segments_scanned=len(names),
            records_intact=intact,
            torn_tails=torn_tails,
            torn_bytes_truncated=torn_bytes,
            corrupt_skipped=len(corrupt),
            corrupt=tuple(corrupt),
            last_record=last,
            acked_seq=acked,
            marker_damaged=marker_damaged,
        )
        if not report.clean:
            logger.warning(
                "spool %s recovered with loss: %d segments, %d intact records, %d corrupt "
                "records skipped, %d torn bytes truncated in %d segments, ack marker damaged: %s",
                self._dir,
                len(names),
                intact,
                len(corrupt),
                torn_bytes,
                torn_tails,
                marker_damaged,
            )
        else:
            logger.info(
                "spool %s opened: %d segments, %d records, acked %d, last seq %d",
                self._dir,
                len(names),
                intact,
                acked,
                last_seq,
            )
        return report

    def _drop_acked_at_open(self, acked: int) -> None:
        """At open only (single-threaded): drop segments a previous run acked but kept; the
        newest segment is kept, as it becomes the active one."""
        keep: list[_Segment] = []
        for seg in self._segments:
            if seg is not self._segments[-1] and seg.last_seq <= acked:
                try:
                    seg.path.unlink()
                except OSError as e:
                    raise _io_error("unlink", seg.path, e) from e
                self._total -= seg.size
            else:
                keep.append(seg)
        if len(keep) != len(self._segments):
            self._segments = keep
            try:
                _fsync_dir(self._dir)
            except OSError as e:
                raise _io_error("fsync", self._dir, e) from e

    # -- public properties -----------------------------------------------------------------

    @property
    def recovery(self) -> RecoveryReport:
        """What opening the spool found."""
        return self._recovery

    @property
    def acked_seq(self) -> int:
        """The collector's cumulative ack, persisted."""
        return self._acked

    @property
    def last_seq(self) -> int:
        """Highest seq appended (either kind), 0 if none; survives restarts."""
        return self._last_seq

    @property
    def last_event(self) -> tuple[int, bytes] | None:
        """(seq, chain_hash) of the last EVENT appended; the chain resumes from it."""
        return self._last_event

    # -- append ----------------------------------------------------------------------------

    def _limit(self, priority: bool) -> int:
        if priority:
            return self._config.max_bytes
        return self._config.max_bytes - self._config.priority_reserve_bytes

    def would_accept(self, size: int, priority: bool = False) -> bool:
        """Whether a record with `size` data bytes fits now (ask before assigning a seq)."""
        with self._lock:
            return self._total + HEADER_BYTES + size <= self._limit(priority)

    def append(self, record: SpoolRecord) -> None:
        """Buffer `record` for the spool; it becomes durable within fsync_interval_s.

        Raises SpoolFull when the bound refuses it (telemetry above max_bytes minus the
        reserve; priority records above max_bytes), SpoolRecordError for a malformed or
        out-of-order record, SpoolIOError/SpoolDiskFull when the disk refuses. On any error the
        record is not in the spool and nothing appended earlier is lost.
        """
        seq = record.seq
        if len(record.chain_hash) != HASH_BYTES:
            raise SpoolRecordError(seq, f"chain_hash must be {HASH_BYTES} bytes")
        if len(record.data) > MAX_RECORD_DATA_BYTES:
            raise SpoolRecordError(seq, f"data exceeds {MAX_RECORD_DATA_BYTES} bytes")
        if not 0 < seq < 1 << 64:
            raise SpoolRecordError(seq, "seq must be in [1, 2**64)")
        if record.kind not in _KINDS:
            raise SpoolRecordError(seq, f"unknown kind {record.kind!r}")
        frame = encode_frame(record)
        n = len(frame)
        with self._lock:
            if self._closing:
                raise SpoolClosed("spool is closed")
            if self._broken is not None:
                raise self._broken
            if seq < self._last_seq:
                raise SpoolRecordError(seq, f"seq goes backwards (last {self._last_seq})")
            limit = self._limit(record.priority)
            if self._total + n > limit:
                self._dropped += 1
                raise SpoolFull(seq, n, record.priority, self._total, limit)
            active = self._active
            if active is None or (
                active.size >= self._config.segment_bytes and seq > active.last_seq
            ):
                self._rotate_locked(seq)
                active = self._active
                assert active is not None
            elif len(self._buf) + n > _WRITE_CHUNK_BYTES:
                self._write_out_locked()
            active.seqs.append(seq)
            active.offsets.append(active.size)
            active.size += n
            self._total += n
            self._buf += frame
            self._last_seq = self._buf_last_seq = seq
            if record.kind == RecordKind.EVENT:
                self._last_event = self._buf_last_event = (seq, record.chain_hash)
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
                self._cond.notify()

    def _rotate_locked(self, first_seq: int) -> None:
        """Write out the active segment and start a new one named `first_seq`."""
        self._write_out_locked()
        path = self._dir / f"{first_seq:020d}.seg"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise _io_error("create", path, e) from e
        seg = _Segment(first_seq, path)
        seg.fd = fd
        if self._active is not None:
            self._retired.append(self._active)
        self._segments.append(seg)
        self._active = seg
        self._dir_dirty = True

    def _write_out_locked(self) -> None:
        """Hand the buffer to the kernel. On failure the file is cut back to its last whole
        frame and the buffer is kept, so nothing accepted is lost and a later try can succeed."""
        if not self._buf:
            return
        seg = self._active
        assert seg is not None
        done = 0
        try:
            while done < len(self._buf):
                # Slicing copies, but only after a partial write, which is rare.
                data = self._buf[done:] if done else self._buf
                done += os.pwrite(seg.fd, data, seg.written + done)
        except OSError as e:
            try:
                os.ftruncate(seg.fd, seg.written)
            except OSError:
                # Leftover bytes past `written` are overwritten by the next write, or become
                # a torn tail that recovery truncates.
                pass
            raise _io_error("write", seg.path, e) from e
        seg.written += done
        seg.written_count = len(seg.seqs)
        self._buf.clear()
        self._written_last_seq = self._buf_last_seq
        if self._buf_last_event is not None:
            self._written_last_event = self._buf_last_event
            self._buf_last_event = None

    # -- durability ------------------------------------------------------------------------

    def flush(self) -> None:
        """Write and fsync everything appended so far."""
        self._sync()

    def _sync(self) -> None:
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    raise SpoolClosed("spool is closed")
                if self._broken is not None:
                    raise self._broken
                self._write_out_locked()
                self._dirty_since = None
                targets = [(s, s.written, s.written_count) for s in self._retired]
                active = self._active
                if active is not None and active.durable_size < active.written:
                    targets.append((active, active.written, active.written_count))
                retired, self._retired = self._retired, []
                dir_dirty, self._dir_dirty = self._dir_dirty, False
                last_seq, last_event = self._written_last_seq, self._written_last_event
            try:
                for seg, _size, _count in targets:
                    try:
                        os.fsync(seg.fd)
                    except OSError as e:
                        raise _io_error("fsync", seg.path, e) from e
                if dir_dirty:
                    try:
                        _fsync_dir(self._dir)
                    except OSError as e:
                        raise _io_error("fsync", self._dir, e) from e
            except SpoolIOError as err:
                # After a failed fsync the kernel may have dropped the dirty pages, and a later
                # fsync can succeed without them: nothing written since the last good fsync
                # can be trusted. Refuse further work; reopening re-verifies what is on disk.
                logger.error("spool %s unusable after failed fsync: %s", self._dir, err)
                with self._lock:
                    self._broken = err
                raise
            finally:
                for seg in retired:
                    os.close(seg.fd)
                    seg.fd = -1
            with self._lock:
                for seg, size, count in targets:
                    seg.durable_size = max(seg.durable_size, size)
                    seg.durable_count = max(seg.durable_count, count)
                self._durable_seq = max(self._durable_seq, last_seq)
                self._durable_last_event = last_event
                self._synced.notify_all()

    def wait_durable(self, after_seq: int, timeout: float) -> bool:
        """Block until a record with seq > `after_seq` is durable (readable by read_durable), or
        `timeout` seconds pass. Lets a sender sleep instead of polling."""
        with self._lock:
            if self._durable_seq > after_seq:
                return True
            self._synced.wait_for(lambda: self._durable_seq > after_seq or self._closing,
                                  timeout)
            return self._durable_seq > after_seq

    def _run_flusher(self) -> None:
        interval = self._config.fsync_interval_s
        while True:
            with self._lock:
                while not self._closing and self._dirty_since is None:
                    self._cond.wait()
                if self._closing or self._dirty_since is None:
                    return
                delay = self._dirty_since + interval - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
            try:
                self._sync()
            except SpoolClosed:
                return
            except SpoolError as e:
                logger.warning("spool %s: background flush failed, retrying: %s", self._dir, e)
                with self._lock:
                    if self._broken is not None:
                        return
                    if not self._closing:
                        self._cond.wait(interval)

    # -- read and ack ----------------------------------------------------------------------

    def read_durable(self, after_seq: int, max_records: int, max_bytes: int) -> list[SpoolRecord]:
        """Return fsynced records with seq > after_seq, in append order.

        `max_records` and `max_bytes` (sum of data lengths) are soft: at least one record is
        returned when one is available, and a batch never ends between durable records of the
        same seq (an event and its checkpoint), so no checkpoint is skipped by the next call.
        When `after_seq` is the last seq returned by the previous call, reading resumes exactly
        where it stopped, so a checkpoint for that seq appended since is returned then.
        Never flushes; records a crash could still lose are never returned.
        """
        if max_records <= 0:
            return []
        plan: list[tuple[_Segment, int, int, int]] = []  # (segment, first idx, end idx, end off)
        with self._lock:
            segs = self._segments
            start_seg = start_idx = -1
            if self._resume is not None and self._resume[0] == after_seq:
                for i, s in enumerate(segs):
                    if s.first_seq == self._resume[1]:
                        start_seg, start_idx = i, self._resume[2]
                        break
            if start_seg < 0:
                for i, s in enumerate(segs):
                    if s.durable_count and s.seqs[s.durable_count - 1] > after_seq:
                        start_seg = i
                        start_idx = bisect.bisect_right(s.seqs, after_seq, 0, s.durable_count)
                        break
            if start_seg < 0:
                return []
            budget_records, budget_bytes = max_records, max_bytes
            last_seq = -1
            for s in segs[start_seg:]:
                i = start_idx if s is segs[start_seg] else 0
                j = i
                while j < s.durable_count:
                    nxt = s.offsets[j + 1] if j + 1 < s.durable_count else s.durable_size
                    size = nxt - s.offsets[j] - HEADER_BYTES
                    full = budget_records <= 0 or (budget_bytes < size and last_seq >= 0)
                    if full and s.seqs[j] != last_seq:
                        break
                    budget_records -= 1
                    budget_bytes -= size
                    last_seq = s.seqs[j]
                    j += 1
                if j > i:
                    end = s.offsets[j] if j < s.durable_count else s.durable_size
                    plan.append((s, i, j, end))
                if j < s.durable_count:
                    break
            seen = self._corrupt_seen
            items = [
                (
                    s,
                    i,
                    j,
                    end,
                    [
                        (s.seqs[k], s.offsets[k])
                        for k in range(i, j)
                        if not seen or (s.first_seq, s.offsets[k]) not in seen
                    ],
                )
                for s, i, j, end in plan
            ]
        out: list[SpoolRecord] = []
        for s, _i, _j, end, recs in items:
            if not recs:
                continue
            base = recs[0][1]
            try:
                with open(s.path, "rb", buffering=0) as f:
                    buf = os.pread(f.fileno(), end - base, base)
            except FileNotFoundError:
                continue  # acked and deleted concurrently
            except OSError as e:
                raise _io_error("read", s.path, e) from e
            for seq, off in recs:
                status, got_seq, _len = _check_frame(buf, off - base)
                if status is not _Frame.OK or got_seq != seq:
                    self._note_read_corruption(s, off, seq, status)
                    continue
                out.append(_decode_frame(buf, off - base))
        if plan:
            s, _i, j, _end = plan[-1]
            with self._lock:
                self._resume = (last_seq, s.first_seq, j)
        return out

    def _note_read_corruption(self, seg: _Segment, offset: int, seq: int, status: _Frame) -> None:
        with self._lock:
            if (seg.first_seq, offset) in self._corrupt_seen:
                return
            self._corrupt_seen.add((seg.first_seq, offset))
            self._corrupt += 1
        logger.warning(
            "spool segment %s: record seq %d at offset %d damaged since recovery (%s); skipped",
            seg.path.name,
            seq,
            offset,
            status.name,
        )

    def ack(self, durable_seq: int) -> None:
        """Record the collector's cumulative ack and delete segments it fully covers.

        Acks at or below the current one are ignored; acks beyond what is durable here are
        clamped (the collector cannot hold what was never sent) and logged.
        """
        with self._ack_lock:
            with self._lock:
                if durable_seq <= self._acked:
                    return
                if durable_seq > self._durable_seq:
                    logger.warning(
                        "spool %s: ack %d beyond durable seq %d; clamped",
                        self._dir,
                        durable_seq,
                        self._durable_seq,
                    )
                    durable_seq = self._durable_seq
                    if durable_seq <= self._acked:
                        return
                marker = _encode_marker(durable_seq, self._durable_seq, self._durable_last_event)
                frees_segment = any(s is not self._active and s.last_seq <= durable_seq
                                    for s in self._segments)
                if not frees_segment:
                    # Nothing to delete: keep the ack in memory and persist it lazily (at the
                    # next deletion or at close). A crash before that only makes the sender
                    # resend records the collector already holds, which it ignores.
                    self._acked = durable_seq
                    self._marker_dirty = True
                    return
            try:
                self._write_marker(marker)
            except SpoolDiskFull:
                # A full disk must not block the ack that frees it. Deleting acked segments
                # before the marker is persisted loses nothing unacked: after a crash the older
                # ack point only makes the sender resend what is left.
                logger.warning("spool %s: disk full writing ack marker; deleting first", self._dir)
                self._delete_acked(durable_seq)
                self._write_marker(marker)
                return
            self._delete_acked(durable_seq)

    def _delete_acked(self, durable_seq: int) -> None:
        """Adopt the ack in memory and delete the segments it fully covers."""
        with self._lock:
            self._acked = max(self._acked, durable_seq)
            self._marker_dirty = False
            doomed = [
                s for s in self._segments if s is not self._active and s.last_seq <= durable_seq
            ]
            if doomed:
                self._segments = [s for s in self._segments if s not in doomed]
                self._total -= sum(s.size for s in doomed)
        for s in doomed:
            try:
                s.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _io_error("unlink", s.path, e) from e
        if doomed:
            try:
                _fsync_dir(self._dir)
            except OSError as e:
                raise _io_error("fsync", self._dir, e) from e
            logger.debug(
                "spool %s: ack %d deleted %d segments", self._dir, durable_seq, len(doomed)
            )

    def _write_marker(self, marker: bytes) -> None:
        path = self._dir / _MARKER_NAME
        tmp = self._dir / (_MARKER_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if os.write(fd, marker) != len(marker):
                    raise OSError(errno_mod.EIO, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(self._dir)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _io_error("write", path, e) from e

    # -- stats and lifecycle ---------------------------------------------------------------

    def stats(self) -> SpoolStats:
        """A consistent snapshot of the spool's counters."""
        with self._lock:
            records = pending = unsynced = 0
            for s in self._segments:
                records += len(s.seqs)
                unsynced += s.size - s.durable_size
                if s.last_seq > self._acked:
                    pending += len(s.seqs) - bisect.bisect_right(s.seqs, self._acked)
            return SpoolStats(
                records=records,
                bytes_used=self._total,
                bytes_unsynced=unsynced,
                segments=len(self._segments),
                pending_records=pending,
                acked_seq=self._acked,
                last_seq=self._last_seq,
                durable_seq=self._durable_seq,
                dropped_refused=self._dropped,
                corrupt_skipped=self._corrupt,
                torn_bytes_truncated=self._torn,
            )

    def close(self) -> None:
        """Flush, fsync and close; raises SpoolIOError if the final flush failed. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._flusher.join()
        error: SpoolError | None = None
        try:
            self._sync()
            with self._lock:
                marker = (_encode_marker(self._acked, self._durable_seq,
                                         self._durable_last_event)
                          if self._marker_dirty else None)
            if marker is not None:
                self._write_marker(marker)
        except SpoolError as e:
            error = e
            logger.error("spool %s: final flush failed: %s", self._dir, e)
        with self._sync_lock, self._lock:
            self._closed = True
            for s in [*self._retired, *([self._active] if self._active else [])]:
                if s.fd >= 0:
                    os.close(s.fd)
                    s.fd = -1
            self._retired = []
        if error is not None:
            raise error

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
