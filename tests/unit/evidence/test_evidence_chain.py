"""Hash chain: continuity, exact gap rules, reordering, deletion, and agreement between the
incremental verifier, the bulk helper and a bare hashlib loop."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evidence.chain import GENESIS_HASH, ChainVerifier, chain_head, link, verify_chain
from evidence.errors import ChainError

EVENTS = [b"event-%d" % i for i in range(1, 11)]


def bare(events: list[bytes], head: bytes = GENESIS_HASH) -> bytes:
    for b in events:
        head = hashlib.sha256(head + b).digest()
    return head


def test_genesis_is_domain_separated_constant() -> None:
    assert GENESIS_HASH == hashlib.sha256(b"ringfence/chain/v1/genesis").digest()


def test_continuous_chain_matches_bare_loop() -> None:
    v = ChainVerifier()
    for seq, b in enumerate(EVENTS, start=1):
        assert v.feed(seq, b) == v.head
    assert v.seq == 10
    assert v.head == bare(EVENTS) == chain_head(EVENTS)
    assert verify_chain((s, b, None) for s, b in enumerate(EVENTS, start=1)) == (10, bare(EVENTS))


@given(st.lists(st.binary(max_size=64), max_size=30))
def test_bulk_and_incremental_agree(events: list[bytes]) -> None:
    v = ChainVerifier()
    for seq, b in enumerate(events, start=1):
        v.feed(seq, b)
    assert v.head == chain_head(events) == bare(events)


def test_link_is_sha256_of_concatenation() -> None:
    assert link(b"\x01" * 32, b"abc") == hashlib.sha256(b"\x01" * 32 + b"abc").digest()


def test_deletion_is_an_unexplained_jump() -> None:
    v = ChainVerifier()
    v.feed(1, b"a")
    v.feed(2, b"b")
    with pytest.raises(ChainError) as info:
        v.feed(4, b"d")
    assert info.value.seq == 4 and "unexplained jump from 2 to 4" in info.value.reason
    assert v.seq == 2  # state unchanged on error


@pytest.mark.parametrize("seq", [1, 2])
def test_reordering_or_replay_is_not_increasing(seq: int) -> None:
    v = ChainVerifier()
    v.feed(1, b"a")
    v.feed(2, b"b")
    with pytest.raises(ChainError, match="not increasing"):
        v.feed(seq, b"x")


def test_gap_event_naming_exact_range_is_legal() -> None:
    v = ChainVerifier()
    v.feed(1, b"a")
    head_before = v.head
    assert v.feed(5, b"gap 2..4", gap=(2, 4)) == link(head_before, b"gap 2..4")
    v.feed(6, b"f")
    assert v.seq == 6


@pytest.mark.parametrize("gap", [(2, 3), (3, 4), (1, 4), (2, 5), (4, 2)])
def test_gap_range_must_match_jump_exactly(gap: tuple[int, int]) -> None:
    v = ChainVerifier()
    v.feed(1, b"a")
    with pytest.raises(ChainError, match="skipped range is \\[2,4\\]"):
        v.feed(5, b"gap", gap=gap)


def test_gap_event_without_jump_is_illegal() -> None:
    v = ChainVerifier()
    v.feed(1, b"a")
    with pytest.raises(ChainError, match="no seqs were skipped"):
        v.feed(2, b"gap", gap=(2, 2))


def test_gap_at_chain_start_and_mid_chain_start() -> None:
    v = ChainVerifier()
    v.feed(4, b"gap", gap=(1, 3))
    head = v.head
    resumed = ChainVerifier(start_seq=4, start_head=head)
    resumed.feed(5, b"e")
    v.feed(5, b"e")
    assert resumed.head == v.head


def test_bulk_verify_reports_seq() -> None:
    with pytest.raises(ChainError) as info:
        verify_chain([(1, b"a", None), (3, b"c", None)])
    assert info.value.seq == 3


def test_fork_same_seq_different_bytes_gives_different_heads() -> None:
    a, b = ChainVerifier(), ChainVerifier()
    a.feed(1, b"x")
    b.feed(1, b"y")
    assert a.head != b.head


def test_bad_start_state_rejected() -> None:
    with pytest.raises(ValueError):
        ChainVerifier(start_head=b"short")
    with pytest.raises(ValueError):
        ChainVerifier(start_seq=-1)
