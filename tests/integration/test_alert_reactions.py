"""Detection feeds the incident workflow: a real agent's activity raises a Sigma alert, which
(1) is delivered as a signed webhook notification, (2) makes a playbook issue a triage command
attributed to it in the audit log, and (3) can be explained with `ringfence story`."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from server.app import RunConfig, start
from server.detection.baselines import BaselineConfig
from server.detection.engine import DetectionConfig
from server.fleet import init_server
from server.notify import SIGNATURE_HEADER
from server.pki import ServerPaths
from tests.integration.fleet import (
    Fleet,
    agent_config,
    cli,
    quiet_sensors,
    running_agent,
    wait_for,
)

pytestmark = [pytest.mark.timeout(180)]
SECRET = "alert-reactions-secret"
RULE = "Decode Base64 Encoded Text"


class Hook:
    """A loopback webhook receiver that keeps every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.requests]


def _serve(hook: Hook) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with hook.lock:
                hook.requests.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/hook"


def _fleet(base: Path, url: str) -> Iterator[Fleet]:
    data_dir = base / "server"
    init_server(data_dir, ["localhost", "127.0.0.1"])
    (data_dir / "response.toml").write_text(f"""
[notify]
backoff_initial_s = 0.1

[[notify.webhook]]
name = "soc"
url = "{url}"
secret = "{SECRET}"
min_severity = "low"
kinds = ["alert", "action"]

[playbooks]
max_actions_per_hour = 5

[[playbooks.playbook]]
name = "triage-on-decode"
rules = ["{RULE}"]
min_severity = "low"
actions = ["triage"]
""")
    server = start(RunConfig(data_dir=data_dir, listen="127.0.0.1:0", admin="127.0.0.1:0",
                             enroll="127.0.0.1:0",
                             detection=DetectionConfig(baselines=BaselineConfig(enabled=False))))
    try:
        yield Fleet(data_dir, server, ServerPaths(data_dir))
    finally:
        server.stop(grace_s=1.0)


def test_a_real_alert_notifies_runs_its_playbook_and_has_a_story(tmp_path: Path) -> None:
    hook = Hook()
    http, url = _serve(hook)
    try:
        for fleet in _fleet(tmp_path, url):
            agent_id = fleet.enroll(tmp_path / "agent").agent_id
            with running_agent(agent_config(tmp_path / "agent", quiet_sensors("auto"))) as agent:
                wait_for(agent.session.connected.is_set, what="session")
                # base64 -d reading stdin for 1.5 s: long enough for any process sensor.
                proc = subprocess.Popen(["base64", "-d"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL)
                time.sleep(1.5)
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=10)

                def notified() -> dict[str, Any] | None:
                    for body in hook.bodies():
                        if body.get("event") == "alert.raised" and RULE in json.dumps(body):
                            return body
                    return None

                alert_body = wait_for(notified, timeout=60, interval=0.2,
                                      what="the alert's webhook notification")
                # The body is authenticated with the shared secret (HMAC-SHA256).
                with hook.lock:
                    headers, raw = next((h, b) for h, b in hook.requests
                                        if json.loads(b) == alert_body)
                expected = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
                assert headers[SIGNATURE_HEADER] == f"sha256={expected}"

                # The playbook issued a triage command as itself, and the agent ran it.
                def playbook_triage() -> list[dict[str, Any]]:
                    out = cli("audit", "--json", "--data-dir", str(fleet.data_dir)).stdout
                    return [r for r in json.loads(out)["records"]
                            if r["actor"] == "playbook:triage-on-decode"
                            and r["action"] == "triage" and r["outcome"].startswith("allowed")]
                records = wait_for(playbook_triage, timeout=30, what="the playbook's triage")
                assert RULE in records[0]["reason"]
                command_id = records[0]["outcome"].split()[-1]
                wait_for(lambda: fleet.store.get_command(command_id).status == "succeeded",
                         timeout=60, what="the triage command to succeed")

                # `story` explains the alert: the base64 process is in it.
                alert_id = str(alert_body["details"]["alert_id"])
                story = json.loads(cli("story", agent_id, alert_id, "--json", "--data-dir",
                                       str(fleet.data_dir)).stdout)
                assert "base64" in json.dumps(story)
    finally:
        http.shutdown()
        http.server_close()
