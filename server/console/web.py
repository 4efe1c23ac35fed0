"""The web console: a small WSGI application over `server.admin.Admin`, and its listener.

It is one more transport for the admin logic, like server.rpc: every page and action goes
through Admin with the session's responder as the actor, so role checks and the audit trail
are the same as on the gRPC API. It owns HTTP concerns only: sessions (cookie), CSRF checks on
every POST, security headers, HTML rendering (Jinja2 with autoescaping) and the JSON the
pages poll. /metrics serves the server's Prometheus metrics.

Error mapping (the one place): ConsoleAuthError -> 401 (a bad CSRF token -> 403), PermissionDenied -> 403,
InvalidRequest -> 400, NotFound -> 404, store failures -> 503.
"""

from __future__ import annotations

import json
import logging
import re
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import jinja2

from collector.store.base import NotFound, Store, StoreError, StoreUnavailable
from proto import ringfence_pb2 as pb
from server.admin import Actor, Admin, AdminError, InvalidRequest, PermissionDenied
from server.bundles import BundleService
from server.console import views
from server.console.auth import ConsoleAuth, ConsoleAuthError, ConsoleSession, SessionInvalid
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "rf_session"
MAX_FORM_BYTES = 64 * 1024
TIMELINE_ROWS = 200
DETAIL_WINDOW = 5000          # events back from the head the host page looks at
STATIC = {"console.css": "text/css; charset=utf-8",
          "console.js": "text/javascript; charset=utf-8"}
SECURITY_HEADERS = [
    ("Content-Security-Policy", ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                 "img-src 'self'; connect-src 'self'; form-action 'self'; "
                                 "frame-ancestors 'none'; base-uri 'none'")),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on form
    # posts, and the origin check below needs the real one.
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]
NOTICES = {
    "isolate": "Isolation command issued. The state turns to isolated once the agent confirms "
               "it reached the collector through the new rules.",
    "release": "Release command issued. The host returns to its previous firewall state once "
               "the agent confirms.",
    "collect": "File collection command issued.",
    "triage": "Triage snapshot command issued.",
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, list[str]]
    cookie: str | None
    origin: str | None
    host: str

    def arg(self, name: str, default: str = "") -> str:
        return self.query.get(name, default)

    def field(self, name: str, default: str = "") -> str:
        values = self.form.get(name)
        return values[0] if values else default


@dataclass
class Response:
    status: int
    body: bytes | Iterable[bytes]
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] | None = None


_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _parse_request(environ: WSGIEnvironment) -> Request:
    method = environ.get("REQUEST_METHOD", "GET")
    query = {k: v[0] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items()}
    form: dict[str, list[str]] = {}
    if method == "POST":
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_FORM_BYTES:
            raise HTTPError(413, f"form larger than {MAX_FORM_BYTES} bytes")
        body = environ["wsgi.input"].read(length) if length else b""
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    cookie: str | None = None
    try:
        jar = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        if COOKIE in jar:
            cookie = jar[COOKIE].value
    except CookieError:
        cookie = None
    return Request(method, environ.get("PATH_INFO", "/") or "/", query, form, cookie,
                   environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST", ""))


class ConsoleApp:
    """The WSGI application. Thread-safe: state lives in ConsoleAuth and the store."""

    def __init__(self, admin: Admin, store: Store, auth: ConsoleAuth,
                 bundles: BundleService | None, metrics: ServerMetrics | None) -> None:
        self._admin = admin
        self._store = store
        self._auth = auth
        self._bundles = bundles
        self._metrics = metrics
        self._env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                       autoescape=True, undefined=jinja2.StrictUndefined)
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = [
            ("GET", re.compile(r"/"), self.fleet),
            ("GET", re.compile(r"/login"), self.login),
            ("POST", re.compile(r"/logout"), self.logout),
            ("GET", re.compile(r"/metrics"), self.metrics),
            ("GET", re.compile(r"/static/([a-z]+\.(?:css|js))"), self.static),
            ("GET", re.compile(r"/audit"), self.audit),
            ("GET", re.compile(r"/api/hosts"), self.api_hosts),
            ("GET", re.compile(r"/api/hosts/([\w.-]+)"), self.api_host),
            ("GET", re.compile(r"/api/hosts/([\w.-]+)/events"), self.api_events),
            ("GET", re.compile(r"/hosts/([\w.-]+)"), self.host),
            ("GET", re.compile(r"/hosts/([\w.-]+)/(isolate|release)"), self.confirm),
            ("POST", re.compile(r"/hosts/([\w.-]+)/(isolate|release)"), self.isolation_action),
            ("POST", re.compile(r"/hosts/([\w.-]+)/collect"), self.collect),
            ("POST", re.compile(r"/hosts/([\w.-]+)/triage"), self.triage),
            ("POST", re.compile(r"/hosts/([\w.-]+)/bundle"), self.bundle),
        ]

    # -- WSGI -----------------------------------------------------------------------------------
    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        wants_json = environ.get("PATH_INFO", "").startswith("/api/")
        try:
            request = _parse_request(environ)
            response = self._dispatch(request)
        except HTTPError as e:
            response = self._error(e.status, e.message, wants_json)
        except ConsoleAuthError as e:
            response = self._error(401, str(e), wants_json)
        except PermissionDenied as e:
            response = self._error(403, str(e), wants_json)
        except InvalidRequest as e:
            response = self._error(400, str(e), wants_json)
        except NotFound as e:
            response = self._error(404, str(e), wants_json)
        except StoreUnavailable:
            response = self._error(503, "server storage is failing; retry later", wants_json)
        except (StoreError, AdminError):
            logger.exception("console request failed")
            response = self._error(500, "internal error; the server log has the details",
                                   wants_json)
        headers = [("Content-Type", response.content_type), *SECURITY_HEADERS,
                   *(response.headers or [])]
        start_response(f"{response.status} {_REASONS.get(response.status, 'Error')}", headers)
        body = response.body
        return [body] if isinstance(body, bytes) else body

    def _dispatch(self, request: Request) -> Response:
        allowed = []
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            return handler(request, *match.groups())
        if allowed:
            raise HTTPError(405, f"{request.method} is not allowed here")
        raise HTTPError(404, f"no page at {request.path}")

    # -- helpers --------------------------------------------------------------------------------
    def _render(self, template: str, status: int = 200, **context: Any) -> Response:
        body = self._env.get_template(template).render(**context).encode()
        return Response(status, body)

    def _json(self, obj: Any, status: int = 200) -> Response:
        return Response(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, wants_json: bool) -> Response:
        if wants_json:
            return self._json({"error": message}, status)
        return self._render("error.html", status, code=status, message=message,
                            session=None, actor=None)

    def _session(self, request: Request) -> tuple[ConsoleSession, Actor]:
        session = self._auth.session(request.cookie)
        responder = self._store.responder_by_fingerprint(session.fingerprint)
        if responder is None or responder.revoked:
            self._auth.logout(session.session_id)
            raise SessionInvalid("this responder identity was revoked; the session has ended")
        return session, Actor(responder.name, responder.role)

    def _post_session(self, request: Request) -> tuple[ConsoleSession, Actor]:
        """A session for a state-changing request: same-origin and carrying its CSRF token."""
        if request.origin is not None:
            origin_host = urllib.parse.urlsplit(request.origin).netloc
            if origin_host != request.host:
                raise HTTPError(403, "cross-origin request refused")
        session, actor = self._session(request)
        try:
            self._auth.check_csrf(session, request.field("csrf"))
        except SessionInvalid as e:
            logger.warning("console: CSRF check failed for %s on %s", actor.name, request.path)
            raise HTTPError(403, str(e)) from e
        return session, actor

    def _page(self, template: str, session: ConsoleSession, actor: Actor,
              **context: Any) -> Response:
        return self._render(template, session=session, actor=actor,
                            can_respond=views.role_at_least(actor.role, "responder"),
                            is_admin=views.role_at_least(actor.role, "admin"), **context)

    def _host_view(self, actor: Actor, host: str) -> dict[str, Any]:
        agent_id = self._admin.find_host(host).agent_id
        for view in self._admin.list_hosts(actor):
            if view.agent.agent_id == agent_id:
                return views.host_dict(view)
        raise NotFound(f"no host {host!r}")

    @staticmethod
    def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
        return Response(303, b"", headers=[("Location", location), *(headers or [])])

    # -- authentication -------------------------------------------------------------------------
    def login(self, request: Request) -> Response:
        session = self._auth.redeem(request.arg("token"))
        responder = self._store.responder_by_fingerprint(session.fingerprint)
        if responder is None or responder.revoked:
            self._auth.logout(session.session_id)
            raise SessionInvalid("this responder identity was revoked")
        self._admin.audit(Actor(responder.name, responder.role), "console_session", "", "",
                          "allowed: console session started")
        max_age = int(session.expires_at - time.time())
        cookie = (f"{COOKIE}={session.session_id}; Path=/; HttpOnly; SameSite=Strict; "
                  f"Max-Age={max_age}")
        # Redirect so the one-time token leaves the address bar and the history.
        return self._redirect("/", [("Set-Cookie", cookie)])

    def logout(self, request: Request) -> Response:
        session, _ = self._post_session(request)
        self._auth.logout(session.session_id)
        expired = f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        return self._redirect("/", [("Set-Cookie", expired)])

    # -- pages ----------------------------------------------------------------------------------
    def fleet(self, request: Request) -> Response:
        session, actor = self._session(request)
        hosts = [views.host_dict(v) for v in self._admin.list_hosts(actor)]
        q = request.arg("q").strip().lower()
        state = request.arg("state")
        shown = [h for h in hosts if (not q or q in h["hostname"].lower()
                                      or q in h["agent_id"] or any(q in a for a in
                                                                   h["addresses"]))
                 and (not state or (state == "online" and h["online"])
                      or (state == "offline" and not h["online"])
                      or (state == "isolated" and h["isolation_state"] != "none")
                      or (state == "alerts" and h["integrity_alerts"]))]
        return self._page("fleet.html", session, actor, hosts=shown, total=len(hosts), q=q,
                          state=state)

    def host(self, request: Request, host: str) -> Response:
        session, actor = self._session(request)
        info = self._host_view(actor, host)
        agent_id = info["agent_id"]
        head = info["last_seq"]
        window = max(0, head - DETAIL_WINDOW)

        def query(kind: str, after: int = window, limit: int = 2000) -> list[Any]:
            return list(self._admin.query_events(actor, agent_id, 0, 0, kind, limit, after))

        recent = views.timeline(query("", max(0, head - TIMELINE_ROWS), TIMELINE_ROWS))
        recent.reverse()
        command = None
        if request.arg("command"):
            try:
                command = self._admin.get_command(actor, request.arg("command"))
            except InvalidRequest:
                command = None
        return self._page(
            "host.html", session, actor, host=info, timeline=recent,
            tree=views.process_tree(query("process")),
            flows=views.flows(query("network")[-100:]), dns=views.dns(query("dns")[-100:]),
            files=views.file_changes(query("file")[-100:]),
            history=views.isolation_history(query("isolation", 0, 200)),
            alerts=self._admin.integrity(actor, agent_id)[-20:],
            notice=NOTICES.get(request.arg("notice"), ""), command=command)

    def confirm(self, request: Request, host: str, action: str) -> Response:
        """Step two of isolate/release: show what will happen and ask for confirmation."""
        session, actor = self._session(request)
        info = self._host_view(actor, host)
        reason = request.arg("reason").strip()
        # Refused (and audited) here already, so a viewer never reaches a confirm button.
        self._admin.authorize(actor, action, info["agent_id"], reason)
        if not reason:
            raise InvalidRequest(f"{action} needs a reason: it goes into the audit log")
        policy = (json.dumps(self._admin.isolation_policy([], [], True, 20), indent=2)
                  if action == "isolate" else "")
        return self._page("confirm.html", session, actor, host=info, action=action,
                          reason=reason, policy=policy)

    def isolation_action(self, request: Request, host: str, action: str) -> Response:
        _, actor = self._post_session(request)
        reason = request.field("reason")
        if request.field("confirm") != "yes":
            raise InvalidRequest(f"{action} must be confirmed on the confirmation page")
        if action == "isolate":
            row = self._admin.isolate(actor, host, reason, [], [], True, 20, 3600)
        else:
            row = self._admin.release(actor, host, reason)
        return self._redirect(f"/hosts/{row.agent_id}?notice={action}&command={row.command_id}")

    def collect(self, request: Request, host: str) -> Response:
        _, actor = self._post_session(request)
        paths = [p.strip() for p in request.field("paths").splitlines() if p.strip()]
        row = self._admin.collect(actor, host, paths, request.field("reason"))
        return self._redirect(f"/hosts/{row.agent_id}?notice=collect&command={row.command_id}")

    def triage(self, request: Request, host: str) -> Response:
        _, actor = self._post_session(request)
        row = self._admin.triage(actor, host, request.field("reason"))
        return self._redirect(f"/hosts/{row.agent_id}?notice=triage&command={row.command_id}")

    def bundle(self, request: Request, host: str) -> Response:
        _, actor = self._post_session(request)
        if self._bundles is None:
            raise HTTPError(503, "bundles are not available on this server")
        path, built = self._bundles.create(actor, pb.CreateBundleRequest(
            host=host, case_id=request.field("case").strip(),
            reason=request.field("reason").strip(),
            with_files=request.field("with_files") == "yes"))
        size = path.stat().st_size
        return Response(200, _file_chunks(path), "application/zip", [
            ("Content-Disposition",
             f'attachment; filename="ringfence-bundle-{built.bundle_id}.zip"'),
            ("Content-Length", str(size))])

    def audit(self, request: Request) -> Response:
        session, actor = self._session(request)
        rows, error = self._admin.list_audit(actor)
        shown = [{"seq": r.seq, "time": views.fmt_time(r.time_ns), "actor": r.actor,
                  "role": r.role, "action": r.action, "target": r.target, "reason": r.reason,
                  "outcome": r.outcome, "hash": r.hash.hex()[:16]} for r in reversed(rows)]
        return self._page("audit.html", session, actor, rows=shown[:1000], count=len(rows),
                          error=error)

    # -- JSON the pages poll --------------------------------------------------------------------
    def api_hosts(self, request: Request) -> Response:
        _, actor = self._session(request)
        return self._json({"hosts": [views.host_dict(v) for v in self._admin.list_hosts(actor)]})

    def api_host(self, request: Request, host: str) -> Response:
        _, actor = self._session(request)
        return self._json({"host": self._host_view(actor, host)})

    def api_events(self, request: Request, host: str) -> Response:
        _, actor = self._session(request)
        try:
            after = max(0, int(request.arg("after", "0")))
        except ValueError as e:
            raise InvalidRequest("after must be an event seq (an integer)") from e
        rows = views.timeline(self._admin.query_events(actor, host, 0, 0, "", TIMELINE_ROWS,
                                                       after))
        return self._json({"events": [r.as_dict() for r in rows],
                           "last_seq": rows[-1].seq if rows else after})

    # -- unauthenticated ------------------------------------------------------------------------
    def metrics(self, request: Request) -> Response:
        if self._metrics is None:
            raise HTTPError(404, "metrics are not enabled")
        return Response(200, self._metrics.render(), METRICS_CONTENT_TYPE)

    def static(self, request: Request, name: str) -> Response:
        if name not in STATIC:
            raise HTTPError(404, f"no static file {name}")
        return Response(200, (HERE / "static" / name).read_bytes(), STATIC[name])


def _file_chunks(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(chunk):
            yield data


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    """Logs method, path and status only: the query string may carry a login token."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = self.path.split("?", 1)[0]
        logger.debug("console %s %s %s", self.command, path, code)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("console: %s", format % args if args else format)


class ConsoleServer:
    """The console's HTTP listener, serving on a background thread until stop()."""

    def __init__(self, app: ConsoleApp, host: str, port: int) -> None:
        self._httpd = make_server(host, port, app, server_class=_ThreadingWSGIServer,
                                  handler_class=_QuietHandler)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.5}, name="console",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
