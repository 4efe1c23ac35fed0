"""The web console over plain HTTP against a real server and agent: one-time logins, session
cookies, CSRF, roles and audit; and the server's Prometheus /metrics. (The same flows in a real
browser are in test_console_browser.py.)"""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proto import ringfence_pb2 as pb
from server.fleet import create_responder
from server.pki import CertificateAuthority
from tests.integration.fleet import (
    Fleet,
    agent_config,
    cli,
    running_agent,
    running_fleet,
    wait_for,
)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def request(fleet: Fleet, method: str, path: str, cookie: str = "",
            form: dict[str, str] | None = None, origin: str = "") -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", fleet.server.ports["console"], timeout=30)
    headers = {}
    body = None
    if cookie:
        headers["Cookie"] = f"rf_session={cookie}"
    if origin:
        headers["Origin"] = origin
    if form is not None:
        body = urllib.parse.urlencode(form)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def login_url(fleet: Fleet, identity: Path | None = None) -> str:
    args = ["console", "login", "--data-dir", str(fleet.data_dir), "--json"]
    if identity is not None:
        args += ["--identity", str(identity)]
    return str(json.loads(cli(*args).stdout)["url"])


def log_in(fleet: Fleet, identity: Path | None = None) -> tuple[str, str]:
    """(session cookie, CSRF token) for a fresh console session."""
    url = urllib.parse.urlsplit(login_url(fleet, identity))
    reply = request(fleet, "GET", f"{url.path}?{url.query}")
    assert reply.status == 303, reply.text
    cookie = reply.headers["set-cookie"]
    session = re.match(r"rf_session=([^;]+);", cookie)
    assert session is not None
    page = request(fleet, "GET", "/", session.group(1))
    assert page.status == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return session.group(1), csrf.group(1)


def test_console_login_session_csrf_roles_and_audit(tmp_path: Path) -> None:
    with running_fleet(tmp_path, console="127.0.0.1:0") as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        viewer = create_responder(fleet.store, fleet.paths, CertificateAuthority.load(fleet.paths),
                                  "vera", "viewer")
        with running_agent(agent_config(tmp_path / "agent")) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            # Pages need a session.
            assert request(fleet, "GET", "/").status == 401
            assert request(fleet, "GET", "/api/hosts").status == 401

            url = urllib.parse.urlsplit(login_url(fleet))
            assert url.scheme == "http" and url.port == fleet.server.ports["console"]
            first = request(fleet, "GET", f"{url.path}?{url.query}")
            assert first.status == 303 and first.headers["location"] == "/"
            cookie = first.headers["set-cookie"]
            for attribute in ("HttpOnly", "SameSite=Strict", "Max-Age=", "Path=/"):
                assert attribute in cookie
            assert first.headers["referrer-policy"] == "same-origin"
            # The token works once.
            again = request(fleet, "GET", f"{url.path}?{url.query}")
            assert again.status == 401
            assert "ringfence console login" in again.text
            assert request(fleet, "GET", "/login?token=rfc_forged").status == 401

            session, csrf = log_in(fleet)
            hosts = json.loads(request(fleet, "GET", "/api/hosts", session).body)["hosts"]
            assert [h["agent_id"] for h in hosts] == [enrollment.agent_id]
            assert hosts[0]["online"] is True
            page = request(fleet, "GET", f"/hosts/{enrollment.agent_id}", session)
            assert page.status == 200 and 'id="isolate-button"' in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]

            # State-changing requests need the session's CSRF token and the same origin.
            path = f"/hosts/{enrollment.agent_id}/triage"
            assert request(fleet, "POST", path, session, {"reason": "t"}).status == 403
            assert request(fleet, "POST", path, session, {"reason": "t",
                                                          "csrf": "wrong"}).status == 403
            assert request(fleet, "POST", path, session, {"reason": "t", "csrf": csrf},
                           origin="http://evil.example").status == 403
            ok = request(fleet, "POST", path, session, {"reason": "console triage",
                                                         "csrf": csrf})
            assert ok.status == 303 and "notice=triage" in ok.headers["location"]

            # Isolation needs a reason, and the confirmation step shows the policy.
            confirm = request(fleet, "GET", f"/hosts/{enrollment.agent_id}/isolate?reason=",
                              session)
            assert confirm.status == 400
            confirm = request(fleet, "GET",
                              f"/hosts/{enrollment.agent_id}/isolate?reason=IR-1", session)
            assert confirm.status == 200 and 'data-testid="policy"' in confirm.text
            assert "collectors" in confirm.text and "127.0.0.1" in confirm.text
            unconfirmed = request(fleet, "POST", f"/hosts/{enrollment.agent_id}/isolate",
                                  session, {"reason": "IR-1", "csrf": csrf})
            assert unconfirmed.status == 400

            # A viewer sees no response controls and is refused even with a valid CSRF token.
            v_session, v_csrf = log_in(fleet, viewer)
            v_page = request(fleet, "GET", f"/hosts/{enrollment.agent_id}", v_session)
            assert v_page.status == 200
            assert 'id="isolate-button"' not in v_page.text
            assert 'data-testid="read-only"' in v_page.text
            forged = request(fleet, "POST", f"/hosts/{enrollment.agent_id}/isolate", v_session,
                             {"reason": "forged", "csrf": v_csrf, "confirm": "yes"})
            assert forged.status == 403
            assert "needs the responder role" in forged.text
            assert request(fleet, "GET", f"/hosts/{enrollment.agent_id}/isolate?reason=x",
                           v_session).status == 403
            assert request(fleet, "GET", "/audit", v_session).status == 403
            assert fleet.store.get_agent(enrollment.agent_id).isolation_state == "none"

            # Logging out ends the session on the server.
            assert request(fleet, "POST", "/logout", v_session, {"csrf": v_csrf}).status == 303
            assert request(fleet, "GET", "/", v_session).status == 401

            audit = request(fleet, "GET", "/audit", session)
            assert audit.status == 200 and "chain verified" in audit.text
        rows = fleet.store.audit_rows()
        outcomes = [(r.actor, r.action, r.outcome.split(":")[0]) for r in rows]
        assert ("admin", "console_login", "allowed") in outcomes
        assert ("admin", "console_session", "allowed") in outcomes
        assert ("admin", "triage", "allowed") in outcomes
        assert ("vera", "isolate", "denied") in outcomes
        # Tokens and session ids never reach the audit log.
        assert not any("rfc_" in r.reason + r.outcome + r.target for r in rows)


def test_console_disabled_login_says_how_to_enable(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        result = cli("console", "login", "--data-dir", str(fleet.data_dir), check=False)
    assert result.returncode != 0
    assert "--console" in result.stderr


def _scrape(fleet: Fleet) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    reply = request(fleet, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(reply.text):
        assert family.name.startswith("ringfence_"), family.name
        if family.type == "counter":
            assert family.samples[0].name.endswith(("_total", "_created")) if family.samples \
                else True
        for sample in family.samples:
            assert not {"pid", "path", "agent_id", "hostname"} & set(sample.labels), sample
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def test_server_metrics_scraped(tmp_path: Path) -> None:
    with running_fleet(tmp_path, console="127.0.0.1:0") as fleet:
        fleet.enroll(tmp_path / "agent")
        with running_agent(agent_config(tmp_path / "agent")) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            with fleet.admin() as admin:
                status = admin.triage(pb.TriageRequest(host=agent.agent_id, reason="metrics"))
                wait_for(lambda: admin.get_command(status.command_id).status == "succeeded",
                         timeout=30, what="triage to succeed")
            samples = wait_for(lambda: (s := _scrape(fleet)).get(
                "ringfence_commands_total") and s, what="command metrics")
            assert samples["ringfence_agents_connected"][()] == 1
            assert samples["ringfence_agents_enrolled"][()] == 1
            assert samples["ringfence_integrity_alerts"][()] == 0
            assert samples["ringfence_commands_total"][
                (("action", "triage"), ("outcome", "succeeded"))] == 1
            ingested = samples["ringfence_events_ingested_total"]
            assert ingested[(("kind", "lifecycle"),)] >= 1
            assert ingested[(("kind", "triage"),)] >= 1
            count = samples["ringfence_ingest_latency_seconds_count"][()]
            assert count == sum(ingested.values())
            assert samples["ringfence_hosts_isolation_state"][(("state", "none"),)] == 1
            # Live detection evaluated what was stored, and is not behind.
            detection = wait_for(lambda: (s := _scrape(fleet)).get(
                "ringfence_detection_events_evaluated_total", {}).get((), 0) >= 1 and s,
                what="detection metrics")
            assert detection["ringfence_detection_lag_seconds"][()] < 5
            assert detection["ringfence_detection_events_overflowed_total"][()] == 0
            assert "ringfence_detection_matches_total" in detection
        final = _scrape(fleet)
        assert final["ringfence_agents_connected"][()] == 0
