"""The post-incident review of a case: facts gathered on the server (`report_data`) and
rendered to Markdown or self-contained HTML on the responder's side.

Facts: the case, hosts affected, a timeline of alerts and responder actions (from the audit
log: actions on the case, and actions on the case's hosts while it was open), commands with
their outcomes, evidence bundles with SHA-256, collected files, and three measures:

- time to detect: first alert minus the earliest host event that triggered an alert;
- time to contain: first successful containment (isolate, kill, quarantine, block, lock user)
  minus the first alert (or the case's creation when no alert is linked);
- time to release: last successful release/unblock/unlock/unquarantine minus the first
  containment.

A measure that cannot be computed says why instead of guessing. Sections for the team to fill
in (what worked, what did not, follow-ups) are left as prompts. No evidence payloads.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Sequence
from typing import Any

from collector.store.base import AuditRow

CONTAIN_ACTIONS = frozenset({"isolate", "kill", "quarantine", "block", "lock_user"})
RELEASE_ACTIONS = frozenset({"release", "unblock", "unlock_user", "unquarantine"})
ISSUED = "allowed: issued command "
HOST_SLACK_NS = 3600 * 1_000_000_000


def _fmt(ns: int) -> str:
    if not ns:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _duration(ns: int) -> str:
    seconds = max(ns, 0) // 1_000_000_000
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _measure(start: int, end: int, missing: str) -> dict[str, Any]:
    if start and end and end >= start:
        return {"ns": end - start, "text": _duration(end - start), "from_ns": start,
                "to_ns": end}
    return {"ns": None, "text": f"n/a ({missing})", "from_ns": start, "to_ns": end}


def report_data(document: dict[str, Any], audit: Sequence[AuditRow],
                now_ns: int | None = None) -> dict[str, Any]:
    """Everything the review needs, from a case document (server.cases) and the audit log."""
    case = document["case"]
    hosts = set(document["hosts"])
    opened, closed = case["created_ns"], case["closed_ns"] or (now_ns or 2**63 - 1)
    commands = {c["command_id"]: c for c in document["commands"]}
    relevant: list[AuditRow] = []
    for row in audit:
        issued = row.outcome[len(ISSUED):] if row.outcome.startswith(ISSUED) else ""
        on_case = row.target == case["case_id"] or issued in commands
        on_host = row.target in hosts and opened - HOST_SLACK_NS <= row.time_ns <= closed
        if on_case or on_host:
            relevant.append(row)
    timeline: list[dict[str, Any]] = []
    for alert in document["alerts"]:
        timeline.append({"time_ns": int(alert.get("time_ns") or 0), "kind": "alert",
                         "who": "detection",
                         "what": f"[{alert.get('severity', '?')}] {alert.get('rule', '')} "
                                 f"{alert.get('title', '')} (alert {alert['alert_id']})".strip()})
    for row in relevant:
        timeline.append({"time_ns": row.time_ns, "kind": "action", "who": row.actor,
                         "what": f"{row.action} {row.target}: {row.outcome}"
                                 + (f" — {row.reason}" if row.reason else "")})
    for c in commands.values():
        if c["status"] in ("succeeded", "failed", "rejected", "expired"):
            timeline.append({"time_ns": c["updated_ns"], "kind": "result", "who": "agent",
                             "what": f"{c['action']} {c['status']}: {c['message']}"})
    timeline.sort(key=lambda t: t["time_ns"])
    alert_times = sorted(int(a.get("time_ns") or 0) for a in document["alerts"]
                         if a.get("time_ns"))
    event_times = sorted(int(a.get("event_time_ns") or 0) for a in document["alerts"]
                         if a.get("event_time_ns"))
    first_alert = alert_times[0] if alert_times else 0
    succeeded = [c for c in commands.values() if c["status"] == "succeeded"]
    contained = sorted(c["updated_ns"] for c in succeeded if c["action"] in CONTAIN_ACTIONS)
    released = sorted(c["updated_ns"] for c in succeeded if c["action"] in RELEASE_ACTIONS)
    measures = {
        "time_to_detect": _measure(event_times[0] if event_times else 0, first_alert,
                                   "no linked alert names its triggering event"),
        "time_to_contain": _measure(first_alert or opened, contained[0] if contained else 0,
                                    "no containment succeeded"),
        "time_to_release": _measure(contained[0] if contained else 0,
                                    released[-1] if released else 0,
                                    "nothing was released yet"),
    }
    return {"case": case, "hosts": sorted(hosts), "timeline": timeline, "measures": measures,
            "commands": sorted(commands.values(), key=lambda c: c["issued_ns"]),
            "bundles": document["bundles"], "files": document["files"],
            "alerts": document["alerts"], "notes": document["notes"],
            "generated_ns": now_ns or 0}


FILL_IN = ("What worked", "What did not work", "Follow-up actions")


def render_markdown(data: dict[str, Any]) -> str:
    case = data["case"]
    out = [f"# Post-incident review: {case['case_id']} — {case['title']}", "",
           "## Summary", "",
           f"- Severity: **{case['severity']}**; status: **{case['status']}**",
           f"- Opened {_fmt(case['created_ns'])} by {case['created_by']}"
           + (f"; closed {_fmt(case['closed_ns'])} by {case['closed_by']}: "
              f"{case['close_reason']}" if case["closed_ns"] else ""),
           f"- Hosts affected: {', '.join(data['hosts']) or 'none linked'}",
           f"- Alerts: {len(data['alerts'])}; responder actions: {len(data['commands'])}; "
           f"evidence bundles: {len(data['bundles'])}", "",
           "| Measure | Value |", "|---|---|"]
    for key, label in (("time_to_detect", "Time to detect"),
                       ("time_to_contain", "Time to contain"),
                       ("time_to_release", "Time to release")):
        out.append(f"| {label} | {data['measures'][key]['text']} |")
    out += ["", "## Timeline", "", "| Time | Kind | Who | What |", "|---|---|---|---|"]
    for t in data["timeline"]:
        what = str(t["what"]).replace("|", "\\|")
        out.append(f"| {_fmt(t['time_ns'])} | {t['kind']} | {t['who']} | {what} |")
    out += ["", "## Responder actions", ""]
    for c in data["commands"]:
        out.append(f"- `{c['action']}` on {c['agent_id']} by {c['actor']}: **{c['status']}** "
                   f"— {c['message'] or '-'} (command `{c['command_id']}`)")
    if not data["commands"]:
        out.append("- none linked")
    out += ["", "## Evidence bundles", ""]
    for b in data["bundles"]:
        out.append(f"- bundle `{b['bundle_id']}` ({b.get('events', '?')} events, agent "
                   f"{b.get('agent_id', '?')}) SHA-256 `{b.get('sha256', '?')}`")
    if not data["bundles"]:
        out.append("- none yet: `ringfence bundle create HOST --case "
                   f"{case['case_id']} --with-files`")
    out += ["", "## Collected files", ""]
    for f in data["files"]:
        out.append(f"- `{f.get('path', '?')}` SHA-256 `{f['sha256']}` ({f.get('size', '?')} "
                   "bytes)")
    if not data["files"]:
        out.append("- none")
    if data["notes"]:
        out += ["", "## Notes", ""] + [f"- {n['note']} ({n['actor']}, {_fmt(n['time_ns'])})"
                                       for n in data["notes"]]
    for title in FILL_IN:
        out += ["", f"## {title}", "", "_To be filled in by the team._"]
    return "\n".join(out) + "\n"


def render_html(data: dict[str, Any]) -> str:
    e = html.escape
    case = data["case"]
    rows = "".join(f"<tr><td>{e(_fmt(t['time_ns']))}</td><td>{e(t['kind'])}</td>"
                   f"<td>{e(str(t['who']))}</td><td>{e(str(t['what']))}</td></tr>"
                   for t in data["timeline"])
    measures = "".join(f"<tr><th>{e(label)}</th><td>{e(data['measures'][k]['text'])}</td></tr>"
                       for k, label in (("time_to_detect", "Time to detect"),
                                        ("time_to_contain", "Time to contain"),
                                        ("time_to_release", "Time to release")))
    actions = "".join(f"<li><code>{e(c['action'])}</code> on {e(c['agent_id'])} by "
                      f"{e(c['actor'])}: <b>{e(c['status'])}</b> — {e(c['message'] or '-')}"
                      f"</li>" for c in data["commands"]) or "<li>none linked</li>"
    bundles = "".join(f"<li>bundle <code>{e(b['bundle_id'])}</code> SHA-256 "
                      f"<code>{e(str(b.get('sha256', '?')))}</code></li>"
                      for b in data["bundles"]) or "<li>none yet</li>"
    files = "".join(f"<li><code>{e(str(f.get('path', '?')))}</code> SHA-256 "
                    f"<code>{e(f['sha256'])}</code></li>" for f in data["files"]) or "<li>none</li>"
    fill = "".join(f"<h2>{e(t)}</h2><p><em>To be filled in by the team.</em></p>"
                   for t in FILL_IN)
    closed = (f"; closed {e(_fmt(case['closed_ns']))} by {e(case['closed_by'])}: "
              f"{e(case['close_reason'])}" if case["closed_ns"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Post-incident review {e(case['case_id'])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left}}
</style></head><body>
<h1>Post-incident review: {e(case['case_id'])} — {e(case['title'])}</h1>
<h2>Summary</h2>
<p>Severity <b>{e(case['severity'])}</b>, status <b>{e(case['status'])}</b>. Opened
{e(_fmt(case['created_ns']))} by {e(case['created_by'])}{closed}.</p>
<p>Hosts affected: {e(', '.join(data['hosts']) or 'none linked')}</p>
<table>{measures}</table>
<h2>Timeline</h2>
<table><tr><th>Time</th><th>Kind</th><th>Who</th><th>What</th></tr>{rows}</table>
<h2>Responder actions</h2><ul>{actions}</ul>
<h2>Evidence bundles</h2><ul>{bundles}</ul>
<h2>Collected files</h2><ul>{files}</ul>
{fill}
</body></html>
"""
