"""File quarantine: move a suspicious file into a protected vault on the host, and restore it.

The vault is a directory in the agent's state dir (0700). Each quarantined file is stored as
`<id>.bin` (0400, never executable) next to `<id>.json`, the metadata needed to restore it
exactly: original path, SHA-256, size, owner, mode, timestamps and extended attributes. The
file is opened without following symlinks, made non-executable in place before it is copied
(so it cannot be started again during the move), and its path is unlinked only if it still
names the same inode. Restore writes beside the original path, checks the hash, restores
owner, mode, xattrs and times, and links it into place without clobbering anything there.
It knows nothing of commands or the chain; agent.actions.response records what it did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.actions.errors import ActionFailed, ActionRefused

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
ID_BYTES = 12
MAX_XATTRS = 64
MAX_XATTR_BYTES = 64 * 1024


@dataclass(frozen=True)
class QuarantineRecord:
    quarantine_id: str
    path: str                    # original path (surrogateescape text of the raw bytes)
    sha256: str
    size: int
    uid: int
    gid: int
    mode: int                    # st_mode permission bits incl. setuid/setgid/sticky
    atime_ns: int
    mtime_ns: int
    xattrs: dict[str, str]       # name -> value (hex)
    quarantined_ns: int
    command_id: str

    def summary(self) -> dict[str, object]:
        """What goes into the chain and to the server: everything but xattr values."""
        data = asdict(self)
        data["xattrs"] = sorted(self.xattrs)
        data["mode"] = oct(self.mode)
        return data


def _fs_path(text: str) -> bytes:
    return os.fsencode(text)


def _read_xattrs(fd: int) -> dict[str, str]:
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    values: dict[str, str] = {}
    for name in sorted(names)[:MAX_XATTRS]:
        try:
            value = os.getxattr(fd, name)
        except OSError:
            continue
        if len(value) <= MAX_XATTR_BYTES:
            values[name] = value.hex()
    return values


class Vault:
    """The quarantine directory of one agent."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def _paths(self, quarantine_id: str) -> tuple[Path, Path]:
        if len(quarantine_id) != 2 * ID_BYTES or any(c not in "0123456789abcdef"
                                                      for c in quarantine_id):
            raise ActionRefused(f"{quarantine_id!r} is not a quarantine id")
        return self.root / f"{quarantine_id}.bin", self.root / f"{quarantine_id}.json"

    def record(self, quarantine_id: str) -> QuarantineRecord:
        _, meta = self._paths(quarantine_id)
        try:
            raw = json.loads(meta.read_text())
        except FileNotFoundError as e:
            raise ActionRefused(f"no quarantined file with id {quarantine_id} on this host") from e
        return QuarantineRecord(**raw)

    def quarantine(self, path: str, command_id: str, max_bytes: int) -> QuarantineRecord:
        """Move the regular file at `path` into the vault; raise ActionRefused (nothing
        changed) or ActionFailed."""
        if not path.startswith("/"):
            raise ActionRefused("the path must be absolute")
        raw = _fs_path(path)
        try:
            fd = os.open(raw, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise ActionRefused(f"{path}: no such file") from e
        except OSError as e:
            if e.errno == 40:
                raise ActionRefused(f"{path} is a symbolic link; quarantine its target") from e
            raise ActionRefused(f"{path}: cannot open: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ActionRefused(f"{path} is not a regular file")
            if st.st_size > max_bytes:
                raise ActionRefused(f"{path} is {st.st_size} bytes, over the {max_bytes}-byte "
                                    "quarantine cap")
            xattrs = _read_xattrs(fd)
            self._ensure()
            quarantine_id = secrets.token_hex(ID_BYTES)
            blob, meta = self._paths(quarantine_id)
            # Nobody may execute it from now on, also while it is being copied.
            os.fchmod(fd, 0)
            try:
                digest, size = self._copy_in(fd, blob)
                record = QuarantineRecord(
                    quarantine_id, path, digest, size, st.st_uid, st.st_gid,
                    stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns, xattrs,
                    time.time_ns(), command_id)
                tmp = meta.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(asdict(record), sort_keys=True))
                os.chmod(tmp, 0o400)
                os.replace(tmp, meta)
                now = os.lstat(raw)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    raise ActionFailed(f"{path} was replaced during quarantine; the copy in "
                                       f"the vault ({quarantine_id}) is kept, the new file "
                                       "at the path was left alone",
                                       {"quarantine_id": quarantine_id})
                os.unlink(raw)
            except BaseException:
                if os.path.exists(raw):
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
                raise
        finally:
            os.close(fd)
        logger.warning("quarantined %s as %s (sha256 %s)", path, quarantine_id, record.sha256)
        return record

    def _copy_in(self, fd: int, blob: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        out = os.open(blob, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while data := os.read(fd, CHUNK):
                digest.update(data)
                os.write(out, data)
                size += len(data)
            os.fsync(out)
            os.fchmod(out, 0o400)
        except OSError as e:
            os.close(out)
            blob.unlink(missing_ok=True)
            raise ActionFailed(f"copying into the vault failed: {e.strerror}") from e
        os.close(out)
        return digest.hexdigest(), size

    def restore(self, quarantine_id: str) -> QuarantineRecord:
        """Put a quarantined file back exactly (content, owner, mode, xattrs, times)."""
        blob, meta = self._paths(quarantine_id)
        record = self.record(quarantine_id)
        raw = _fs_path(record.path)
        if os.path.lexists(raw):
            raise ActionRefused(f"something now exists at {record.path}; move it away first, "
                                "restoring never overwrites")
        parent = os.path.dirname(raw) or b"/"
        if not os.path.isdir(parent):
            raise ActionRefused(f"the directory of {record.path} no longer exists")
        tmp = os.path.join(parent, b".ringfence-restore-" + secrets.token_hex(8).encode())
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                      0o000)
        linked = False
        try:
            digest = hashlib.sha256()
            with blob.open("rb") as src:
                while data := src.read(CHUNK):
                    digest.update(data)
                    os.write(out, data)
            if digest.hexdigest() != record.sha256:
                raise ActionFailed(f"the vault copy of {quarantine_id} has SHA-256 "
                                   f"{digest.hexdigest()}, not {record.sha256}: not restored")
            os.fsync(out)
            # chown clears setuid/setgid bits, so the mode comes after the owner.
            os.fchown(out, record.uid, record.gid)
            os.fchmod(out, record.mode)
            for name, value in record.xattrs.items():
                os.setxattr(out, name, bytes.fromhex(value))
            os.utime(out, ns=(record.atime_ns, record.mtime_ns))
            os.link(tmp, raw)          # fails rather than clobbers when the path reappeared
            linked = True
        except FileExistsError as e:
            raise ActionRefused(f"something appeared at {record.path}; not restored") from e
        except OSError as e:
            raise ActionFailed(f"restoring {record.path} failed: {e.strerror}") from e
        finally:
            os.close(out)
            os.unlink(tmp)
        if linked:
            blob.unlink()
            meta.unlink()
        logger.warning("restored %s from quarantine %s", record.path, quarantine_id)
        return record
