"""Console logins and sessions: one-time login tokens, server-side sessions, CSRF tokens.

Pure and in-memory (no IO, no HTTP): `server.console.web` calls it. A login token is minted
through the admin API for a caller authenticated by its responder certificate, stored only as
its SHA-256, expires after `login_ttl_s` and works exactly once. Redeeming it creates a
session whose id (the cookie value) is also stored only hashed, with an absolute expiry and a
per-session CSRF token. Sessions name the responder certificate fingerprint, not a role: the
console looks the responder up on every request, so a revoked identity or a changed role takes
effect at once. Sessions end with the server process; that is deliberate (nothing to steal
from disk).

Exceptions:

    ConsoleAuthError        root
    +-- LoginRefused        the login token is unknown, used or expired
    +-- SessionInvalid      no session, an unknown or expired one, or a bad CSRF token
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LOGIN_TTL_S = 120.0             # a login URL is good for two minutes
SESSION_TTL_S = 8 * 3600.0      # a console session lasts a working day at most
MAX_PENDING_LOGINS = 1000
MAX_SESSIONS = 1000
TOKEN_PREFIX = "rfc_"


class ConsoleAuthError(Exception):
    """Root of console authentication errors; messages are safe to show the browser."""


class LoginRefused(ConsoleAuthError):
    def __init__(self) -> None:
        # Opaque on purpose: unknown, used and expired look alike to whoever holds the URL.
        super().__init__("this login link is invalid, already used or expired: run "
                         "`ringfence console login` for a new one")


class SessionInvalid(ConsoleAuthError):
    pass


@dataclass(frozen=True)
class LoginGrant:
    token: str                  # shown once to the caller, never stored
    expires_at: float           # epoch seconds


@dataclass(frozen=True)
class ConsoleSession:
    session_id: str             # cookie value; only its hash is kept
    fingerprint: str            # responder certificate fingerprint the session acts as
    name: str                   # responder name at login (for display and logs)
    csrf: str                   # per-session token every state-changing request must carry
    expires_at: float


@dataclass(frozen=True)
class _Pending:
    fingerprint: str
    name: str
    expires_at: float


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class ConsoleAuth:
    """One-time login tokens and sessions, thread-safe, bounded in count."""

    def __init__(self, login_ttl_s: float = LOGIN_TTL_S, session_ttl_s: float = SESSION_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._login_ttl_s = login_ttl_s
        self._session_ttl_s = session_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Pending] = {}
        self._sessions: dict[bytes, ConsoleSession] = {}

    def _expire(self, now: float) -> None:
        self._pending = {k: v for k, v in self._pending.items() if v.expires_at > now}
        self._sessions = {k: v for k, v in self._sessions.items() if v.expires_at > now}

    def mint(self, fingerprint: str, name: str) -> LoginGrant:
        """A new one-time login token for the responder with this certificate fingerprint."""
        now = self._clock()
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._expire(now)
            if len(self._pending) >= MAX_PENDING_LOGINS:
                raise ConsoleAuthError("too many unused console logins are pending; wait "
                                       f"{self._login_ttl_s:.0f} s for them to expire")
            expires = now + self._login_ttl_s
            self._pending[_digest(token)] = _Pending(fingerprint, name, expires)
        return LoginGrant(token, expires)

    def redeem(self, token: str) -> ConsoleSession:
        """Exchange a login token (once) for a new session."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            pending = self._pending.pop(_digest(token), None)
            if pending is None:
                raise LoginRefused()
            if len(self._sessions) >= MAX_SESSIONS:
                # Evict the session closest to expiry rather than refuse a valid login.
                oldest = min(self._sessions, key=lambda k: self._sessions[k].expires_at)
                del self._sessions[oldest]
            session = ConsoleSession(secrets.token_urlsafe(32), pending.fingerprint,
                                     pending.name, secrets.token_urlsafe(32),
                                     now + self._session_ttl_s)
            self._sessions[_digest(session.session_id)] = session
        return session

    def session(self, session_id: str | None) -> ConsoleSession:
        """The live session with this id, or raise SessionInvalid."""
        if not session_id:
            raise SessionInvalid("not logged in: run `ringfence console login` and open the "
                                 "URL it prints")
        now = self._clock()
        with self._lock:
            found = self._sessions.get(_digest(session_id))
            if found is None or found.expires_at <= now:
                self._sessions.pop(_digest(session_id), None)
                raise SessionInvalid("your console session expired or ended: run "
                                     "`ringfence console login` again")
        return found

    def check_csrf(self, session: ConsoleSession, presented: str | None) -> None:
        """Raise SessionInvalid unless `presented` is this session's CSRF token."""
        if not presented or not hmac.compare_digest(presented.encode(), session.csrf.encode()):
            raise SessionInvalid("the form's CSRF token is missing or wrong: reload the page "
                                 "and try again")

    def logout(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(_digest(session_id), None)

    def counts(self) -> tuple[int, int]:
        """(pending logins, live sessions), for metrics."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            return len(self._pending), len(self._sessions)
