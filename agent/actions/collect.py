"""File acquisition: read a file once, hash it while streaming it in chunks, sign the record.

Each path is checked and reported on its own (missing, permission denied, directory, special
file, over the size cap) and the others still proceed. It streams through a `send_chunk`
callable and records through `record`; it knows nothing of gRPC or the spool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evidence.acquisition import AcquisitionRecord, sign_acquisition
from proto import ringfence_pb2 as pb
from proto.limits import FILE_CHUNK_BYTES

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 512 << 20


@dataclass(frozen=True)
class PathOutcome:
    path: str
    ok: bool
    sha256: str = ""
    size: int = 0
    error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "ok": self.ok, "sha256": self.sha256, "size": self.size,
                "error": self.error}


def _refuse(path: bytes, st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "is a directory; name the files inside it"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (device, socket, FIFO or other special file)"
    return ""


def collect_file(agent_id: str, command_id: str, path: bytes, key: Ed25519PrivateKey,
                 send_chunk: Callable[[pb.FileChunk], bool],
                 record: Callable[[pb.Event], object],
                 max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> PathOutcome:
    """Acquire one file; always records a FileAcquisition event (with the error on failure)."""
    shown = path.decode("utf-8", "backslashreplace")

    def fail(error: str) -> PathOutcome:
        record(pb.Event(severity_id=1, acquisition=pb.FileAcquisition(
            command_id=command_id, path=path, error=error)))
        return PathOutcome(shown, False, error=error)

    try:
        # O_NOFOLLOW on the last component: a symlink is reported, not silently followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return fail("no such file")
    except PermissionError:
        return fail("permission denied")
    except OSError as e:
        if e.errno == 40:  # ELOOP: the path is a symlink
            return fail("is a symbolic link; collect its target path instead")
        return fail(f"cannot open: {e.strerror}")
    try:
        st = os.fstat(fd)
        refusal = _refuse(path, st)
        if refusal:
            return fail(refusal)
        if st.st_size > max_bytes:
            return fail(f"is {st.st_size} bytes, over the {max_bytes}-byte collection cap")
        digest = hashlib.sha256()
        offset = 0
        while True:
            data = os.read(fd, FILE_CHUNK_BYTES)
            if offset + len(data) > max_bytes:
                return fail(f"grew past the {max_bytes}-byte collection cap while reading")
            digest.update(data)
            last = len(data) < FILE_CHUNK_BYTES
            if not send_chunk(pb.FileChunk(command_id=command_id, path=path, offset=offset,
                                           data=data, last=last)):
                return fail("the collector session was lost during the transfer")
            offset += len(data)
            if last:
                break
    except OSError as e:
        return fail(f"read failed: {e.strerror}")
    finally:
        os.close(fd)
    acquisition = AcquisitionRecord(
        agent_id=agent_id, command_id=command_id, path=path, sha256=digest.hexdigest(),
        size=offset, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
        acquired_ns=time.time_ns())
    record(pb.Event(severity_id=1, acquisition=pb.FileAcquisition(
        command_id=command_id, path=path, record_dsse=sign_acquisition(acquisition, key),
        sha256=acquisition.sha256, size=offset)))
    logger.info("acquired %s (%d bytes) for command %s", shown, offset, command_id)
    return PathOutcome(shown, True, acquisition.sha256, offset)
