"""Evidence bundles: a deterministic ZIP of raw events, agent-signed proofs and a
server-signed manifest, plus the offline verifier that checks all of it against pinned keys.

Events stay opaque bytes here: a caller-supplied `EventCodec` says what each event is (seq,
agent, time, gap range) and how to render it. This module never imports protobuf and never
re-serializes an event: it verifies the bytes exactly as stored.

Layout (member order is fixed; every timestamp is 1980-01-01 00:00:00)::

    events.bin                            frames: [seq u64 BE][len u32 BE][event bytes]
    events.jsonl                          derived rendering, one JSON object per event
    checkpoints/<seq>.dsse.json           agent-signed checkpoints (ascending seq)
    files/<sha256>                        collected file content
    files/<sha256>.acquisition.dsse.json  agent-signed acquisition record
    custody.jsonl                         chain of custody, one JSON object per line
    manifest.json                         canonical JSON: identities, ranges, member digests
    manifest.dsse.json                    server DSSE signature over manifest.json's bytes
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json.encoder as json_encoder
import logging
import multiprocessing
import os
import re
import struct
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import IO, Any, BinaryIO, NamedTuple, Protocol, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evidence import _canonical
from evidence.acquisition import AcquisitionRecord, verify_acquisition
from evidence.chain import GENESIS_HASH, ChainVerifier, explain_jump
from evidence.checkpoint import Checkpoint, verify_checkpoint
from evidence.dsse import MANIFEST_TYPE, sign_envelope, verify_envelope
from evidence.errors import (
    BundleBuildError,
    BundleVerificationError,
    EvidenceIOError,
    FormatError,
    IntegrityError,
    PayloadTypeError,
    SignatureError,
    TrustError,
)
from evidence.keys import key_id, public_key_bytes, public_key_from_bytes

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1

MANIFEST = "manifest.json"
MANIFEST_SIGNATURE = "manifest.dsse.json"
EVENTS = "events.bin"
EVENTS_JSONL = "events.jsonl"
CUSTODY = "custody.jsonl"
CONTAINER = "(container)"

FRAME = struct.Struct(">QI")
"""Frame header in events.bin: seq (u64 big-endian), length (u32 big-endian)."""

MAX_EVENT_BYTES = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_SMALL_MEMBER_BYTES = 16 * 1024 * 1024
MAX_SIGNED_RECORD_BYTES = 256 * 1024
MAX_MEMBERS = 1_000_000
PARALLEL_MIN_EVENT_BYTES = 8 * 1024 * 1024
"""events.bin size from which verify_bundle renders events.jsonl in worker processes by
default: below it, starting the workers costs more than they save."""
MAX_RENDER_WORKERS = 4

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1 << 20
_CHECKPOINT_RE = re.compile(r"checkpoints/([1-9][0-9]{0,19})\.dsse\.json")
_FILE_RE = re.compile(r"files/([0-9a-f]{64})")
_ACQ_RE = re.compile(r"files/([0-9a-f]{64})\.acquisition\.dsse\.json")
_CUSTODY_REQUIRED = {"time_ns", "actor", "action"}


class EventInfo(NamedTuple):
    """What a codec says about one event's bytes."""

    seq: int
    agent_id: str
    time_ns: int
    gap: tuple[int, int] | None  # (first, last) dropped seqs when this is a gap event


class EventCodec(Protocol):
    """Interprets opaque event bytes; the server supplies a protobuf-based implementation."""

    def describe(self, event_bytes: bytes) -> EventInfo:
        """Return seq, agent id, time and gap range of the event; raise if unparseable."""
        ...

    def render(self, event_bytes: bytes) -> Mapping[str, Any]:
        """Return the JSON-able human-readable rendering written to events.jsonl."""
        ...


# A codec may also offer `render_canonical(event_bytes) -> str | None`: the canonical JSON text
# of render(event_bytes) (sorted keys, compact, ASCII), or None to have it encoded from
# render(). Writing the text directly can be much faster than building and encoding a dict;
# the codec's tests must show it equals the encoded rendering, since events.jsonl is compared
# byte for byte. It is looked up by name so plain two-method codecs keep working.


@dataclass(frozen=True)
class MemberCheck:
    """One line of a verification report: a member, whether a check passed, and why."""

    member: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class TrustSet:
    """Pinned public keys: servers that may sign manifests, agents that may sign evidence."""

    server_keys: tuple[Ed25519PublicKey, ...]
    agent_keys: tuple[Ed25519PublicKey, ...]

    def __post_init__(self) -> None:
        if not self.server_keys:
            raise TrustError("trust set has no server keys: refusing to verify")
        if not self.agent_keys:
            raise TrustError("trust set has no agent keys: refusing to verify")

    @classmethod
    def of(cls, server_keys: Iterable[Ed25519PublicKey],
           agent_keys: Iterable[Ed25519PublicKey]) -> TrustSet:
        """Build a TrustSet from any iterables of keys."""
        return cls(tuple(server_keys), tuple(agent_keys))

    def agent_key(self, wanted_key_id: str) -> Ed25519PublicKey | None:
        """Return the pinned agent key with id `wanted_key_id`, or None."""
        for key in self.agent_keys:
            if key_id(key) == wanted_key_id:
                return key
        return None


class ManifestMember(NamedTuple):
    """A member listed in the manifest with its digest and size."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BundleManifest:
    """The parsed, server-signed manifest."""

    bundle_id: str
    case_id: str
    created_ns: int
    host: Mapping[str, str]
    agent_id: str
    agent_public_key: bytes
    agent_key_id: str
    server_key_id: str
    first_time_ns: int
    last_time_ns: int
    start_seq: int
    start_head: bytes
    first_seq: int
    end_seq: int
    event_count: int
    members: tuple[ManifestMember, ...]


@dataclass(frozen=True)
class BuiltBundle:
    """What build_bundle wrote."""

    bundle_id: str
    manifest_sha256: str
    event_count: int
    first_seq: int
    end_seq: int
    checkpoint_seqs: tuple[int, ...]
    dropped_after_end: bool  # events past the last checkpoint were left out


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check, with the full report."""

    manifest: BundleManifest
    report: tuple[MemberCheck, ...]
    event_count: int
    start_seq: int
    end_seq: int
    checkpoints: tuple[Checkpoint, ...]
    files: tuple[AcquisitionRecord, ...]
    server_key_id: str
    agent_key_id: str
    codec_checked: bool


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

_NO_SEQ = 1 << 64  # above every u64 seq: the sentinel after the last checkpoint


def _line_encoder() -> Callable[[dict[str, Any]], str]:
    """The canonical encoder as one C call per object, when the C accelerator exists.

    JSONEncoder.encode rebuilds the C encoder on every call, which costs more than encoding a
    small object. Same options as `_canonical.ENCODER`, so the output is identical (a test
    checks); without the accelerator it falls back to ENCODER.encode.
    """
    enc = _canonical.ENCODER
    make = getattr(json_encoder, "c_make_encoder", None)
    if make is None:
        return enc.encode
    # markers=None: no circular-reference bookkeeping; a cyclic rendering recurses until
    # RecursionError, which the scan reports as an undecodable event like any codec failure.
    iterencode = make(None, enc.default, json_encoder.encode_basestring_ascii, enc.indent,
                      enc.key_separator, enc.item_separator, enc.sort_keys, enc.skipkeys,
                      enc.allow_nan)
    join = "".join

    def encode(obj: dict[str, Any]) -> str:
        return join(iterencode(obj, 0))

    return encode


_ENCODE_LINE = _line_encoder()


def _canonical_renderer(codec: EventCodec) -> Callable[[bytes], str | None] | None:
    fast: Callable[[bytes], str | None] | None = getattr(codec, "render_canonical", None)
    return fast


def render_line(codec: EventCodec, event_bytes: bytes) -> bytes:
    """The events.jsonl line for one event: canonical JSON of codec.render plus newline."""
    fast = _canonical_renderer(codec)
    text = fast(event_bytes) if fast is not None else None
    if text is None:
        rendered = codec.render(event_bytes)
        if type(rendered) is not dict:
            rendered = dict(rendered)
        text = _canonical.ENCODER.encode(rendered)
    return text.encode("ascii") + b"\n"


def _custody_line(entry: Mapping[str, Any]) -> bytes:
    missing = _CUSTODY_REQUIRED - entry.keys()
    if missing:
        raise BundleBuildError(f"custody entry lacks {sorted(missing)}")
    return _canonical.dumps(dict(entry)) + b"\n"


def _zinfo(name: str, compress: int, size: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = compress
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    info.file_size = size  # zipfile uses this to decide on ZIP64 before streaming.
    return info


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

FileSource = str | os.PathLike[str] | bytes


def build_bundle(
    out: str | os.PathLike[str] | BinaryIO,
    *,
    case_id: str,
    host: Mapping[str, str],
    agent_key: Ed25519PublicKey,
    events: Iterable[tuple[int, bytes]],
    checkpoints: Iterable[bytes],
    server_key: Ed25519PrivateKey,
    codec: EventCodec,
    start_seq: int = 0,
    start_head: bytes = GENESIS_HASH,
    files: Mapping[str, tuple[FileSource, bytes]] | None = None,
    custody: Sequence[Mapping[str, Any]] = (),
    bundle_id: str | None = None,
    created_ns: int | None = None,
) -> BuiltBundle:
    """Write a signed bundle of `events` (ascending (seq, bytes)) to `out`.

    `start_seq`/`start_head` are the seq and head just before the first event. The range is
    trimmed to end at the last event covered by one of `checkpoints` (agent-signed envelopes);
    later events are not consumed. `files` maps sha256 -> (path or content bytes, agent-signed
    acquisition envelope). Events are streamed through temporary files, never held in memory.
    Raises BundleBuildError when inputs disagree (chain break, foreign event, bad signature,
    digest mismatch); a path `out` is then left absent.
    """
    agent_id = host.get("agent_id", "")
    if not agent_id:
        raise BundleBuildError("host identity lacks agent_id")
    if not custody:
        raise BundleBuildError("custody must have at least one entry (who requested, why)")
    custody_bytes = b"".join(_custody_line(e) for e in custody)

    cps: dict[int, tuple[Checkpoint, bytes]] = {}
    for envelope in checkpoints:
        try:
            cp = verify_checkpoint(envelope, agent_key, agent_id)
        except IntegrityError as e:
            raise BundleBuildError(f"checkpoint does not verify: {e}") from e
        if cp.seq <= start_seq:
            continue
        if cp.seq in cps and cps[cp.seq][0].head != cp.head:
            raise BundleBuildError(f"two checkpoints at seq {cp.seq} disagree (fork)")
        cps.setdefault(cp.seq, (cp, envelope))
    if not cps:
        raise BundleBuildError(f"no checkpoint after start seq {start_seq}")
    target_end = max(cps)

    if isinstance(out, (str, os.PathLike)):
        final = os.fspath(out)
        partial = final + ".partial"
        try:
            with open(partial, "wb") as f:
                built = _build(f, case_id, dict(host), agent_id, agent_key, events, cps,
                               target_end, server_key, codec, start_seq, start_head, files or {},
                               custody_bytes, bundle_id, created_ns)
            os.replace(partial, final)
        except OSError as e:
            _unlink_quietly(partial)
            raise EvidenceIOError(final, f"cannot write bundle: {e}") from e
        except BaseException:
            _unlink_quietly(partial)
            raise
        return built
    return _build(out, case_id, dict(host), agent_id, agent_key, events, cps, target_end,
                  server_key, codec, start_seq, start_head, files or {}, custody_bytes,
                  bundle_id, created_ns)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Covered(NamedTuple):
    bin_offset: int
    jsonl_offset: int
    event_count: int
    first_seq: int
    end_seq: int
    first_ns: int
    last_ns: int
    trimmed: bool  # events after end_seq were supplied and left out


def _build(out: BinaryIO, case_id: str, host: dict[str, str], agent_id: str,
           agent_key: Ed25519PublicKey, events: Iterable[tuple[int, bytes]],
           cps: dict[int, tuple[Checkpoint, bytes]], target_end: int,
           server_key: Ed25519PrivateKey, codec: EventCodec, start_seq: int, start_head: bytes,
           files: Mapping[str, tuple[FileSource, bytes]], custody_bytes: bytes,
           bundle_id: str | None, created_ns: int | None) -> BuiltBundle:
    acquisitions: list[tuple[str, FileSource, bytes, AcquisitionRecord]] = []
    for sha, (source, envelope) in sorted(files.items()):
        if not _canonical.is_sha256_hex(sha):
            raise BundleBuildError(f"file key {sha!r} is not a lowercase sha256 hex digest")
        try:
            rec = verify_acquisition(envelope, agent_key, agent_id)
        except IntegrityError as e:
            raise BundleBuildError(f"acquisition record for {sha} does not verify: {e}") from e
        if rec.sha256 != sha:
            raise BundleBuildError(f"acquisition record for {sha} names sha256 {rec.sha256}")
        acquisitions.append((sha, source, envelope, rec))

    with tempfile.TemporaryFile() as bin_tmp, tempfile.TemporaryFile() as jsonl_tmp:
        covered = _stream_events(bin_tmp, jsonl_tmp, events, codec, agent_id, cps, target_end,
                                 start_seq, start_head)
        bin_tmp.truncate(covered.bin_offset)
        jsonl_tmp.truncate(covered.jsonl_offset)
        included = [s for s in sorted(cps) if s <= covered.end_seq]
        members: list[dict[str, Any]] = []

        with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
            def put_stream(name: str, src: IO[bytes], size: int, compress: int) -> str:
                src.seek(0)
                with zf.open(_zinfo(name, compress, size), "w") as dst:
                    digest, written = _copy_hashing(src, dst)
                members.append({"name": name, "sha256": digest, "size": written})
                return digest

            def put_bytes(name: str, data: bytes) -> None:
                zf.writestr(_zinfo(name, zipfile.ZIP_DEFLATED, len(data)), data)
                members.append({"name": name, "sha256": hashlib.sha256(data).hexdigest(),
                                "size": len(data)})

            # events.bin is STORED: verification speed is bounded by reading it, and
            # decompression would cost more than the hashing the verifier must do anyway.
            put_stream(EVENTS, bin_tmp, covered.bin_offset, zipfile.ZIP_STORED)
            put_stream(EVENTS_JSONL, jsonl_tmp, covered.jsonl_offset, zipfile.ZIP_DEFLATED)
            for seq in included:
                put_bytes(f"checkpoints/{seq}.dsse.json", cps[seq][1])
            for sha, source, envelope, rec in acquisitions:
                name = f"files/{sha}"
                if isinstance(source, bytes):
                    put_bytes(name, source)
                    digest = members[-1]["sha256"]
                else:
                    with open(source, "rb") as src:
                        digest = put_stream(name, src, os.fstat(src.fileno()).st_size,
                                            zipfile.ZIP_DEFLATED)
                if digest != sha or members[-1]["size"] != rec.size:
                    raise BundleBuildError(
                        f"file {sha}: content has sha256 {digest} and size "
                        f"{members[-1]['size']}, the acquisition record says {rec.sha256} "
                        f"and {rec.size}")
                put_bytes(f"{name}.acquisition.dsse.json", envelope)
            put_bytes(CUSTODY, custody_bytes)

            bid = bundle_id or str(uuid.uuid4())
            manifest = {
                "media_type": MANIFEST_TYPE,
                "format_version": BUNDLE_FORMAT_VERSION,
                "bundle_id": bid,
                "case_id": case_id,
                "created_ns": time.time_ns() if created_ns is None else created_ns,
                "host": host,
                "agent": {"public_key": public_key_bytes(agent_key).hex(),
                          "key_id": key_id(agent_key)},
                "server": {"key_id": key_id(server_key.public_key())},
                "time_range": {"first_ns": covered.first_ns, "last_ns": covered.last_ns},
                "chain": {"start_seq": start_seq, "start_head": start_head.hex(),
                          "first_seq": covered.first_seq, "end_seq": covered.end_seq,
                          "event_count": covered.event_count},
                "members": members,
            }
            manifest_bytes = _canonical.dumps(manifest)
            zf.writestr(_zinfo(MANIFEST, zipfile.ZIP_DEFLATED), manifest_bytes)
            zf.writestr(_zinfo(MANIFEST_SIGNATURE, zipfile.ZIP_DEFLATED),
                        sign_envelope(MANIFEST_TYPE, manifest_bytes, server_key))
    logger.info("built bundle %s: %d events, seq %d..%d, %d checkpoints, %d files", bid,
                covered.event_count, covered.first_seq, covered.end_seq, len(included),
                len(acquisitions))
    return BuiltBundle(bundle_id=bid, manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                       event_count=covered.event_count, first_seq=covered.first_seq,
                       end_seq=covered.end_seq, checkpoint_seqs=tuple(included),
                       dropped_after_end=covered.trimmed)


def _stream_events(bin_tmp: IO[bytes], jsonl_tmp: IO[bytes], events: Iterable[tuple[int, bytes]],
                   codec: EventCodec, agent_id: str, cps: dict[int, tuple[Checkpoint, bytes]],
                   target_end: int, start_seq: int, start_head: bytes) -> _Covered:
    verifier = ChainVerifier(start_seq, start_head)
    pack = FRAME.pack
    count = 0
    first_seq = 0
    first_ns = last_ns = 0
    covered: _Covered | None = None
    beyond = False
    for seq, event_bytes in events:
        if seq > target_end:
            beyond = True
            break
        if len(event_bytes) > MAX_EVENT_BYTES:
            raise BundleBuildError(f"event at seq {seq} exceeds {MAX_EVENT_BYTES} bytes")
        info = codec.describe(event_bytes)
        if info.seq != seq:
            raise BundleBuildError(f"event given as seq {seq} says seq {info.seq}")
        if info.agent_id != agent_id:
            raise BundleBuildError(f"event at seq {seq} is from agent {info.agent_id!r}")
        try:
            head = verifier.feed(seq, event_bytes, info.gap)
        except IntegrityError as e:
            raise BundleBuildError(str(e)) from e
        bin_tmp.write(pack(seq, len(event_bytes)))
        bin_tmp.write(event_bytes)
        jsonl_tmp.write(render_line(codec, event_bytes))
        if count == 0:
            first_seq, first_ns, last_ns = seq, info.time_ns, info.time_ns
        else:
            first_ns = min(first_ns, info.time_ns)
            last_ns = max(last_ns, info.time_ns)
        count += 1
        entry = cps.get(seq)
        if entry is not None:
            if entry[0].head != head:
                raise BundleBuildError(f"checkpoint at seq {seq} does not match the chain "
                                       f"recomputed from the events")
            covered = _Covered(bin_tmp.tell(), jsonl_tmp.tell(), count, first_seq, seq,
                               first_ns, last_ns, False)
    if covered is None:
        raise BundleBuildError("no included event is covered by a checkpoint")
    return covered._replace(trimmed=beyond or count > covered.event_count)


# --------------------------------------------------------------------------------------------
# Verifying
# --------------------------------------------------------------------------------------------

def _parse_manifest(payload: bytes) -> BundleManifest:
    what = "manifest"
    obj = _canonical.loads_object(payload, what)
    _canonical.require_keys(obj, {"media_type", "format_version", "bundle_id", "case_id",
                                  "created_ns", "host", "agent", "server", "time_range",
                                  "chain", "members"}, what)
    if obj["media_type"] != MANIFEST_TYPE:
        raise FormatError(f"media_type is {obj['media_type']!r}", MANIFEST)
    if _canonical.get_int(obj, "format_version", what) != BUNDLE_FORMAT_VERSION:
        raise FormatError(f"unsupported format_version {obj['format_version']!r}", MANIFEST)
    host = obj["host"]
    if not isinstance(host, dict) or not all(isinstance(v, str) for v in host.values()):
        raise FormatError("host is not an object of strings", MANIFEST)
    agent_id = _canonical.get_str(host, "agent_id", "manifest host")
    agent, server, trange, chain = obj["agent"], obj["server"], obj["time_range"], obj["chain"]
    for name, sub in (("agent", agent), ("server", server), ("time_range", trange),
                      ("chain", chain)):
        if not isinstance(sub, dict):
            raise FormatError(f"{name} is not an object", MANIFEST)
    _canonical.require_keys(agent, {"public_key", "key_id"}, "manifest agent")
    _canonical.require_keys(server, {"key_id"}, "manifest server")
    _canonical.require_keys(trange, {"first_ns", "last_ns"}, "manifest time_range")
    _canonical.require_keys(chain, {"start_seq", "start_head", "first_seq", "end_seq",
                                    "event_count"}, "manifest chain")
    raw_members = obj["members"]
    if not isinstance(raw_members, list) or len(raw_members) > MAX_MEMBERS:
        raise FormatError("members is not a list (or is too long)", MANIFEST)
    members: list[ManifestMember] = []
    seen: set[str] = set()
    for m in raw_members:
        if not isinstance(m, dict):
            raise FormatError("a members entry is not an object", MANIFEST)
        _canonical.require_keys(m, {"name", "sha256", "size"}, "manifest member")
        name = _canonical.get_str(m, "name", "manifest member")
        sha = _canonical.get_str(m, "sha256", "manifest member")
        if not _canonical.is_sha256_hex(sha):
            raise FormatError(f"member {name!r} sha256 is not lowercase hex", MANIFEST)
        if name in seen or name in (MANIFEST, MANIFEST_SIGNATURE):
            raise FormatError(f"member {name!r} listed twice or reserved", MANIFEST)
        if not (name in (EVENTS, EVENTS_JSONL, CUSTODY) or _CHECKPOINT_RE.fullmatch(name)
                or _FILE_RE.fullmatch(name) or _ACQ_RE.fullmatch(name)):
            raise FormatError(f"member name {name!r} is not part of the bundle format", MANIFEST)
        seen.add(name)
        members.append(ManifestMember(name, sha, _canonical.get_int(m, "size", "manifest member")))
    for required in (EVENTS, EVENTS_JSONL, CUSTODY):
        if required not in seen:
            raise FormatError(f"required member {required} is not listed", MANIFEST)
    start_seq = _canonical.get_int(chain, "start_seq", "manifest chain")
    first_seq = _canonical.get_int(chain, "first_seq", "manifest chain", minimum=1)
    end_seq = _canonical.get_int(chain, "end_seq", "manifest chain", minimum=1)
    if not start_seq < first_seq <= end_seq:
        raise FormatError("chain range is not start_seq < first_seq <= end_seq", MANIFEST)
    return BundleManifest(
        bundle_id=_canonical.get_str(obj, "bundle_id", what),
        case_id=_canonical.get_str(obj, "case_id", what, nonempty=False),
        created_ns=_canonical.get_int(obj, "created_ns", what, minimum=None),
        host=MappingProxyType(dict(host)),
        agent_id=agent_id,
        agent_public_key=_canonical.get_hex(agent, "public_key", "manifest agent", 32),
        agent_key_id=_canonical.get_hex(agent, "key_id", "manifest agent", 32).hex(),
        server_key_id=_canonical.get_hex(server, "key_id", "manifest server", 32).hex(),
        first_time_ns=_canonical.get_int(trange, "first_ns", "manifest time_range", None),
        last_time_ns=_canonical.get_int(trange, "last_ns", "manifest time_range", None),
        start_seq=start_seq,
        start_head=_canonical.get_hex(chain, "start_head", "manifest chain", 32),
        first_seq=first_seq,
        end_seq=end_seq,
        event_count=_canonical.get_int(chain, "event_count", "manifest chain", minimum=1),
        members=tuple(members),
    )


class _Report:
    """Collects MemberChecks in order."""

    def __init__(self) -> None:
        self.checks: list[MemberCheck] = []

    def ok(self, member: str, reason: str) -> None:
        self.checks.append(MemberCheck(member, True, reason))

    def fail(self, member: str, reason: str) -> None:
        logger.debug("bundle check failed: %s: %s", member, reason)
        self.checks.append(MemberCheck(member, False, reason))

    @property
    def failed(self) -> bool:
        return any(not c.ok for c in self.checks)

    def abort(self) -> BundleVerificationError:
        return BundleVerificationError(self.checks)


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, report: _Report) -> bytes | None:
    info = zf.getinfo(name)
    if info.file_size > limit:
        report.fail(name, f"member is {info.file_size} bytes, limit is {limit}")
        return None
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError,
            NotImplementedError) as e:
        report.fail(name, f"cannot read member from the ZIP container: {e}")
        return None
    if len(data) > limit:
        report.fail(name, f"member exceeds the limit of {limit} bytes")
        return None
    return data


def _signature_reason(e: IntegrityError | TrustError) -> str:
    if isinstance(e, SignatureError):
        return f"{e.reason} {e.keyid}" if e.keyid else e.reason
    if isinstance(e, PayloadTypeError):
        return f"wrong payloadType {e.actual!r} (expected {e.expected!r})"
    if isinstance(e, FormatError):
        return e.reason
    return str(e)


def verify_bundle(source: str | os.PathLike[str] | BinaryIO, trust: TrustSet,
                  codec: EventCodec | None = None, *,
                  unsafe_skip_rendering: bool = False,
                  workers: int | None = None) -> VerifiedBundle:
    """Verify a bundle offline against `trust`; return it, or raise with the full report.

    Order: server signature over manifest.json (signature, type, then parse); agent key
    pinned; every member listed, present, with matching size and sha256, nothing unlisted;
    checkpoints signed by the agent key; events.bin framing, per-event seq and agent binding
    (via `codec`), chain recomputed from start_head with gap rules, checkpoint heads matched,
    final event covered; events.jsonl equals the regenerated rendering; collected files match
    their names and agent-signed acquisition records; custody.jsonl parses.

    Without a codec, seq/agent binding, gap events and events.jsonl cannot be checked: a seq
    jump then fails closed, and the report says what was skipped. `unsafe_skip_rendering`
    keeps every check but the regeneration of events.jsonl (its digest is still checked); it
    exists to measure and run the signature, chain and binding core alone, logs a warning and
    says so in the report.

    `workers` processes regenerate events.jsonl while this one checks the chain; the result
    and report are the same for any number. None picks the usable CPUs (at most
    `MAX_RENDER_WORKERS`) for bundles whose events.bin exceeds `PARALLEL_MIN_EVENT_BYTES`,
    else 1 (in-process). If the workers cannot run, verification is redone in-process. Raises
    BundleVerificationError (report attached) on any failure, EvidenceIOError if the file
    cannot be opened.
    """
    report = _Report()
    try:
        zf = zipfile.ZipFile(source, "r")
    except OSError as e:
        raise EvidenceIOError(os.fspath(source) if isinstance(source, (str, os.PathLike))
                              else "<stream>", f"cannot open bundle: {e}") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        report.fail(CONTAINER, f"not a readable ZIP archive: {e}")
        raise report.abort() from e
    if unsafe_skip_rendering:
        logger.warning("unsafe_skip_rendering: events.jsonl is not regenerated from events.bin; "
                       "its content is vouched for by the server signature only")
    with zf:
        jobs = _render_workers(zf, workers) if codec is not None and not unsafe_skip_rendering \
            else 1
        try:
            return _verify_open(zf, trust, codec, report, not unsafe_skip_rendering, jobs)
        except _RenderWorkersFailed as e:
            logger.warning("events.jsonl rendering workers failed (%s); verifying in-process",
                           e)
            return _verify_open(zf, trust, codec, _Report(), not unsafe_skip_rendering, 1)


def _render_workers(zf: zipfile.ZipFile, workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    try:
        size = zf.getinfo(EVENTS).file_size
    except KeyError:
        return 1
    if size < PARALLEL_MIN_EVENT_BYTES:
        return 1
    if getattr(sys, "frozen", False):
        # A frozen (PyInstaller) executable starts its worker processes through its own entry
        # point; in-process rendering needs no such cooperation, so it is the default there.
        return 1
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every CPU counts
    usable = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(MAX_RENDER_WORKERS, usable))


def _verify_open(zf: zipfile.ZipFile, trust: TrustSet, codec: EventCodec | None,
                 report: _Report, render: bool = True, workers: int = 1) -> VerifiedBundle:
    names = zf.namelist()
    if len(names) != len(set(names)):
        dupes = sorted({n for n in names if names.count(n) > 1})
        report.fail(CONTAINER, f"duplicate member names {dupes}")
        raise report.abort()
    present = set(names)

    # 1. Server signature over the exact manifest bytes: signature, then type, then parse.
    for required in (MANIFEST_SIGNATURE, MANIFEST):
        if required not in present:
            report.fail(required, "missing")
    if report.failed:
        raise report.abort()
    envelope = _read_member(zf, MANIFEST_SIGNATURE, MAX_MANIFEST_BYTES * 2, report)
    manifest_bytes = _read_member(zf, MANIFEST, MAX_MANIFEST_BYTES, report)
    if envelope is None or manifest_bytes is None:
        raise report.abort()
    try:
        verified = verify_envelope(envelope, MANIFEST_TYPE, trust.server_keys,
                                   max_size=MAX_MANIFEST_BYTES * 2)
    except (IntegrityError, TrustError) as e:
        report.fail(MANIFEST_SIGNATURE, _signature_reason(e))
        raise report.abort() from e
    report.ok(MANIFEST_SIGNATURE, f"signed by pinned server key {verified.keyid}")
    if verified.payload != manifest_bytes:
        report.fail(MANIFEST, "does not match the server-signed manifest (edited)")
        raise report.abort()
    try:
        manifest = _parse_manifest(verified.payload)
    except FormatError as e:
        report.fail(MANIFEST, e.reason)
        raise report.abort() from e
    if manifest.server_key_id != verified.keyid:
        report.fail(MANIFEST, f"names server key {manifest.server_key_id} but was signed by "
                              f"{verified.keyid}")
        raise report.abort()

    # 2. The agent key must be pinned, not merely named by the (server-signed) manifest.
    agent_key: Ed25519PublicKey | None = None
    try:
        named = public_key_from_bytes(manifest.agent_public_key)
    except FormatError as e:
        report.fail(MANIFEST, f"agent public key: {e.reason}")
        raise report.abort() from e
    if key_id(named) != manifest.agent_key_id:
        report.fail(MANIFEST, "agent key_id does not match the agent public key")
        raise report.abort()
    agent_key = trust.agent_key(manifest.agent_key_id)
    if agent_key is None:
        report.fail(MANIFEST, f"agent key {manifest.agent_key_id} is not pinned in the trust set")
    else:
        report.ok(MANIFEST, f"signed manifest parsed; agent {manifest.agent_id!r} key "
                            f"{manifest.agent_key_id} is pinned")

    # 3. Member inventory: nothing missing, nothing unlisted, sizes as declared.
    listed = {m.name: m for m in manifest.members}
    for name in names:
        if name not in listed and name not in (MANIFEST, MANIFEST_SIGNATURE):
            report.fail(name, "member not listed in the manifest")
    for m in manifest.members:
        if m.name not in present:
            report.fail(m.name, "listed in the manifest but missing")
        elif zf.getinfo(m.name).file_size != m.size:
            report.fail(m.name, f"size mismatch: manifest says {m.size}, member is "
                                f"{zf.getinfo(m.name).file_size}")

    def digest_ok(name: str, actual: str) -> bool:
        if actual != listed[name].sha256:
            report.fail(name, "digest mismatch: sha256 differs from the manifest")
            return False
        return True

    # 4. Checkpoints (agent-signed), keyed by the seq they vouch for.
    cp_by_seq: dict[int, tuple[str, Checkpoint]] = {}
    for m in manifest.members:
        match = _CHECKPOINT_RE.fullmatch(m.name)
        if match is None or m.name not in present:
            continue
        data = _read_member(zf, m.name, MAX_SIGNED_RECORD_BYTES, report)
        if data is None:
            continue
        good = digest_ok(m.name, hashlib.sha256(data).hexdigest())
        if agent_key is None:
            report.fail(m.name, "not checked: agent key is not pinned")
            continue
        try:
            cp = verify_checkpoint(data, agent_key, manifest.agent_id)
        except (IntegrityError, TrustError) as e:
            report.fail(m.name, _signature_reason(e))
            continue
        if cp.seq != int(match.group(1)):
            report.fail(m.name, f"checkpoint is for seq {cp.seq}, not the seq in its name")
        elif not manifest.start_seq < cp.seq <= manifest.end_seq:
            report.fail(m.name, f"seq {cp.seq} is outside the bundle's chain range")
        else:
            cp_by_seq[cp.seq] = (m.name, cp)
            if good:
                report.ok(m.name, f"signed by agent key {manifest.agent_key_id}; seq {cp.seq}")

    # 5. Events: framing, binding, chain, checkpoint heads; in the same pass events.jsonl is
    # hashed and compared with the rendering regenerated from events.bin.
    compare = codec is not None and render and EVENTS_JSONL in present and EVENTS in present
    rendering: _RenderingCheck | None = None
    hashed_aside = EVENTS_JSONL in present and not compare
    jsonl_report = _Report()  # findings of the background hash, reported in step 6's place
    jsonl_file: IO[bytes] | None = None
    jsonl_hash: concurrent.futures.Future[str | None] | None = None
    with contextlib.ExitStack() as stack:
        background = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        if hashed_aside:
            # Nothing else reads events.jsonl: hash it in a thread while the scan runs
            # (inflating and hashing release the GIL). Opened here: ZipFile.open is not
            # thread-safe, reading an opened member is.
            try:
                jsonl_file = zf.open(EVENTS_JSONL)
            except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
                jsonl_report.fail(EVENTS_JSONL, f"cannot read member from the ZIP container: {e}")
            else:
                # Closed after the thread is done (the ExitStack unwinds in reverse order).
                stack.callback(jsonl_file.close)
                stack.callback(background.shutdown)
                jsonl_hash = background.submit(_hash_open_member, jsonl_file, EVENTS_JSONL,
                                               jsonl_report)
        if EVENTS in present:
            rendering = _verify_events(zf, manifest, codec, cp_by_seq, digest_ok, report,
                                       compare, workers)

    # 6. events.jsonl is derived: it must equal what the codec regenerates from events.bin.
    if EVENTS_JSONL in present:
        if hashed_aside:
            actual = jsonl_hash.result() if jsonl_hash is not None else None
            report.checks.extend(jsonl_report.checks)
        else:
            actual = rendering.digest if rendering is not None else None
        if actual is not None and digest_ok(EVENTS_JSONL, actual):
            if codec is None:
                report.ok(EVENTS_JSONL, "digest matches; rendering not regenerated (no codec)")
            elif not render:
                report.ok(EVENTS_JSONL, "digest matches; rendering NOT regenerated "
                                        "(unsafe_skip_rendering)")
            elif rendering is None or not rendering.complete:
                report.fail(EVENTS_JSONL, "not compared: events.bin could not be rendered")
            elif rendering.mismatch_line is not None:
                report.fail(EVENTS_JSONL, "does not match the rendering regenerated from "
                                          f"events.bin (first difference at line "
                                          f"{rendering.mismatch_line})")
            else:
                report.ok(EVENTS_JSONL, "equals the rendering regenerated from events.bin")

    # 7. Collected files and their agent-signed acquisition records.
    records = _verify_files(zf, manifest, agent_key, listed, present, digest_ok, report)

    # 8. Chain of custody.
    if CUSTODY in present:
        _verify_custody(zf, digest_ok, report)

    if report.failed:
        raise report.abort()
    return VerifiedBundle(
        manifest=manifest, report=tuple(report.checks), event_count=manifest.event_count,
        start_seq=manifest.start_seq, end_seq=manifest.end_seq,
        checkpoints=tuple(cp for _, cp in sorted(cp_by_seq.values(), key=lambda t: t[1].seq)),
        files=tuple(records), server_key_id=manifest.server_key_id,
        agent_key_id=manifest.agent_key_id, codec_checked=codec is not None)


def _hash_member(zf: zipfile.ZipFile, name: str, report: _Report) -> str | None:
    try:
        with zf.open(name) as f:
            return _hash_open_member(f, name, report)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        report.fail(name, f"cannot read member from the ZIP container: {e}")
        return None


def _hash_open_member(f: IO[bytes], name: str, report: _Report) -> str | None:
    """Hash an opened member to its end. May run in a thread: reading an opened member is
    thread-safe, but ZipFile.open and closing a member are not, so the caller does those."""
    digest = hashlib.sha256()
    try:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        report.fail(name, f"cannot read member from the ZIP container: {e}")
        return None
    return digest.hexdigest()


class _EventScan:
    """State of one streaming pass over events.bin (chain, binding, rendering).

    The per-event loops keep everything in locals and write state back once per chunk:
    attribute access per event would cost more than the hashing it surrounds.
    """

    def __init__(self, manifest: BundleManifest, codec: EventCodec | None,
                 cp_heads: dict[int, bytes], rendering: _RenderingCheck | None,
                 renderer: _ParallelRendering | None = None) -> None:
        self.agent_id = manifest.agent_id
        self.codec = codec
        # Lines are rendered here (rendering) or by worker processes (renderer), not both.
        self.rendering = rendering if renderer is None else None
        self.renderer = renderer
        self.cp_heads = cp_heads
        # Checkpoint seqs in order: the loops compare each seq with the next one (an int
        # compare) instead of a dict lookup per event.
        self._cp_seqs = sorted(cp_heads) + [_NO_SEQ]
        self._cp_index = 0
        self.matched: list[int] = []
        self.prev = manifest.start_seq
        self.head = manifest.start_head
        self.count = 0
        self.first_seq = 0
        self.first_ns = 0
        self.last_ns = 0
        self.broken: str | None = None
        self.broken_at = _NO_SEQ  # seq of the event the scan stopped at

    def scan(self, buf: bytes) -> int:
        """Verify every complete frame in `buf`; return the offset of the first incomplete one."""
        if self.codec is None:
            return self._scan_plain(buf)
        return self._scan_codec(buf, self.codec)

    def _next_checkpoint(self, seq: int) -> int:
        """Advance past checkpoint seqs below `seq` (reported later as not being events)."""
        seqs = self._cp_seqs
        i = self._cp_index
        while seqs[i] < seq:
            i += 1
        self._cp_index = i
        return seqs[i]

    def _scan_plain(self, buf: bytes) -> int:
        unpack = FRAME.unpack_from
        header = FRAME.size
        sha = hashlib.sha256
        next_cp = self._cp_seqs[self._cp_index]
        prev, head, count = self.prev, self.head, self.count
        pos, end = 0, len(buf)
        while pos + header <= end:
            seq, length = unpack(buf, pos)
            stop = pos + header + length
            if length > MAX_EVENT_BYTES:
                self.broken = f"framing: event at seq {seq} claims {length} bytes"
                break
            if stop > end:
                break
            if seq != prev + 1:
                # Without a codec nobody can say whether the event is a gap event: fail closed.
                self.broken = f"chain break at seq {seq}: {explain_jump(prev, seq, None)}"
                break
            head = sha(head + buf[pos + header:stop]).digest()
            prev = seq
            pos = stop
            count += 1
            if seq >= next_cp:
                next_cp = self._next_checkpoint(seq)
                if seq == next_cp:
                    if self._checkpoint(seq, self.cp_heads[seq], head):
                        break
                    next_cp = self._next_checkpoint(seq + 1)
        if count and not self.count:
            self.first_seq = self.prev + 1
        self.prev, self.head, self.count = prev, head, count
        return pos

    def _scan_codec(self, buf: bytes, codec: EventCodec) -> int:
        unpack = FRAME.unpack_from
        header = FRAME.size
        sha = hashlib.sha256
        describe, render, encode = codec.describe, codec.render, _ENCODE_LINE
        fast = _canonical_renderer(codec)
        rendering = self.rendering
        agent_id = self.agent_id
        next_cp = self._cp_seqs[self._cp_index]
        prev, head, count = self.prev, self.head, self.count
        first_ns, last_ns = self.first_ns, self.last_ns
        lines: list[str] = []
        append = lines.append
        pos, end = 0, len(buf)
        seq = rendered_to = 0
        while pos + header <= end:
            seq, length = unpack(buf, pos)
            stop = pos + header + length
            if length > MAX_EVENT_BYTES:
                self.broken = f"framing: event at seq {seq} claims {length} bytes"
                break
            if stop > end:
                break
            event_bytes = buf[pos + header:stop]
            rendered_to = stop  # rendered before the checks below, as in the serial order
            try:
                info_seq, info_agent, t, gap = describe(event_bytes)
                if rendering is not None:
                    text = fast(event_bytes) if fast is not None else None
                    if text is None:
                        rendered = render(event_bytes)
                        # The canonical encoder takes dicts only; other Mappings are copied.
                        text = encode(rendered if type(rendered) is dict else dict(rendered))
                    append(text)
            except Exception as e:  # noqa: BLE001 - any codec failure is a finding
                self.broken = f"event at seq {seq} cannot be decoded: {e}"
                rendered_to = pos
                break
            if info_seq != seq:
                self.broken = f"framing says seq {seq} but the event says seq {info_seq}"
                break
            if info_agent != agent_id:
                self.broken = f"event at seq {seq} is from agent {info_agent!r}, not {agent_id!r}"
                break
            if gap is not None or seq != prev + 1:
                reason = explain_jump(prev, seq, gap)
                if reason is not None:
                    self.broken = f"chain break at seq {seq}: {reason}"
                    break
            if count == 0:
                self.first_seq = seq
                first_ns = last_ns = t
            elif t < first_ns:
                first_ns = t
            elif t > last_ns:
                last_ns = t
            head = sha(head + event_bytes).digest()
            prev = seq
            pos = stop
            count += 1
            if seq >= next_cp:
                next_cp = self._next_checkpoint(seq)
                if seq == next_cp:
                    if self._checkpoint(seq, self.cp_heads[seq], head):
                        break
                    next_cp = self._next_checkpoint(seq + 1)
        if self.broken is not None:
            self.broken_at = seq
        if lines and rendering is not None:
            # Lines of events the scan rejected never reach the comparison: it stops there.
            if self.broken is not None:
                del lines[count - self.count:]
            if lines:
                lines.append("")
                rendering.feed("\n".join(lines).encode("ascii"))
        if self.renderer is not None and rendered_to:
            # The workers render what the serial loop would have rendered, including an event
            # rejected by a check after describe: its rendering failure would be reported first.
            self.renderer.submit(buf[:max(rendered_to, pos)])
        self.prev, self.head, self.count = prev, head, count
        self.first_ns, self.last_ns = first_ns, last_ns
        return pos

    def _checkpoint(self, seq: int, expected: bytes, head: bytes) -> bool:
        """Record a checkpoint match; return True (stop) when its head differs."""
        self.matched.append(seq)
        if expected == head:
            return False
        self.broken = f"chain break at or before seq {seq}"
        return True


def _verify_events(zf: zipfile.ZipFile, manifest: BundleManifest, codec: EventCodec | None,
                   cp_by_seq: dict[int, tuple[str, Checkpoint]],
                   digest_ok: Callable[[str, str], bool], report: _Report,
                   compare: bool, workers: int) -> _RenderingCheck | None:
    """One streaming pass over events.bin, and over events.jsonl when `compare` is set.

    Returns the events.jsonl comparison (digest, first differing line), or None when it was
    not compared.
    """
    if not compare:
        _scan_events(zf, manifest, codec, cp_by_seq, digest_ok, report, None)
        return None
    try:
        jsonl = zf.open(EVENTS_JSONL)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        report.fail(EVENTS_JSONL, f"cannot read member from the ZIP container: {e}")
        _scan_events(zf, manifest, codec, cp_by_seq, digest_ok, report, None)
        return _RenderingCheck.unreadable()
    with jsonl:
        rendering = _RenderingCheck(jsonl)
        if workers > 1 and codec is not None:
            with _ParallelRendering(codec, rendering, workers) as renderer:
                ok = _scan_events(zf, manifest, codec, cp_by_seq, digest_ok, report, rendering,
                                  renderer)
        else:
            ok = _scan_events(zf, manifest, codec, cp_by_seq, digest_ok, report, rendering)
        if not ok:
            rendering.complete = False
        if not rendering.finish(report):
            return _RenderingCheck.unreadable()
    return rendering


def _scan_events(zf: zipfile.ZipFile, manifest: BundleManifest, codec: EventCodec | None,
                 cp_by_seq: dict[int, tuple[str, Checkpoint]],
                 digest_ok: Callable[[str, str], bool], report: _Report,
                 rendering: _RenderingCheck | None,
                 renderer: _ParallelRendering | None = None) -> bool:
    """Verify events.bin; return True when every event was checked (and rendered)."""
    scan = _EventScan(manifest, codec, {seq: cp.head for seq, (_, cp) in cp_by_seq.items()},
                      rendering, renderer)
    file_digest = hashlib.sha256()
    rest = b""
    try:
        # The member digest is computed by a thread, in order, while this one scans the
        # frames: hashing a large buffer releases the GIL.
        with zf.open(EVENTS) as f, concurrent.futures.ThreadPoolExecutor(1) as hasher:
            while chunk := f.read(_CHUNK):
                hasher.submit(file_digest.update, chunk)
                if scan.broken is None and (renderer is None or renderer.failure is None):
                    buf = rest + chunk if rest else chunk
                    rest = buf[scan.scan(buf):]
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        report.fail(EVENTS, f"cannot read member from the ZIP container: {e}")
        return False
    if renderer is not None:
        renderer.finish()
        # The serial loop stops at the first event it cannot render; the workers learn of it
        # later, so the earliest of the two failures is the one the serial loop would report.
        if renderer.failure is not None and renderer.failure[0] <= scan.broken_at:
            failed_seq, message = renderer.failure
            scan.broken = f"event at seq {failed_seq} cannot be decoded: {message}"
    if scan.broken is None and rest:
        scan.broken = f"framing: truncated frame after seq {scan.prev}"
    good = digest_ok(EVENTS, file_digest.hexdigest())
    if scan.broken is not None:
        if scan.broken.startswith("chain break at or before seq "):
            seq = scan.matched[-1]
            report.fail(cp_by_seq[seq][0], f"head mismatch at seq {seq}: the chain recomputed "
                        "from events.bin differs (events at or before it were altered, "
                        "removed or reordered)")
        report.fail(EVENTS, scan.broken)
        return False
    count, prev, first_seq = scan.count, scan.prev, scan.first_seq
    problems: list[str] = []
    if count != manifest.event_count:
        problems.append(f"holds {count} events, the manifest says {manifest.event_count}")
    if count and first_seq != manifest.first_seq:
        problems.append(f"first seq is {first_seq}, the manifest says {manifest.first_seq}")
    if prev != manifest.end_seq:
        problems.append(f"last seq is {prev}, the manifest says {manifest.end_seq}")
    if codec is not None and count and (scan.first_ns, scan.last_ns) != (
            manifest.first_time_ns, manifest.last_time_ns):
        problems.append("time range differs from the manifest")
    for problem in problems:
        report.fail(EVENTS, problem)
    covered = prev in scan.cp_heads
    if not covered:
        report.fail(EVENTS, f"last event (seq {prev}) is not covered by a checkpoint")
    matched = set(scan.matched)
    for seq, (name, _) in sorted(cp_by_seq.items()):
        if seq not in matched:
            report.fail(name, f"seq {seq} is not an event in events.bin")
    if good and not problems and covered:
        skipped = "" if codec else "; seq/agent binding and gaps not checked (no codec)"
        report.ok(EVENTS, f"{count} events, chain verified seq {first_seq}..{prev} from "
                          f"start head, {len(matched)} checkpoints matched{skipped}")
    return True


class _RenderWorkersFailed(Exception):
    """The worker processes could not run (start-up, pickling, a crashed worker)."""


def _render_frames(codec: EventCodec, frames: bytes) -> tuple[bytes, int | None, str]:
    """Worker side: the events.jsonl lines of complete, already framed events.

    Returns (lines, None, "") or, at the first event the codec cannot render, the lines before
    it, its seq and the error text (a finding, not a worker failure).
    """
    fast = _canonical_renderer(codec)
    render, encode, unpack, header = codec.render, _ENCODE_LINE, FRAME.unpack_from, FRAME.size
    lines: list[str] = []
    failed: int | None = None
    message = ""
    pos, end = 0, len(frames)
    while pos < end:
        seq, length = unpack(frames, pos)
        start, pos = pos + header, pos + header + length
        event_bytes = frames[start:pos]
        try:
            text = fast(event_bytes) if fast is not None else None
            if text is None:
                rendered = render(event_bytes)
                text = encode(rendered if type(rendered) is dict else dict(rendered))
        except Exception as e:  # noqa: BLE001 - reported as a finding by the verifying process
            failed, message = seq, str(e)
            break
        lines.append(text)
    if lines:
        lines.append("")
    return "\n".join(lines).encode("ascii"), failed, message


class _ParallelRendering:
    """Renders chunks of events.bin in worker processes and feeds the lines, in order, to the
    events.jsonl comparison. At most two chunks per worker are in flight."""

    def __init__(self, codec: EventCodec, rendering: _RenderingCheck, workers: int) -> None:
        self._codec = codec
        self._rendering = rendering
        self._max_pending = 2 * workers
        self._pending: collections.deque[concurrent.futures.Future[
            tuple[bytes, int | None, str]]] = collections.deque()
        self.failure: tuple[int, str] | None = None  # (seq, error) of the first unrenderable
        try:
            # forkserver: workers never inherit the caller's threads or locks.
            context = multiprocessing.get_context("forkserver")
            self._executor = concurrent.futures.ProcessPoolExecutor(workers,
                                                                    mp_context=context)
        except (OSError, ValueError, ImportError, NotImplementedError) as e:
            raise _RenderWorkersFailed(f"cannot start workers: {e}") from e

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._pending:
            future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, frames: bytes) -> None:
        """Queue complete frames for rendering; collect finished chunks in order."""
        if self.failure is not None:
            return
        try:
            self._pending.append(self._executor.submit(_render_frames, self._codec, frames))
        except RuntimeError as e:  # BrokenProcessPool or shut down
            raise _RenderWorkersFailed(str(e)) from e
        while self._pending and (len(self._pending) > self._max_pending
                                 or self._pending[0].done()):
            self._collect()

    def finish(self) -> None:
        """Wait for every queued chunk."""
        while self._pending:
            self._collect()

    def _collect(self) -> None:
        future = self._pending.popleft()
        try:
            text, failed, message = future.result()
        except Exception as e:
            raise _RenderWorkersFailed(f"{type(e).__name__}: {e}") from e
        if self.failure is not None:
            return
        if text:
            self._rendering.feed(text)
        if failed is not None:
            self.failure = (failed, message)


class _RenderingCheck:
    """Streams events.jsonl next to the events.bin scan: hashes it for the manifest digest and
    compares it with the regenerated lines as they come, so the regenerated text is neither
    hashed nor read twice, and the first differing line is known without a second pass."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self._lines = 0
        self.mismatch_line: int | None = None
        self.complete = True  # False when events.bin could not be rendered to its end
        self.digest: str | None = None  # of events.jsonl, set by finish()

    @classmethod
    def unreadable(cls) -> _RenderingCheck:
        """A comparison that could not read events.jsonl (already reported)."""
        check = cls(None)
        check.complete = False
        return check

    def feed(self, rendered: bytes) -> None:
        """Compare the next complete lines of the regenerated rendering."""
        assert self._stream is not None
        actual = self._stream.read(len(rendered))
        self._digest.update(actual)
        if self.mismatch_line is None and actual != rendered:
            same = 0
            for same, (a, b) in enumerate(zip(actual, rendered, strict=False)):
                if a != b:
                    break
            else:
                same = min(len(actual), len(rendered))
            self.mismatch_line = self._lines + rendered.count(b"\n", 0, same) + 1
        self._lines += rendered.count(b"\n")

    def finish(self, report: _Report) -> bool:
        """Hash the rest of events.jsonl (lines beyond the rendering are a difference)."""
        assert self._stream is not None
        extra = False
        try:
            while chunk := self._stream.read(_CHUNK):
                self._digest.update(chunk)
                extra = True
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
            report.fail(EVENTS_JSONL, f"cannot read member from the ZIP container: {e}")
            return False
        if extra and self.mismatch_line is None:
            self.mismatch_line = self._lines + 1
        self.digest = self._digest.hexdigest()
        return True


def iter_frames(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield (seq, event_bytes) from an events.bin stream; FormatError on bad framing.

    Reads incrementally; frames are not verified here (use verify_bundle first).
    """
    header = FRAME.size
    while True:
        head = stream.read(header)
        if not head:
            return
        if len(head) != header:
            raise FormatError("truncated frame header", EVENTS)
        seq, length = FRAME.unpack(head)
        if length > MAX_EVENT_BYTES:
            raise FormatError(f"event at seq {seq} claims {length} bytes", EVENTS)
        body = stream.read(length)
        if len(body) != length:
            raise FormatError(f"truncated event at seq {seq}", EVENTS)
        yield seq, body


def _verify_files(zf: zipfile.ZipFile, manifest: BundleManifest,
                  agent_key: Ed25519PublicKey | None, listed: Mapping[str, ManifestMember],
                  present: set[str], digest_ok: Callable[[str, str], bool],
                  report: _Report) -> list[AcquisitionRecord]:
    records: list[AcquisitionRecord] = []
    for m in manifest.members:
        acq = _ACQ_RE.fullmatch(m.name)
        if acq is not None and f"files/{acq.group(1)}" not in listed:
            report.fail(m.name, "acquisition record without the file it describes")
        match = _FILE_RE.fullmatch(m.name)
        if match is None or m.name not in present:
            continue
        sha = match.group(1)
        actual = _hash_member(zf, m.name, report)
        if actual is None:
            continue
        good = digest_ok(m.name, actual)
        if actual != sha:
            report.fail(m.name, f"content sha256 {actual} does not match its name")
            good = False
        record_name = f"{m.name}.acquisition.dsse.json"
        if record_name not in listed or record_name not in present:
            report.fail(m.name, "no agent-signed acquisition record")
            continue
        data = _read_member(zf, record_name, MAX_SIGNED_RECORD_BYTES, report)
        if data is None:
            continue
        good = digest_ok(record_name, hashlib.sha256(data).hexdigest()) and good
        if agent_key is None:
            report.fail(record_name, "not checked: agent key is not pinned")
            continue
        try:
            rec = verify_acquisition(data, agent_key, manifest.agent_id)
        except (IntegrityError, TrustError) as e:
            report.fail(record_name, _signature_reason(e))
            continue
        size = zf.getinfo(m.name).file_size
        if rec.sha256 != sha or rec.size != size:
            report.fail(record_name, f"record names sha256 {rec.sha256} size {rec.size}, the "
                                     f"file is {sha} size {size}")
            continue
        records.append(rec)
        if good:
            report.ok(m.name, f"content matches its name and the acquisition record signed by "
                              f"agent key {manifest.agent_key_id} ({rec.path_display!r})")
    return records


def _verify_custody(zf: zipfile.ZipFile, digest_ok: Callable[[str, str], bool],
                    report: _Report) -> None:
    data = _read_member(zf, CUSTODY, MAX_SMALL_MEMBER_BYTES, report)
    if data is None:
        return
    good = digest_ok(CUSTODY, hashlib.sha256(data).hexdigest())
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        report.fail(CUSTODY, "empty: no record of who requested the bundle")
        return
    for number, line in enumerate(lines, start=1):
        try:
            entry = _canonical.loads_object(line, f"line {number}")
        except FormatError as e:
            report.fail(CUSTODY, e.reason)
            return
        missing = _CUSTODY_REQUIRED - entry.keys()
        if missing:
            report.fail(CUSTODY, f"line {number}: missing {sorted(missing)}")
            return
    if good:
        report.ok(CUSTODY, f"{len(lines)} custody entries parse")


# --------------------------------------------------------------------------------------------
# Report rendering (for the CLI)
# --------------------------------------------------------------------------------------------

def report_to_dicts(report: Iterable[MemberCheck]) -> list[dict[str, Any]]:
    """JSON-able form of a report: [{"member", "ok", "reason"}, ...]."""
    return [{"member": c.member, "ok": c.ok, "reason": c.reason} for c in report]


def format_report(report: Iterable[MemberCheck]) -> str:
    """Human-readable report: one line per check, failures marked FAIL."""
    lines = [f"{'ok  ' if c.ok else 'FAIL'}  {c.member}: {c.reason}" for c in report]
    return "\n".join(lines)
