"""The web console: server-rendered pages over server.admin.Admin (see server.console.web),
one-time logins and sessions (server.console.auth), and page models (server.console.views).

`LoginIssuer` is what the admin API's CreateConsoleLogin calls: it mints a one-time URL for a
responder already authenticated by its certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.admin import Actor, Admin, InvalidRequest
from server.console.auth import ConsoleAuth, ConsoleAuthError


@dataclass(frozen=True)
class ConsoleLoginGrant:
    url: str
    expires_ns: int


class LoginIssuer:
    """Mints one-time console login URLs for authenticated responders, audited."""

    def __init__(self, admin: Admin, auth: ConsoleAuth, base_url: str) -> None:
        self._admin = admin
        self._auth = auth
        self._base_url = base_url.rstrip("/")

    def __call__(self, actor: Actor, fingerprint: str) -> ConsoleLoginGrant:
        self._admin.authorize(actor, "console_login")
        try:
            grant = self._auth.mint(fingerprint, actor.name)
        except ConsoleAuthError as e:
            self._admin.audit(actor, "console_login", "", "", f"refused: {e}")
            raise InvalidRequest(str(e)) from e
        self._admin.audit(actor, "console_login", "", "", "allowed: one-time login issued")
        # The token is in the query string: the console logs paths without it and redirects
        # away from it at once, so it stays out of logs and history.
        return ConsoleLoginGrant(f"{self._base_url}/login?token={grant.token}",
                                 int(grant.expires_at * 1e9))
