"""This collector process as one node of several sharing a store.

A node records which agent sessions it holds (with a heartbeat, so a dead node's sessions stop
counting as online), listens for commands and revocations stored by any node (PostgreSQL
LISTEN/NOTIFY through `Store.listen`) and delivers them when it holds the agent's session. With
SQLite there is one node and the same code runs without notifications. It decides nothing
about who may issue what (server.admin) and does not sign commands (server.commands).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

from collector.ingest import DecodedEvent
from collector.rpc import AgentSession, ControlPlane, SessionRegistry
from collector.store.base import (
    COMMANDS_CHANNEL,
    REVOCATIONS_CHANNEL,
    AgentRecord,
    Store,
    StoreError,
)
from proto import ringfence_pb2 as pb
from server.commands import CommandQueue

logger = logging.getLogger(__name__)

NODE_HEARTBEAT_S = 5.0
# A node whose heartbeat is older than this is dead: its sessions are not online.
NODE_STALE_S = 3 * NODE_HEARTBEAT_S


def new_node_id() -> str:
    """host-pid-random: readable in `hosts` output, unique per process start."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ClusterSessions(SessionRegistry):
    """The live sessions of this node, and `online()` across every live node of the store."""

    def __init__(self, store: Store, node_id: str, stale_s: float = NODE_STALE_S) -> None:
        super().__init__()
        self._store = store
        self.node_id = node_id
        self._stale_ns = int(stale_s * 1e9)

    def local(self) -> set[str]:
        """Agents whose session this process holds."""
        return super().online()

    def online(self) -> set[str]:
        local = self.local()
        try:
            remote = self._store.session_owners(time.time_ns() - self._stale_ns)
        except StoreError as e:
            # Say so rather than show every agent of other nodes as offline without a word.
            logger.warning("cannot read session owners from the store (%s); showing only the "
                           "sessions of this node", e)
            return local
        return local | set(remote)


class _OwnershipControlPlane:
    """Records session ownership in the store around the server's control plane."""

    def __init__(self, inner: ControlPlane, store: Store, sessions: ClusterSessions) -> None:
        self._inner = inner
        self._store = store
        self._sessions = sessions

    def agent_connected(self, agent: AgentRecord, hello: pb.Hello, session: AgentSession) -> None:
        self._store.claim_session(agent.agent_id, self._sessions.node_id, time.time_ns())
        self._inner.agent_connected(agent, hello, session)

    def agent_disconnected(self, agent_id: str, session: AgentSession) -> None:
        self._inner.agent_disconnected(agent_id, session)
        if self._sessions.get(agent_id) is not None:
            return      # a newer session of the agent on this node still owns it
        try:
            self._store.release_session(agent_id, self._sessions.node_id)
        except StoreError as e:
            # The row goes stale with this node's heartbeat if the store stays down.
            logger.warning("could not record that agent %s left this node: %s", agent_id, e)

    def events_stored(self, agent_id: str, events: list[DecodedEvent]) -> None:
        self._inner.events_stored(agent_id, events)

    def hold_ingest_s(self, agent_id: str) -> float:
        return self._inner.hold_ingest_s(agent_id)

    def command_result(self, agent_id: str, result: pb.CommandResult) -> None:
        self._inner.command_result(agent_id, result)

    def file_chunk(self, agent_id: str, chunk: pb.FileChunk) -> None:
        self._inner.file_chunk(agent_id, chunk)


class ClusterNode:
    """Heartbeat and notification threads of one node; they end when `stopped` is set."""

    def __init__(self, store: Store, sessions: ClusterSessions, commands: CommandQueue,
                 stopped: threading.Event, heartbeat_s: float = NODE_HEARTBEAT_S) -> None:
        self._store = store
        self._sessions = sessions
        self._commands = commands
        self._stopped = stopped
        self._heartbeat_s = heartbeat_s
        self.node_id = sessions.node_id
        self.listening = threading.Event()

    def control_plane(self, inner: ControlPlane) -> ControlPlane:
        return _OwnershipControlPlane(inner, self._store, self._sessions)

    def start(self) -> None:
        self._store.node_heartbeat(self.node_id, time.time_ns())
        threading.Thread(target=self._heartbeat, name="node-heartbeat", daemon=True).start()
        threading.Thread(target=self._listen, name="node-listen", daemon=True).start()
        logger.info("collector node %s started", self.node_id)

    def _heartbeat(self) -> None:
        while not self._stopped.wait(self._heartbeat_s):
            try:
                self._store.node_heartbeat(self.node_id, time.time_ns())
            except StoreError as e:
                if self._stopped.is_set():
                    return
                logger.warning("node heartbeat failed (%s): other nodes will see this node's "
                               "agents as offline until it recovers", e)

    def _listen(self) -> None:
        if not self._store.listen(self.on_notify, self._stopped):
            logger.info("this store has no cross-node notifications: single-node mode")

    def on_notify(self, channel: str, agent_id: str) -> None:
        """A notification from any node: deliver or revoke if we hold the agent's session."""
        if channel == COMMANDS_CHANNEL and agent_id == "":
            # (Re)connected to the notification channel: anything may have been missed.
            self.listening.set()
            for held in self._sessions.local():
                self._commands.deliver(held)
            return
        session = self._sessions.get(agent_id)
        if session is None:
            return
        if channel == COMMANDS_CHANNEL:
            self._commands.deliver(agent_id)
        elif channel == REVOCATIONS_CHANNEL:
            logger.warning("agent %s was revoked (through another node); closing its session",
                           agent_id)
            session.revoke()
