"""The incident workflow's face to the admin API: translates Contain / Case / Story requests
into calls on server.containment, server.cases, server.story and server.report, and builds
those services for `server run`.

Transport-free like server.admin: server.rpc authenticates the caller and maps errors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from collector.store.base import CommandRow, Store
from proto import ringfence_pb2 as pb
from server.admin import Actor, Admin, InvalidRequest
from server.alerting import AlertHub
from server.cases import CaseService, SQLiteCaseStore
from server.containment import Containment, KillSpec
from server.pki import ServerPaths
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

    def contain(self, actor: Actor, request: pb.ContainRequest) -> CommandRow:
        c, host, reason, case = self.containment, request.host, request.reason, request.case_id
        which = request.WhichOneof("action")
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


def build_incident(admin: Admin, store: Store, paths: ServerPaths) -> Incident:
    """The incident workflow of one server: cases in DATA/cases.db, containment linked to
    cases, stories that can look alerts up through the alert hub."""
    alerts = AlertHub()
    cases = CaseService(admin, SQLiteCaseStore(paths.root / "cases.db"), store)
    containment = Containment(admin, store, link=cases.link, require_case=cases.require_case)
    return Incident(containment, cases, Story(admin, store, alerts), admin, store, alerts)
