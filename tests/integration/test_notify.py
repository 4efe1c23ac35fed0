"""Notifications against receivers the test starts on loopback: an HTTP webhook receiver that
checks the HMAC signature (and fails the first attempt, so retries are exercised) and an
aiosmtpd SMTP server that requires STARTTLS with a self-signed certificate."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.alerting import AlertHub, AlertNotice
from server.notify import (
    SIGNATURE_HEADER,
    EmailRoute,
    Notification,
    Notifier,
    NotifyConfig,
    NotifyConfigError,
    SMTPConfig,
    Webhook,
)

pytestmark = [pytest.mark.timeout(60)]
SECRET = b"webhook-test-secret"


class Receiver:
    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver(fail_first=1)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                state.requests.append((dict(self.headers), body))
                fail = len(state.requests) <= state.fail_first
            self.send_response(500 if fail else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "smtp.pem", tmp / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[tuple[Mailbox, int, Path]]:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    box = Mailbox()
    # aiosmtpd's start-up check connects to the configured port, so port 0 cannot be used.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(box, hostname="127.0.0.1", port=port, tls_context=context,
                            require_starttls=True)
    controller.start()
    try:
        yield box, port, cert
    finally:
        controller.stop()


def test_webhook_is_signed_and_retried(receiver: tuple[Receiver, str]) -> None:
    state, url = receiver
    notifier = Notifier(NotifyConfig(webhooks=(Webhook("soc", url, SECRET, "low"),),
                                     retries=3, backoff_initial_s=0.05))
    hub = AlertHub()
    hub.register(notifier)
    notifier.start()
    try:
        hub.alert_raised(AlertNotice("17", "agent-1", "Reverse shell", "high", "bash -i",
                                     time.time_ns(), seq=42, hostname="web-01"))
        assert notifier.drain(15)
    finally:
        notifier.stop()
    assert len(state.requests) == 2 and notifier.stats.retried == 1
    assert notifier.stats.sent == 1
    headers, body = state.requests[-1]
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    payload = json.loads(body)
    assert payload["event"] == "alert.raised" and payload["details"]["alert_id"] == "17"
    assert payload["host"] == "web-01"
    assert SECRET.decode() not in body.decode()


def test_email_over_starttls_with_template_and_severity_routing(
        smtp: tuple[Mailbox, int, Path]) -> None:
    box, port, cert = smtp
    config = NotifyConfig(
        email=(EmailRoute("oncall", ("oncall@example.test",), min_severity="high"),),
        smtp=SMTPConfig(host="127.0.0.1", port=port, sender="ringfence@example.test",
                        ca_file=str(cert), subject_template="[IR] ${severity}: ${title}"),
        retries=0)
    notifier = Notifier(config)
    notifier.start()
    try:
        assert notifier.publish(Notification("case", "case.created", "low", "minor")) == 0
        assert notifier.publish(Notification("action", "action.kill", "critical",
                                             "kill issued by alice", "web-01")) == 1
        assert notifier.drain(15)
    finally:
        notifier.stop()
    assert notifier.stats.sent == 1, notifier.stats
    assert len(box.messages) == 1
    sender, rcpts, content = box.messages[0]
    assert sender == "ringfence@example.test" and rcpts == ["oncall@example.test"]
    assert b"Subject: [IR] critical: kill issued by alice" in content


def test_email_fails_closed_without_a_trusted_certificate(
        smtp: tuple[Mailbox, int, Path]) -> None:
    box, port, _ = smtp
    notifier = Notifier(NotifyConfig(email=(EmailRoute("oncall", ("x@example.test",), "low"),),
                                     smtp=SMTPConfig(host="127.0.0.1", port=port), retries=0))
    notifier.start()
    try:
        notifier.publish(Notification("alert", "alert.raised", "high", "t"))
        assert notifier.drain(15)
    finally:
        notifier.stop()
    assert notifier.stats.failed == 1 and box.messages == []


def test_publish_never_blocks_and_a_full_queue_drops_visibly() -> None:
    hooks = (Webhook("w", "http://127.0.0.1:9/none", SECRET),)
    notifier = Notifier(NotifyConfig(webhooks=hooks, queue_size=2))   # not started
    started = time.monotonic()
    queued = sum(notifier.publish(Notification("alert", "alert.raised", "high", "t"))
                 for _ in range(5))
    assert time.monotonic() - started < 0.5
    assert queued == 2 and notifier.stats.dropped == 3


def test_config_validation() -> None:
    with pytest.raises(NotifyConfigError, match="secret"):
        NotifyConfig.from_dict({"webhook": [{"url": "http://127.0.0.1/x", "secret": ""}]})
    with pytest.raises(NotifyConfigError, match="starttls"):
        NotifyConfig.from_dict({"email": [{"to": ["a@example.test"]}],
                                "smtp": {"starttls": False}})
    config = NotifyConfig.from_dict({"webhook": [{"url": "https://soc.example.test/h",
                                                  "secret": "s", "min_severity": "high"}]})
    assert config.webhooks[0].min_severity == "high"
