"""Evidence bundles assembled from stored bytes, signed by the server, streamed to responders.

It picks the seq range for a request (extended to the covering agent checkpoint), hands stored
event bytes, checkpoints and acquired files to `evidence.build_bundle`, records custody and the
audit entry, and keeps a copy under DATA/blobs/bundles. The format itself is evidence's.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.store.base import Store
from evidence.bundle import BuiltBundle, build_bundle
from evidence.chain import GENESIS_HASH
from evidence.errors import EvidenceError
from evidence.keys import key_id, public_key_from_bytes
from proto import ringfence_pb2 as pb
from server.admin import Actor, Admin, InvalidRequest
from server.codec import ProtoEventCodec
from server.control import BlobStore
from server.pki import ServerPaths

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


class CaseLinks(Protocol):
    """The cases a bundle belongs to (server.cases.CaseService)."""

    def require_case(self, case_id: str) -> None: ...

    def bundle_created(self, actor: Actor, case_id: str, bundle_id: str, sha256: str,
                       agent_id: str, events: int) -> None: ...


class BundleService:
    def __init__(self, store: Store, admin: Admin, paths: ServerPaths,
                 signing_key: Ed25519PrivateKey, cases: CaseLinks | None = None) -> None:
        self._cases = cases
        self._store = store
        self._admin = admin
        self._dir = paths.blobs / "bundles"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._blobs = BlobStore(paths.blobs)
        self._key = signing_key

    def create(self, actor: Actor, request: pb.CreateBundleRequest) -> tuple[Path, BuiltBundle]:
        reason = request.reason or f"evidence bundle for case {request.case_id}"
        if not request.case_id:
            raise InvalidRequest("a bundle needs --case ID: custody names the case")
        self._admin.authorize(actor, "create_bundle", request.host, reason)
        if self._cases is not None:
            # Once cases are in use, a bundle must name an existing, open one.
            self._cases.require_case(request.case_id)
        agent = self._admin.find_host(request.host)
        agent_id = agent.agent_id
        window = list(self._store.query_events(agent_id, request.since_ns, request.until_ns,
                                               limit=1))
        if not window:
            raise InvalidRequest(f"no stored events for {request.host} in that time range")
        first = window[0].seq
        last_in_range = self._store.last_seq_in_range(agent_id, request.since_ns,
                                                      request.until_ns)
        checkpoints = self._store.checkpoints(agent_id, first)
        covering = [c.seq for c in checkpoints if c.seq >= last_in_range]
        if not checkpoints:
            raise InvalidRequest("no agent-signed checkpoint covers these events yet; the agent "
                                 "signs one every 10 s, retry shortly")
        end = min(covering) if covering else max(c.seq for c in checkpoints)
        previous = self._store.previous_event(agent_id, first)
        start_seq, start_head = ((previous.seq, previous.chain_hash) if previous
                                 else (0, GENESIS_HASH))
        bundle_id = str(uuid.uuid4())
        now = time.time_ns()
        custody: list[dict[str, object]] = [
            {"time_ns": now, "actor": actor.name, "role": actor.role, "action": "bundle.create",
             "reason": reason, "case_id": request.case_id, "bundle_id": bundle_id,
             "host": request.host, "agent_id": agent_id,
             "server_key_id": key_id(self._key.public_key())}]
        files: dict[str, tuple[Path, bytes]] = {}
        if request.with_files:
            for row in self._store.files_for(agent_id):
                if row.sha256 in files:
                    continue
                files[row.sha256] = (self._blobs.path_of(row.sha256), row.record_envelope)
                # Each file's hop from the agent into the server's blob store, as recorded
                # when it arrived and its hash was checked against the agent-signed record.
                custody.append({
                    "time_ns": row.stored_ns, "actor": "server", "action": "file.transfer",
                    "from": f"agent {agent_id}", "to": "server blob store",
                    "sha256": row.sha256, "size": row.size, "command_id": row.command_id,
                    "path": row.path.decode("utf-8", "backslashreplace"),
                    "case_id": request.case_id})
        # The bundle leaves the server in this same request; the transfer is signed with it.
        custody.append({"time_ns": time.time_ns(), "actor": "server",
                        "action": "bundle.transfer", "from": "server", "to": actor.name,
                        "via": "admin API (mutual TLS)", "reason": reason,
                        "case_id": request.case_id, "bundle_id": bundle_id})
        out = self._dir / f"{bundle_id}.zip"
        try:
            built = build_bundle(
                out, case_id=request.case_id,
                host={"agent_id": agent_id, "hostname": agent.hostname, "os": agent.os,
                      "machine_id": agent.machine_id},
                agent_key=public_key_from_bytes(agent.identity_key),
                events=((r.seq, r.data) for r in self._store.events_by_seq(agent_id, first, end)),
                checkpoints=[c.envelope for c in checkpoints if c.seq <= end],
                server_key=self._key, codec=ProtoEventCodec(), start_seq=start_seq,
                start_head=start_head, files=files, custody=custody, bundle_id=bundle_id,
                created_ns=now)
        except EvidenceError as e:
            self._admin.audit(actor, "create_bundle", agent_id, reason, f"failed: {e}")
            raise InvalidRequest(f"cannot build the bundle: {e}") from e
        self._admin.audit(actor, "create_bundle", agent_id, reason,
                          f"allowed: bundle {bundle_id}, {built.event_count} events, "
                          f"seq {built.first_seq}..{built.end_seq}")
        if self._cases is not None:
            sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
            self._cases.bundle_created(actor, request.case_id, bundle_id, sha256, agent_id,
                                       built.event_count)
        if built.end_seq < last_in_range:
            logger.warning("bundle %s stops at seq %d: later events are not yet covered by a "
                           "checkpoint", bundle_id, built.end_seq)
        return out, built

    def stream(self, actor: Actor, request: pb.CreateBundleRequest) -> Iterator[pb.BundleChunk]:
        path, built = self.create(actor, request)
        first = True
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield pb.BundleChunk(data=chunk, bundle_id=built.bundle_id if first else "")
                first = False
