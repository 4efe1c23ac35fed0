"""The incident workflow's face to the admin API: translates Contain / Case / Story requests
into calls on server.containment, server.cases, server.story and server.report, and builds
those services for `server run`.

Transport-free like server.admin: server.rpc authenticates the caller and maps errors.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from collector.store.base import CommandRow, Store
from proto import ringfence_pb2 as pb
from server.admin import Actor, Admin, InvalidRequest
from server.alerting import AlertHub
from server.cases import CaseService, SQLiteCaseStore
from server.containment import Containment, KillSpec
from server.notify import Notification, Notifier, NotifyConfig
from server.pki import ServerPaths
from server.playbooks import PlaybookConfig, PlaybookEngine
from server.report import report_data
from server.story import Story

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incident:
    containment: Containment
    cases: CaseService
    story: Story
    admin: Admin
    store: Store
    alerts: AlertHub
    notifier: Notifier
    playbooks: PlaybookEngine

    def stop(self) -> None:
        self.playbooks.stop()
        self.notifier.stop()

    def contain(self, actor: Actor, request: pb.ContainRequest) -> CommandRow:
        c, host, reason, case = self.containment, request.host, request.reason, request.case_id
        which = request.WhichOneof("action")
        if which is None:
            raise InvalidRequest("name a containment action (kill, quarantine, block, ...)")
        # The role decides before anything about the request is examined: a viewer learns
        # "permission denied", never which of its arguments were wrong.
        c.authorize(actor, which, host, reason)
        if which == "kill":
            k = request.kill
            return c.kill(actor, host, reason, KillSpec(k.pid, k.tree, k.start_time_ns, k.exe),
                          case)
        if which == "quarantine":
            return c.quarantine(actor, host, reason, request.quarantine.path, case)
        if which == "unquarantine":
            return c.unquarantine(actor, host, reason, request.unquarantine.quarantine_id, case)
        if which == "block":
            return c.block(actor, host, reason, list(request.block.ips),
                           list(request.block.domains), case)
        if which == "unblock":
            return c.unblock(actor, host, reason, case)
        if which == "lock_user":
            return c.lock_user(actor, host, reason, request.lock_user.user,
                               request.lock_user.kill_sessions, case)
        if which == "unlock_user":
            return c.unlock_user(actor, host, reason, request.unlock_user.user, case)
        raise InvalidRequest("name a containment action (kill, quarantine, block, ...)")

    def case(self, actor: Actor, request: pb.CaseRequest) -> dict[str, Any]:
        op = request.op
        if op == "create":
            case = self.cases.create(actor, request.title, request.severity,
                                     list(request.hosts), request.reason)
            return self.cases.document(case.case_id)
        if op == "list":
            return {"cases": [asdict(c) for c in self.cases.list_cases(actor)]}
        if op == "show":
            return self.cases.show(actor, request.case_id)
        if op == "close":
            self.cases.close(actor, request.case_id, request.reason)
            return self.cases.document(request.case_id)
        if op == "link":
            detail: dict[str, Any] = {}
            if request.link_kind == "alert" and self.story.alerts is not None:
                notice = self.story.alerts.find(request.link_ref)
                if notice is not None:
                    detail = notice.as_dict()
            if request.note:
                detail["note"] = request.note
            self.cases.link(actor, request.case_id, request.link_kind, request.link_ref, detail,
                            request.reason)
            return self.cases.document(request.case_id)
        if op == "report":
            self.admin.authorize(actor, "case_edit", request.case_id, "case report")
            document = self.cases.document(request.case_id)
            data = report_data(document, self.store.audit_rows())
            self.admin.audit(actor, "case_report", request.case_id, "post-incident report",
                             "allowed: report generated")
            return data
        raise InvalidRequest(f"unknown case operation {op!r}")

    def story_of(self, actor: Actor, request: pb.StoryRequest) -> dict[str, Any]:
        self.admin.authorize(actor, "story", request.host)
        return self.story.build(request.host, request.alert_id, request.seq,
                                request.window_s).as_dict()


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, default=str)


RESPONSE_CONFIG = "response.toml"


class ResponseConfigError(ValueError):
    """DATA/response.toml is unreadable or invalid; the message says which part."""


def load_response_config(path: Path) -> tuple[NotifyConfig, PlaybookConfig]:
    """[notify] and [playbooks] of DATA/response.toml; both empty when the file is absent
    (notifications and automatic response are opt-in)."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return NotifyConfig(), PlaybookConfig()
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ResponseConfigError(f"cannot read {path}: {e}") from e
    unknown = set(raw) - {"notify", "playbooks"}
    if unknown:
        raise ResponseConfigError(f"{path}: unknown sections {sorted(unknown)}; known: notify, "
                                  "playbooks")
    return (NotifyConfig.from_dict(raw.get("notify", {})),
            PlaybookConfig.from_dict(raw.get("playbooks", {})))


def build_incident(admin: Admin, store: Store, paths: ServerPaths) -> Incident:
    """The incident workflow of one server: cases in DATA/cases.db, containment linked to
    cases, notifications and playbooks from DATA/response.toml, all fed by one alert hub."""
    notify_config, playbook_config = load_response_config(paths.root / RESPONSE_CONFIG)
    notifier = Notifier(notify_config)
    alerts = AlertHub()

    def case_event(kind: str, case: Any, detail: dict[str, Any]) -> None:
        notifier.publish(Notification("case", f"case.{kind.removeprefix('case_')}",
                                      case.severity, f"{case.case_id}: {case.title}",
                                      details={"case_id": case.case_id, **detail}))

    def action_event(actor: Actor, row: CommandRow, case_id: str) -> None:
        notifier.publish(Notification("action", f"action.{row.action}", "high",
                                      f"{row.action} issued by {actor.name}", row.agent_id,
                                      row.issued_ns, {"command_id": row.command_id,
                                                      "reason": row.reason,
                                                      "case_id": case_id}))

    cases = CaseService(admin, SQLiteCaseStore(paths.root / "cases.db"), store,
                        on_event=case_event)
    containment = Containment(admin, store, link=cases.link, require_case=cases.require_case,
                              on_action=action_event)
    playbooks = PlaybookEngine(playbook_config, admin, containment)
    alerts.register(notifier)
    alerts.register(playbooks)
    notifier.start()
    playbooks.start()
    return Incident(containment, cases, Story(admin, store, alerts), admin, store, alerts,
                    notifier, playbooks)
