"""report_data measures and renderings from a synthetic case document and audit log."""

from __future__ import annotations

from collector.store.base import AuditRow
from server.report import render_html, render_markdown, report_data

S = 1_000_000_000
T0 = 1_700_000_000 * S


def _audit(seq: int, t: int, action: str, target: str, outcome: str) -> AuditRow:
    return AuditRow(seq, t, "alice", "responder", action, target, "why <b>", outcome,
                    b"", b"")


def _command(cid: str, action: str, status: str, t: int) -> dict[str, object]:
    return {"command_id": cid, "agent_id": "a1", "action": action, "status": status,
            "message": "ok", "detail": {}, "issued_ns": t - S, "updated_ns": t,
            "actor": "alice", "reason": "r", "linked_ns": t}


def document(commands: list[dict[str, object]], alerts: list[dict[str, object]]
             ) -> dict[str, object]:
    return {"case": {"case_id": "CASE-1", "title": "t <script>", "severity": "high",
                     "status": "closed", "created_ns": T0, "created_by": "alice",
                     "closed_ns": T0 + 7200 * S, "closed_by": "alice", "close_reason": "done"},
            "hosts": ["a1"], "commands": commands, "alerts": alerts, "notes": [],
            "bundles": [{"bundle_id": "b1", "sha256": "ab" * 32, "events": 3}], "files": []}


def test_measures_and_timeline() -> None:
    doc = document([_command("c1", "isolate", "succeeded", T0 + 600 * S),
                    _command("c2", "kill", "failed", T0 + 300 * S),
                    _command("c3", "release", "succeeded", T0 + 3600 * S)],
                   [{"alert_id": "9", "severity": "high", "rule": "R", "title": "x",
                     "time_ns": T0 + 60 * S, "event_time_ns": T0}])
    audit = [_audit(1, T0 + 100 * S, "isolate", "a1", "allowed: issued command c1"),
             _audit(2, T0 - 10 * 3600 * S, "triage", "a1", "allowed: issued command zz"),
             _audit(3, T0 + 200 * S, "case_link", "CASE-1", "allowed: linked note")]
    data = report_data(doc, audit)
    m = data["measures"]
    assert m["time_to_detect"]["ns"] == 60 * S
    assert m["time_to_contain"]["ns"] == 540 * S            # first alert -> isolate succeeded
    assert m["time_to_release"]["ns"] == 3000 * S
    kinds = [t["kind"] for t in data["timeline"]]
    assert kinds[0] == "alert" and "action" in kinds and "result" in kinds
    assert not any("zz" in t["what"] for t in data["timeline"])   # outside the case window
    md = render_markdown(data)
    assert "| Time to contain | 9m 00s |" in md and "ab" * 32 in md
    html = render_html(data)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_measures_say_why_when_missing() -> None:
    data = report_data(document([_command("c1", "kill", "failed", T0 + S)], []), [])
    assert data["measures"]["time_to_detect"]["text"].startswith("n/a")
    assert "no containment succeeded" in data["measures"]["time_to_contain"]["text"]
    assert "nothing was released" in data["measures"]["time_to_release"]["text"]
