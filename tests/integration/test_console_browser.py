"""The web console in a real browser (Debian's Chromium driven by Playwright) against a real
server and a real in-process agent with the fake isolation backend: log in with a one-time URL,
watch the host and a new process appear, isolate with a reason through the confirmation step,
release, download a bundle and verify it offline; a viewer cannot isolate.

Set RINGFENCE_SCREENSHOTS=DIR to also save the fleet and host pages there (docs/images).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from evidence.bundle import TrustSet, verify_bundle
from evidence.keys import load_public_key, public_key_from_bytes
from server.codec import ProtoEventCodec
from server.fleet import create_responder
from server.pki import CertificateAuthority
from tests.integration.fleet import (
    agent_config,
    cli,
    quiet_sensors,
    running_agent,
    running_fleet,
    wait_for,
)
from tests.integration.test_console import login_url

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 30_000


@pytest.fixture
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium")
    assert executable is not None  # the `browser` mark already skipped or failed without it
    with sync_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def test_responder_console_end_to_end(tmp_path: Path, browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    shots = Path(os.environ["RINGFENCE_SCREENSHOTS"]) if os.environ.get(
        "RINGFENCE_SCREENSHOTS") else tmp_path
    with running_fleet(tmp_path, console="127.0.0.1:0") as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        viewer = create_responder(fleet.store, fleet.paths, CertificateAuthority.load(fleet.paths),
                                  "vera", "viewer")
        config = agent_config(tmp_path / "agent", quiet_sensors(process="psutil"))
        with running_agent(config) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            context = browser.new_context(viewport={"width": 1366, "height": 900},
                                          accept_downloads=True)
            context.set_default_timeout(UI_TIMEOUT_MS)
            page = context.new_page()

            # Log in: the one-time URL sets the session and lands on the fleet page.
            url = login_url(fleet)
            page.goto(url)
            expect(page.get_by_test_id("actor")).to_have_text("admin")
            row = page.locator(f'tr[data-host="{enrollment.agent_id}"]')
            expect(row).to_contain_text("online")
            expect(row).to_contain_text("none")
            page.fill("#fleet-search", "no-such-host")
            expect(row).to_be_hidden()
            page.fill("#fleet-search", "")
            expect(row).to_be_visible()
            page.screenshot(path=str(shots / "console-fleet.png"),
                            clip={"x": 0, "y": 0, "width": 1366, "height": 360})

            # The token is single-use: a second browser gets the error page.
            other = browser.new_context()
            second = other.new_page()
            assert second.goto(url).status == 401
            other.close()

            # A new process appears on the live timeline without a reload.
            row.locator("a.hostname").click()
            expect(page.get_by_test_id("hostname")).to_be_visible()
            marker = f"rf-console-{uuid.uuid4().hex[:12]}"
            proc = subprocess.Popen(["sh", "-c", "sleep 20", marker])
            try:
                expect(page.locator("#timeline")).to_contain_text(marker)
            finally:
                proc.kill()
                proc.wait()

            # Isolate with a reason; the confirmation page shows the policy.
            page.fill("#isolate-reason", "IR-7: beaconing to 203.0.113.7")
            page.click("#isolate-button")
            expect(page.get_by_test_id("policy")).to_contain_text("collectors")
            expect(page.get_by_test_id("confirm-reason")).to_have_text(
                "IR-7: beaconing to 203.0.113.7")
            page.click("#confirm-isolate")
            expect(page.get_by_test_id("notice")).to_contain_text("Isolation command issued")
            expect(page.locator("#isolation-state")).to_have_text("isolated")
            expect(page.locator("#release-button")).to_be_visible()
            expect(page.locator("#isolation-history")).to_contain_text("CONFIRMED")
            page.screenshot(path=str(shots / "console-host.png"), full_page=False)

            # Release it again.
            page.fill("#release-reason", "IR-7: reimaged")
            page.click("#release-button")
            page.click("#confirm-release")
            expect(page.locator("#isolation-state")).to_have_text("none")
            expect(page.locator("#isolation-history")).to_contain_text("RELEASED")

            # Create and download a bundle; it verifies offline against pinned keys.
            page.fill("#bundle-case", "IR-7")
            with page.expect_download() as info:
                page.click("#bundle-button")
            bundle = tmp_path / "ir-7.zip"
            info.value.save_as(str(bundle))
            trust = TrustSet.of([load_public_key(fleet.paths.signing_public)],
                                [public_key_from_bytes(fleet.store.get_agent(
                                    enrollment.agent_id).identity_key)])
            verified = verify_bundle(bundle, trust, ProtoEventCodec())
            assert verified.manifest.case_id == "IR-7"
            assert verified.event_count > 0
            cli("bundle", "verify", str(bundle), "--data-dir", str(fleet.data_dir))

            page.click("text=Audit")
            expect(page.get_by_test_id("audit-status")).to_contain_text("chain verified")
            expect(page.locator("main")).to_contain_text("IR-7: beaconing")
            context.close()

            # A viewer sees the host but no isolate button, and a forged POST is refused.
            viewer_context = browser.new_context()
            viewer_context.set_default_timeout(UI_TIMEOUT_MS)
            vpage = viewer_context.new_page()
            vpage.goto(login_url(fleet, viewer))
            expect(vpage.get_by_test_id("role")).to_have_text("viewer")
            vpage.goto(f"http://127.0.0.1:{fleet.server.ports['console']}/hosts/"
                       f"{enrollment.agent_id}")
            expect(vpage.get_by_test_id("read-only")).to_be_visible()
            assert vpage.locator("#isolate-button").count() == 0
            csrf = vpage.locator('input[name="csrf"]').first.get_attribute("value")
            assert csrf
            forged = viewer_context.request.post(
                f"http://127.0.0.1:{fleet.server.ports['console']}/hosts/"
                f"{enrollment.agent_id}/isolate",
                form={"csrf": csrf, "reason": "forged", "confirm": "yes"})
            assert forged.status == 403
            viewer_context.close()
        assert fleet.store.get_agent(enrollment.agent_id).isolation_state == "none"
        denied = [r for r in fleet.store.audit_rows()
                  if r.actor == "vera" and r.action == "isolate"]
        assert denied and all(r.outcome.startswith("denied") for r in denied)
