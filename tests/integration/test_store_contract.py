"""The Store contract, run against every backend: SQLite always, PostgreSQL (marked `postgres`)
in a throwaway schema. Each test states one behaviour both backends must share."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.store import open_store
from collector.store.base import (
    COMMANDS_CHANNEL,
    GENESIS_AUDIT,
    REVOCATIONS_CHANNEL,
    AgentRecord,
    ChainState,
    CheckpointRow,
    CommandRow,
    Conflict,
    EventRow,
    FileRow,
    IntegrityAlertRow,
    NotFound,
    ResponderRow,
    Store,
    StoreUnavailable,
    TokenRejected,
)
from collector.store.sqlite import token_digest
from server.admin import InvalidRequest, verify_audit
from tests.integration.pg import pg_schema

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "store.db")
    else:
        with pg_schema() as url:
            yield url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url, migrate=True)
    try:
        yield s
    finally:
        s.close()


def agent(agent_id: str = "a1", hostname: str = "web-01", enrolled_ns: int = T0) -> AgentRecord:
    return AgentRecord(agent_id=agent_id, hostname=hostname, os="Debian 12", kernel="6.1",
                       machine_id="m-" + agent_id, addresses=("192.0.2.1", "2001:db8::1"),
                       agent_version="0.1.0", identity_key=b"k" * 32,
                       cert_fingerprint="f" * 64, enrolled_ns=enrolled_ns)


def ev(seq: int, agent_id: str = "a1", kind: str = "process", time_ns: int | None = None,
       data: bytes | None = None) -> EventRow:
    return EventRow(agent_id, seq, T0 + seq * NS if time_ns is None else time_ns, kind,
                    data if data is not None else f"event-{seq}".encode(),
                    seq.to_bytes(32, "big"), T0)


def store_events(store: Store, seqs: range, agent_id: str = "a1", kind: str = "process") -> None:
    rows = [ev(s, agent_id, kind) for s in seqs]
    store.commit_batch(rows, [], [], [], ChainState(rows[-1].seq, rows[-1].chain_hash))


def command(seq: int, agent_id: str = "a1", command_id: str | None = None,
            expires_ns: int = T0 + 3600 * NS, status: str = "pending") -> CommandRow:
    return CommandRow(command_id or f"c-{agent_id}-{seq}", agent_id, seq, "isolate",
                      b"envelope-" + str(seq).encode(), status, "", "{}", T0, expires_ns, T0,
                      "alice", "IR-1")


# -- tokens --------------------------------------------------------------------------------------

def test_token_uses_expiry_and_revocation(store: Store) -> None:
    store.add_token(token_digest("two"), T0, T0 + 60 * NS, 2)
    store.consume_token(token_digest("two"), T0 + NS)
    store.consume_token(token_digest("two"), T0 + NS)
    with pytest.raises(TokenRejected) as used:
        store.consume_token(token_digest("two"), T0 + NS)
    assert used.value.reason == "token used up"
    store.add_token(token_digest("old"), T0, T0 + 60 * NS, 5)
    with pytest.raises(TokenRejected) as expired:
        store.consume_token(token_digest("old"), T0 + 60 * NS)
    assert expired.value.reason == "token expired"
    store.add_token(token_digest("rev"), T0, T0 + 60 * NS, 5)
    store.revoke_token(token_digest("rev"))
    with pytest.raises(TokenRejected) as revoked:
        store.consume_token(token_digest("rev"), T0)
    assert revoked.value.reason == "token revoked"
    with pytest.raises(TokenRejected) as unknown:
        store.consume_token(token_digest("nope"), T0)
    assert unknown.value.reason == "unknown token"
    with pytest.raises(NotFound):
        store.revoke_token(token_digest("nope"))


def test_revoke_token_by_id_needs_a_unique_hex_prefix(store: Store) -> None:
    h1, h2 = bytes.fromhex("ab" * 32), bytes.fromhex("abcd" + "00" * 30)
    store.add_token(h1, T0, T0 + 60 * NS, 1)
    store.add_token(h2, T0, T0 + 60 * NS, 1)
    with pytest.raises(NotFound, match="hex digits"):
        store.revoke_token_by_id("ab")  # too short: refused before matching
    with pytest.raises(NotFound, match="hex digits"):
        store.revoke_token_by_id("zz" * 4)
    with pytest.raises(NotFound, match="no token"):
        store.revoke_token_by_id("12345678")
    assert store.revoke_token_by_id("ABABABAB") == h1   # case-insensitive
    with pytest.raises(TokenRejected, match="revoked"):
        store.consume_token(h1, T0)
    store.consume_token(h2, T0)


def test_revoke_token_by_id_ambiguous_prefix(store: Store) -> None:
    store.add_token(bytes.fromhex("abcdef01" + "00" * 28), T0, T0 + NS, 1)
    store.add_token(bytes.fromhex("abcdef01" + "11" * 28), T0, T0 + NS, 1)
    with pytest.raises(NotFound, match="more than one"):
        store.revoke_token_by_id("abcdef01")
    assert store.revoke_token_by_id("abcdef0111") == bytes.fromhex("abcdef01" + "11" * 28)


# -- agents --------------------------------------------------------------------------------------

def test_agents_register_find_list(store: Store) -> None:
    store.register_agent(agent("a2", "web-02", T0 + 1))
    store.register_agent(agent("a1", "web-01"))
    store.register_agent(agent("a3", "Web-01", T0 + 2))
    got = store.get_agent("a1")
    assert got == agent("a1", "web-01")
    assert got is not None and got.addresses == ("192.0.2.1", "2001:db8::1")
    assert store.get_agent("missing") is None
    assert store.find_agent("a2").hostname == "web-02"
    assert store.find_agent("web-02").agent_id == "a2"
    with pytest.raises(NotFound, match="no host"):
        store.find_agent("db-01")
    # Byte order: upper case sorts before lower case on both backends.
    assert [a.agent_id for a in store.list_agents()] == ["a3", "a1", "a2"]
    with pytest.raises(StoreUnavailable):
        store.register_agent(agent("a1", "again"))
    assert store.get_agent("a1") == agent("a1", "web-01")


def test_find_agent_refuses_ambiguous_hostnames(store: Store) -> None:
    store.register_agent(agent("a1", "web"))
    store.register_agent(agent("a2", "web", T0 + 1))
    with pytest.raises(NotFound, match="ambiguous.*a1, a2"):
        store.find_agent("web")
    assert store.find_agent("a2").agent_id == "a2"


def test_agent_seen_isolation_and_revocation(store: Store) -> None:
    store.register_agent(agent())
    store.agent_seen("a1", T0 + 5, "0.2.0", {"process": "netlink", "file": "off"})
    store.agent_seen("a1", T0 + 9, None, None)
    a = store.get_agent("a1")
    assert a is not None
    assert (a.last_seen_ns, a.agent_version) == (T0 + 9, "0.2.0")
    assert a.sensors == {"file": "off", "process": "netlink"}
    store.set_isolation("a1", "isolated", "IR-7", T0 + 11)
    a = store.get_agent("a1")
    assert a is not None
    assert (a.isolation_state, a.isolation_reason, a.isolation_changed_ns) == (
        "isolated", "IR-7", T0 + 11)
    assert not a.revoked
    store.revoke_agent("a1")
    a = store.get_agent("a1")
    assert a is not None and a.revoked
    with pytest.raises(NotFound):
        store.revoke_agent("missing")


# -- evidence --------------------------------------------------------------------------------------

def test_chain_state_starts_empty_and_follows_batches(store: Store) -> None:
    with pytest.raises(NotFound):
        store.chain_state("a1")
    store.register_agent(agent())
    assert store.chain_state("a1") == ChainState(0, b"")
    store_events(store, range(1, 4))
    assert store.chain_state("a1") == ChainState(3, (3).to_bytes(32, "big"))
    assert store.stored_event("a1", 2) == ev(2)
    assert store.stored_event("a1", 4) is None


def test_commit_batch_is_atomic_on_a_duplicate_seq(store: Store) -> None:
    store.register_agent(agent())
    store_events(store, range(1, 4))
    checkpoint = CheckpointRow("a1", 5, b"h" * 32, T0, b"cp")
    alert = IntegrityAlertRow("a1", "gap", 5, "detail", T0)
    with pytest.raises(StoreUnavailable):
        store.commit_batch([ev(4), ev(5), ev(3, data=b"other")], [], [checkpoint], [alert],
                           ChainState(5, b"x" * 32))
    # Nothing of the failed batch was written: not the new events, not its checkpoint or alert,
    # and the chain state stands where it was.
    assert [r.seq for r in store.query_events("a1")] == [1, 2, 3]
    assert store.stored_event("a1", 3) == ev(3)
    assert store.checkpoints("a1") == []
    assert store.alerts("a1") == []
    assert store.chain_state("a1") == ChainState(3, (3).to_bytes(32, "big"))
    store.commit_batch([], [], [], [], ChainState(99, b""))   # empty: a no-op
    assert store.chain_state("a1").last_seq == 3


def test_commit_batch_keeps_forks_checkpoints_and_alerts(store: Store) -> None:
    store.register_agent(agent())
    store_events(store, range(1, 3))
    fork = ev(2, data=b"a different event 2")
    checkpoint = CheckpointRow("a1", 3, (3).to_bytes(32, "big"), T0 + 3, b"cp3")
    alerts = [IntegrityAlertRow("a1", "fork", 2, "second version", T0),
              IntegrityAlertRow("a1", "gap", 3, "missing", T0 + 1)]
    store.commit_batch([ev(3)], [fork], [checkpoint], alerts, ChainState(3, ev(3).chain_hash))
    assert store.forks("a1") == [fork]
    assert store.stored_event("a1", 2) == ev(2)        # the fork never overwrites
    assert store.checkpoints("a1") == [checkpoint]
    # A re-sent checkpoint for the same seq is ignored, not an error.
    store.commit_batch([], [], [CheckpointRow("a1", 3, b"z" * 32, T0, b"again")], [],
                       ChainState(3, ev(3).chain_hash))
    assert store.checkpoints("a1") == [checkpoint]
    assert store.alerts("a1") == alerts
    assert store.chain_state("a1") == ChainState(3, ev(3).chain_hash)


def test_queries_filter_and_page(store: Store) -> None:
    store.register_agent(agent())
    store.register_agent(agent("a2", "web-02"))
    rows = [ev(s, kind="network" if s % 3 == 0 else "process") for s in range(1, 5004)]
    store.commit_batch(rows, [], [], [], ChainState(5003, rows[-1].chain_hash))
    store_events(store, range(1, 3), agent_id="a2")
    assert [r.seq for r in store.query_events("a1", limit=3)] == [1, 2, 3]
    assert [r.seq for r in store.query_events("a1", kind="network", limit=3)] == [3, 6, 9]
    assert [r.seq for r in store.query_events("a1", after_seq=5001)] == [5002, 5003]
    assert [r.seq for r in store.query_events("a1", since_ns=T0 + 10 * NS,
                                              until_ns=T0 + 12 * NS)] == [10, 11, 12]
    assert [r.seq for r in store.query_events("a2")] == [1, 2]
    assert list(store.query_events("nobody")) == []
    prev = store.previous_event("a1", 100)
    assert prev is not None and prev.seq == 99
    assert store.previous_event("a1", 1) is None
    assert store.last_seq_in_range("a1") == 5003
    assert store.last_seq_in_range("a1", until_ns=T0 + 20 * NS) == 20
    assert store.last_seq_in_range("a1", since_ns=T0 + 9000 * NS) == 0
    # events_by_seq pages internally (5000 per page) and yields the exact range in order.
    assert [r.seq for r in store.events_by_seq("a1", 2, 5002)] == list(range(2, 5003))
    assert list(store.events_by_seq("a1", 6000, 7000)) == []
    assert next(iter(store.events_by_seq("a1", 4999, 5001))) == rows[4998]


def test_checkpoint_ranges(store: Store) -> None:
    store.register_agent(agent())
    cps = [CheckpointRow("a1", s, s.to_bytes(32, "big"), T0 + s, b"cp") for s in (10, 20, 30)]
    rows = [ev(s) for s in range(1, 31)]
    store.commit_batch(rows, [], cps, [], ChainState(30, rows[-1].chain_hash))
    assert store.checkpoints("a1") == cps
    assert store.checkpoints("a1", 11) == cps[1:]
    assert store.checkpoints("a1", 10, 20) == cps[:2]
    assert store.checkpoints("a2") == []


def test_alerts_and_counts(store: Store) -> None:
    store.register_agent(agent())
    store.register_agent(agent("a2", "web-02"))
    first = IntegrityAlertRow("a1", "bad_signature", 0, "acquisition record", T0)
    store.add_alert(first)
    store.add_alert(IntegrityAlertRow("a2", "gap", 7, "x", T0 + 1))
    store.add_alert(IntegrityAlertRow("a1", "fork", 3, "y", T0 + 2))
    assert store.alerts("a1") == [first, IntegrityAlertRow("a1", "fork", 3, "y", T0 + 2)]
    assert [a.agent_id for a in store.alerts()] == ["a1", "a2", "a1"]
    assert store.alert_counts() == {"a1": 2, "a2": 1}
    assert store.alerts("nobody") == []


# -- files -----------------------------------------------------------------------------------------

def test_files_are_kept_per_agent_and_command(store: Store) -> None:
    store.register_agent(agent())
    f1 = FileRow("a" * 64, 10, "a1", "c1", b"/etc/passwd", b"dsse1", T0 + 1)
    f2 = FileRow("b" * 64, 20, "a1", "c2", b"/tmp/x\xff", b"dsse2", T0 + 2)
    store.add_file(f2)
    store.add_file(f1)
    assert store.files_for("a1") == [f1, f2]
    again = FileRow("a" * 64, 10, "a1", "c1", b"/etc/passwd", b"dsse1b", T0 + 3)
    store.add_file(again)                      # same (agent, sha256, command): replaced
    assert store.files_for("a1") == [f2, again]
    assert store.files_for("a2") == []


# -- commands ------------------------------------------------------------------------------------

def test_commands_lifecycle(store: Store) -> None:
    store.register_agent(agent())
    assert store.next_command_seq("a1") == 1
    store.add_command(command(1))
    store.add_command(command(2, expires_ns=T0 + 10))
    store.add_command(command(3))
    assert store.next_command_seq("a1") == 4
    assert store.next_command_seq("a2") == 1
    assert store.get_command("c-a1-1") == command(1)
    with pytest.raises(NotFound):
        store.get_command("missing")
    store.update_command("c-a1-3", "succeeded", "isolated", '{"rules": 3}', T0 + 50)
    done = store.get_command("c-a1-3")
    assert (done.status, done.message, done.detail_json, done.updated_ns) == (
        "succeeded", "isolated", '{"rules": 3}', T0 + 50)
    # Open = unanswered and unexpired, oldest first; "sent" and "accepted" are still open.
    store.update_command("c-a1-1", "sent", "delivered", "{}", T0 + 1)
    assert [c.command_id for c in store.open_commands("a1", T0 + 100)] == ["c-a1-1"]
    assert [c.command_id for c in store.open_commands("a1", T0 + 5)] == ["c-a1-1", "c-a1-2"]


def test_a_taken_command_seq_is_a_conflict(store: Store) -> None:
    store.register_agent(agent())
    store.add_command(command(1))
    with pytest.raises(Conflict):
        store.add_command(command(1, command_id="other"))
    with pytest.raises(NotFound):
        store.get_command("other")


def test_concurrent_issuers_never_share_a_command_seq(store_url: str) -> None:
    """Several writers (threads here; with PostgreSQL also separate store instances, as
    separate collector nodes would be) take seqs with constraint + retry, no shared lock."""
    stores = [open_store(store_url, migrate=True) for _ in range(2)]
    try:
        stores[0].register_agent(agent())
        errors: list[BaseException] = []

        def issue(s: Store, worker: int) -> None:
            try:
                for i in range(10):
                    for _attempt in range(50):
                        seq = s.next_command_seq("a1")
                        try:
                            s.add_command(command(seq, command_id=f"w{worker}-{i}"))
                            break
                        except Conflict:
                            continue
                    else:
                        raise AssertionError("no free seq after 50 attempts")
            except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
                errors.append(e)

        threads = [threading.Thread(target=issue, args=(stores[w % 2], w)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        seqs = sorted(c.seq for c in stores[1].open_commands("a1", T0))
        assert seqs == list(range(1, 41))
    finally:
        for s in stores:
            s.close()


# -- responders and audit --------------------------------------------------------------------------

def test_responders(store: Store) -> None:
    alice = ResponderRow("alice", "responder", "1" * 64, T0)
    store.add_responder(alice)
    store.add_responder(ResponderRow("bob", "viewer", "2" * 64, T0, revoked=True))
    assert store.responder_by_fingerprint("1" * 64) == alice
    bob = store.responder_by_fingerprint("2" * 64)
    assert bob is not None and bob.revoked
    assert store.responder_by_fingerprint("3" * 64) is None
    assert [r.name for r in store.responders()] == ["alice", "bob"]
    with pytest.raises(StoreUnavailable):
        store.add_responder(ResponderRow("carol", "admin", "1" * 64, T0))


def test_audit_chain_and_head(store: Store) -> None:
    assert store.audit_head() is None
    assert store.audit_rows() == []
    first = store.append_audit(T0, "alice", "responder", "isolate", "a1", "IR-1", "allowed")
    second = store.append_audit(T0 + 1, "bob", "viewer", "isolate", "a1", "", "denied")
    assert (first.seq, first.prev_hash) == (1, GENESIS_AUDIT)
    assert (second.seq, second.prev_hash) == (2, first.hash)
    assert store.audit_rows() == [first, second]
    assert store.audit_head() == (2, second.hash)
    verify_audit(store.audit_rows(), store.audit_head())


def test_concurrent_audit_writers_never_fork_the_chain(store_url: str) -> None:
    stores = [open_store(store_url, migrate=True) for _ in range(2)]
    try:
        def write(s: Store, worker: int) -> None:
            for i in range(15):
                s.append_audit(time.time_ns(), f"r{worker}", "admin", "list_audit", "", "",
                               f"allowed {i}")

        threads = [threading.Thread(target=write, args=(stores[w % 2], w)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        rows = stores[0].audit_rows()
        assert [r.seq for r in rows] == list(range(1, 61))
        verify_audit(rows, stores[1].audit_head())
        # And tampering is still caught: dropping the last record breaks the head check.
        with pytest.raises(InvalidRequest, match="deleted from the end"):
            verify_audit(rows[:-1], stores[1].audit_head())
    finally:
        for s in stores:
            s.close()


# -- nodes and sessions ----------------------------------------------------------------------------

def test_session_ownership_follows_live_nodes(store: Store) -> None:
    store.node_heartbeat("node-a", T0 + 100)
    store.node_heartbeat("node-b", T0 + 10)
    store.claim_session("a1", "node-a", T0)
    store.claim_session("a2", "node-b", T0)
    assert store.session_owners(T0) == {"a1": "node-a", "a2": "node-b"}
    # node-b stopped heartbeating: its sessions are not online any more.
    assert store.session_owners(T0 + 50) == {"a1": "node-a"}
    # a2 reconnects to node-a; node-b's late disconnect must not erase the new owner.
    store.claim_session("a2", "node-a", T0 + 60)
    store.release_session("a2", "node-b")
    assert store.session_owners(T0 + 50) == {"a1": "node-a", "a2": "node-a"}
    store.release_session("a1", "node-a")
    assert store.session_owners(T0) == {"a2": "node-a"}
    store.node_heartbeat("node-b", T0 + 200)
    assert store.session_owners(T0 + 101) == {}


# -- PostgreSQL only -----------------------------------------------------------------------------

@pytest.mark.postgres
def test_postgresql_schema_is_versioned_and_required() -> None:
    from collector.store.postgresql import LATEST_VERSION, PostgreSQLStore

    with pg_schema() as url:
        with pytest.raises(StoreUnavailable, match="server migrate"):
            PostgreSQLStore(url)
        s = PostgreSQLStore(url, migrate=True)
        try:
            assert s.schema_version() == LATEST_VERSION
            assert s.migrate() == []          # idempotent
        finally:
            s.close()
        s2 = PostgreSQLStore(url)             # now migrated: opens without migrating
        s2.close()


@pytest.mark.postgres
def test_postgresql_store_down_is_store_unavailable() -> None:
    from collector.store.postgresql import PostgreSQLStore

    with pytest.raises(StoreUnavailable, match="cannot connect") as info:
        PostgreSQLStore("postgresql://postgres:s3cret@127.0.0.1:1/test")
    assert "s3cret" not in str(info.value)


@pytest.mark.postgres
def test_postgresql_stale_ingest_from_another_node_is_a_conflict() -> None:
    with pg_schema() as url:
        node_a, node_b = open_store(url, migrate=True), open_store(url)
        try:
            node_a.register_agent(agent())
            store_events(node_a, range(1, 11))
            # Node B verified 5..12 against a chain state read before node A's commit.
            rows = [ev(s) for s in range(5, 13)]
            with pytest.raises(Conflict, match="another node"):
                node_b.commit_batch(rows, [], [], [], ChainState(12, rows[-1].chain_hash))
            assert [r.seq for r in node_b.query_events("a1")] == list(range(1, 11))
            assert node_b.chain_state("a1").last_seq == 10
            # A stale batch without new events (a fork, a re-sent checkpoint) never moves the
            # chain back to the state that node read.
            node_b.commit_batch([], [ev(3, data=b"other")], [CheckpointRow(
                "a1", 4, (4).to_bytes(32, "big"), T0, b"cp")], [], ChainState(4, b"stale"))
            assert node_b.chain_state("a1") == ChainState(10, (10).to_bytes(32, "big"))
            assert len(node_b.forks("a1")) == 1
        finally:
            node_a.close()
            node_b.close()


@pytest.mark.postgres
def test_postgresql_notifies_other_nodes_of_commands_and_revocations() -> None:
    with pg_schema() as url:
        node_a, node_b = open_store(url, migrate=True), open_store(url)
        heard: list[tuple[str, str]] = []
        ready = threading.Event()
        stop = threading.Event()

        def on_notify(channel: str, agent_id: str) -> None:
            if agent_id == "":
                ready.set()
            else:
                heard.append((channel, agent_id))

        listener = threading.Thread(target=node_a.listen, args=(on_notify, stop))
        listener.start()
        try:
            assert ready.wait(10)
            node_b.register_agent(agent())
            node_b.add_command(command(1))
            node_b.revoke_agent("a1")
            deadline = time.monotonic() + 10
            while len(heard) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert heard == [(COMMANDS_CHANNEL, "a1"), (REVOCATIONS_CHANNEL, "a1")]
        finally:
            stop.set()
            listener.join(10)
            node_a.close()
            node_b.close()
        assert not listener.is_alive()
