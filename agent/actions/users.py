"""Locking a local account during an incident, and unlocking it to exactly its previous state.

Lock = password locked (`usermod -L`, a `!` before the hash) and account expired
(`chage -E 0`), optionally with every process of the user killed. The previous state (was the
password already locked, the old expiry field, a SHA-256 of the password field so an exact
restore can be proven without keeping the hash) is kept under the state dir; unlock undoes
only what lock did and checks /etc/shadow ends up as it was. The tools' exit codes are not
trusted (usermod exits 0 when it refuses to unlock); /etc/shadow is read back every time.
Root and the agent's own account are never locked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.actions.errors import ActionFailed, ActionRefused

logger = logging.getLogger(__name__)

SHADOW = Path("/etc/shadow")
TOOL_TIMEOUT_S = 15.0
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")


@dataclass(frozen=True)
class ShadowEntry:
    user: str
    password: str
    expire: str                  # days since epoch, "" = never


@dataclass(frozen=True)
class LockState:
    user: str
    uid: int
    password_was_locked: bool
    previous_expire: str
    password_sha256: str         # of the password field before locking (never the field)
    locked_ns: int
    command_id: str


def parse_shadow(text: str, user: str) -> ShadowEntry:
    """The /etc/shadow entry of `user`; ActionRefused when there is none. Pure."""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 8 and fields[0] == user:
            return ShadowEntry(user, fields[1], fields[7])
    raise ActionRefused(f"user {user} has no entry in /etc/shadow")


def _digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def _run(*argv: str) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ActionFailed(f"{argv[0]} could not run: {e}") from e
    if result.returncode != 0:
        raise ActionFailed(f"{' '.join(argv[:2])} exited {result.returncode}: "
                           f"{result.stderr.strip()[:300]}")


class Accounts:
    """Locks and unlocks local accounts; remembers what it did under `state_dir`."""

    def __init__(self, state_dir: Path, shadow: Path = SHADOW) -> None:
        self._dir = state_dir
        self._shadow = shadow

    def _entry(self, user: str) -> ShadowEntry:
        try:
            return parse_shadow(self._shadow.read_text(), user)
        except OSError as e:
            raise ActionFailed(f"cannot read {self._shadow}: {e.strerror}") from e

    def _state_path(self, user: str) -> Path:
        return self._dir / f"{user}.json"

    def _check_name(self, user: str) -> pwd.struct_passwd:
        if not USER_RE.match(user):
            raise ActionRefused(f"{user!r} is not a valid user name")
        try:
            entry = pwd.getpwnam(user)
        except KeyError as e:
            raise ActionRefused(f"no local user {user} on this host") from e
        if entry.pw_uid == 0:
            raise ActionRefused(f"refusing to lock {user}: uid 0 would lock out the host's "
                                "administrators; isolate the host instead")
        if entry.pw_uid == os.geteuid():
            raise ActionRefused(f"refusing to lock {user}: the ringfence agent runs as it")
        return entry

    def lock(self, user: str, command_id: str, kill_sessions: bool) -> dict[str, object]:
        account = self._check_name(user)
        if self._state_path(user).exists():
            raise ActionRefused(f"{user} is already locked by ringfence; unlock it first")
        before = self._entry(user)
        state = LockState(user, account.pw_uid, before.password.startswith("!"), before.expire,
                          _digest(before.password), time.time_ns(), command_id)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written first: if locking fails half-way, unlock still knows the state to go back to.
        self._state_path(user).write_text(json.dumps(asdict(state), sort_keys=True))
        if not state.password_was_locked:
            _run("usermod", "-L", user)
        _run("chage", "-E", "0", user)
        after = self._entry(user)
        if not after.password.startswith("!") or after.expire != "0":
            raise ActionFailed(f"{user} is not locked after usermod/chage (password locked: "
                               f"{after.password.startswith('!')}, expiry {after.expire!r})")
        killed = self._kill_processes(account.pw_uid) if kill_sessions else []
        logger.warning("locked user %s%s", user,
                       f", killed {len(killed)} processes" if kill_sessions else "")
        return {"user": user, "uid": account.pw_uid,
                "password_was_locked": state.password_was_locked,
                "previous_expire": state.previous_expire, "killed_pids": killed,
                "kill_sessions": kill_sessions}

    def unlock(self, user: str) -> dict[str, object]:
        self._check_name(user)
        path = self._state_path(user)
        try:
            state = LockState(**json.loads(path.read_text()))
        except FileNotFoundError as e:
            raise ActionRefused(f"{user} was not locked by ringfence on this host") from e
        if not state.password_was_locked:
            _run("usermod", "-U", user)
        _run("chage", "-E", state.previous_expire or "-1", user)
        after = self._entry(user)
        if _digest(after.password) != state.password_sha256 or \
                after.expire != state.previous_expire:
            raise ActionFailed(f"{user} could not be restored exactly: /etc/shadow differs from "
                               "before the lock; check the account by hand")
        path.unlink()
        logger.warning("unlocked user %s", user)
        return {"user": user, "password_locked": state.password_was_locked,
                "expire": state.previous_expire, "restored_exactly": True}

    @staticmethod
    def _kill_processes(uid: int) -> list[int]:
        killed: list[int] = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                fd = os.pidfd_open(int(name))
            except OSError:
                continue
            try:
                status = Path(f"/proc/{name}/status").read_text()
                uids = next((ln.split()[1:] for ln in status.splitlines()
                             if ln.startswith("Uid:")), [])
                if str(uid) in uids:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed.append(int(name))
            except (OSError, ProcessLookupError):
                pass
            finally:
                os.close(fd)
        return sorted(killed)
