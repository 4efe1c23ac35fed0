"""Bundle build + offline verification, including the tamper matrix: every tampering must
fail and the report must name the member and the reason."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
from evidence_testkit import (
    AGENT_ID,
    FILE_CONTENT,
    JSONCodec,
    RenderFailsAt,
    acquisition,
    agent_key,
    frames_bytes,
    honest_chain,
    make_bundle,
    make_event,
    other_key,
    parse_frames,
    read_members,
    replace,
    resign,
    server_key,
    trust,
    write_members,
)

from evidence import bundle as bundle_module
from evidence.bundle import TrustSet, format_report, report_to_dicts, verify_bundle
from evidence.checkpoint import Checkpoint, sign_checkpoint
from evidence.errors import BundleBuildError, BundleVerificationError, TrustError

HONEST = make_bundle()
MEMBERS = [name for name, _ in read_members(HONEST)]
FILE_SHA = hashlib.sha256(FILE_CONTENT).hexdigest()


def verify(bundle: bytes, codec: Any = "json") -> Any:
    return verify_bundle(io.BytesIO(bundle), trust(), JSONCodec() if codec == "json" else codec)


def failures(bundle: bytes, codec: Any = "json") -> list[tuple[str, str]]:
    with pytest.raises(BundleVerificationError) as info:
        verify(bundle, codec)
    fails = [(c.member, c.reason) for c in info.value.report if not c.ok]
    assert fails, "a raised BundleVerificationError must name at least one failure"
    return fails


def assert_fails(bundle: bytes, member: str, reason: str, codec: Any = "json") -> None:
    fails = failures(bundle, codec)
    assert any(m == member and reason in r for m, r in fails), fails


# ----------------------------------------------------------------------------- honest bundles

def test_honest_bundle_verifies_with_full_report() -> None:
    verified = verify(HONEST)
    assert verified.event_count == 40 and verified.end_seq == 40
    assert [cp.seq for cp in verified.checkpoints] == [10, 20, 30, 40]
    assert verified.files[0].sha256 == FILE_SHA
    assert verified.codec_checked
    assert all(c.ok for c in verified.report)
    checked = {c.member for c in verified.report}
    assert set(MEMBERS) - {"manifest.json", "manifest.dsse.json"} - {
        f"files/{FILE_SHA}.acquisition.dsse.json"} <= checked
    text = format_report(verified.report)
    assert "FAIL" not in text and "events.bin" in text
    assert json.loads(json.dumps(report_to_dicts(verified.report)))[0]["ok"] is True


def test_member_order_is_deterministic_and_build_is_reproducible() -> None:
    assert MEMBERS == ["events.bin", "events.jsonl", "checkpoints/10.dsse.json",
                       "checkpoints/20.dsse.json", "checkpoints/30.dsse.json",
                       "checkpoints/40.dsse.json", f"files/{FILE_SHA}",
                       f"files/{FILE_SHA}.acquisition.dsse.json", "custody.jsonl",
                       "manifest.json", "manifest.dsse.json"]
    assert make_bundle() == HONEST
    with zipfile.ZipFile(io.BytesIO(HONEST)) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_bundle_with_gap_event_verifies() -> None:
    chain = honest_chain(30, every=10, gap_at=15)
    verified = verify(make_bundle(chain))
    assert verified.end_seq == 33 and verified.event_count == 30


def test_bundle_starting_mid_chain_verifies() -> None:
    chain = honest_chain(40, every=10)
    verified = verify(make_bundle(chain, events=chain.events[10:], start_seq=10,
                                  start_head=chain.heads[10]))
    assert verified.start_seq == 10 and verified.event_count == 30


def test_builder_trims_to_last_checkpoint(tmp_path: Path) -> None:
    chain = honest_chain(40, every=10)
    for seq in range(41, 46):  # five events after the last checkpoint
        chain.append(seq, make_event(seq))
    path = tmp_path / "b.zip"
    from evidence.bundle import build_bundle
    built = build_bundle(path, case_id="c", host={"agent_id": AGENT_ID},
                         agent_key=agent_key().public_key(), events=chain.events,
                         checkpoints=chain.checkpoints, server_key=server_key(),
                         codec=JSONCodec(), custody=[{"time_ns": 1, "actor": "a",
                                                      "action": "requested"}])
    assert built.end_seq == 40 and built.dropped_after_end
    assert verify_bundle(path, trust(), JSONCodec()).end_seq == 40


def test_builder_refuses_inconsistent_inputs_and_leaves_no_file(tmp_path: Path) -> None:
    chain = honest_chain(20, every=10)
    del chain.events[4]
    path = tmp_path / "b.zip"
    with pytest.raises(BundleBuildError, match="seq 6"):
        make_bundle(chain, events=chain.events)
    from evidence.bundle import build_bundle
    with pytest.raises(BundleBuildError):
        build_bundle(path, case_id="c", host={"agent_id": AGENT_ID},
                     agent_key=agent_key().public_key(), events=chain.events,
                     checkpoints=chain.checkpoints, server_key=server_key(), codec=JSONCodec(),
                     custody=[{"time_ns": 1, "actor": "a", "action": "requested"}])
    assert os.listdir(tmp_path) == []


def test_builder_refuses_file_whose_content_does_not_match() -> None:
    with pytest.raises(BundleBuildError, match="content has sha256"):
        make_bundle(files={FILE_SHA: (b"other content", acquisition(FILE_CONTENT))})


def test_builder_reads_file_content_from_path(tmp_path: Path) -> None:
    path = tmp_path / "evidence"
    path.write_bytes(FILE_CONTENT)
    bundle = make_bundle(files={FILE_SHA: (str(path), acquisition(FILE_CONTENT))})
    assert bundle == HONEST


def test_empty_trust_sets_fail_closed() -> None:
    with pytest.raises(TrustError):
        TrustSet.of([], [agent_key().public_key()])
    with pytest.raises(TrustError):
        TrustSet.of([server_key().public_key()], [])


def test_without_codec_honest_bundle_verifies_but_says_what_was_skipped() -> None:
    verified = verify(HONEST, codec=None)
    assert not verified.codec_checked
    assert any("no codec" in c.reason for c in verified.report)


def test_without_codec_gap_fails_closed() -> None:
    bundle = make_bundle(honest_chain(30, every=10, gap_at=15))
    assert_fails(bundle, "events.bin", "unexplained jump", codec=None)


# ----------------------------------------------------------------------------- tamper matrix

def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


@pytest.mark.parametrize("member", MEMBERS)
def test_flipped_byte_in_each_member_is_caught(member: str) -> None:
    members = read_members(HONEST)
    tampered = write_members(replace(members, member, _flip(dict(members)[member])))
    fails = failures(tampered)
    assert any(m == member for m, _ in fails), fails


def test_event_deleted() -> None:
    members = read_members(HONEST)
    frames = parse_frames(dict(members)["events.bin"])
    del frames[14]
    naive = replace(members, "events.bin", frames_bytes(frames))
    assert_fails(write_members(naive), "events.bin", "digest mismatch")

    def fix(m: dict[str, Any]) -> None:
        m["chain"]["event_count"] = 39
    assert_fails(write_members(resign(naive, fix)), "events.bin",
                 "chain break at seq 16: unexplained jump from 14 to 16")


def test_two_events_swapped() -> None:
    members = read_members(HONEST)
    frames = parse_frames(dict(members)["events.bin"])
    frames[4], frames[5] = frames[5], frames[4]
    tampered = resign(replace(members, "events.bin", frames_bytes(frames)))
    assert_fails(write_members(tampered), "events.bin", "chain break at seq 6")
    # Keep the framing seqs in order but swap the bytes: the codec sees the lie ...
    frames = parse_frames(dict(members)["events.bin"])
    swapped = [(frames[i][0], frames[j][1]) for i, j in enumerate(
        [0, 1, 2, 3, 5, 4] + list(range(6, len(frames))))]
    tampered = resign(replace(members, "events.bin", frames_bytes(swapped)))
    assert_fails(write_members(tampered), "events.bin", "framing says seq 5")
    # ... and without a codec the agent-signed checkpoint still does.
    assert_fails(write_members(tampered), "checkpoints/10.dsse.json", "head mismatch at seq 10",
                 codec=None)


def test_tail_truncated() -> None:
    members = read_members(HONEST)
    data = dict(members)["events.bin"]
    assert_fails(write_members(replace(members, "events.bin", data[:-5])), "events.bin",
                 "digest mismatch")
    assert_fails(write_members(resign(replace(members, "events.bin", data[:-5]))),
                 "events.bin", "truncated frame")
    frames = parse_frames(data)[:-3]

    def fix(m: dict[str, Any]) -> None:
        m["chain"]["end_seq"], m["chain"]["event_count"] = 37, 37
    body = [(n, d) for n, d in replace(members, "events.bin", frames_bytes(frames))
            if n != "checkpoints/40.dsse.json"]
    assert_fails(write_members(resign(body, fix)), "events.bin",
                 "last event (seq 37) is not covered by a checkpoint")


def test_event_from_another_host_inserted() -> None:
    members = read_members(HONEST)
    frames = parse_frames(dict(members)["events.bin"])
    frames[9] = (10, make_event(10, agent_id="agent-evil"))
    tampered = resign(replace(members, "events.bin", frames_bytes(frames)))
    assert_fails(write_members(tampered), "events.bin", "from agent 'agent-evil'")


def test_checkpoint_signed_by_another_key() -> None:
    members = read_members(HONEST)
    chain = honest_chain(40, every=10)
    forged = sign_checkpoint(Checkpoint(AGENT_ID, 10, chain.heads[10], 1), other_key())
    tampered = resign(replace(members, "checkpoints/10.dsse.json", forged))
    assert_fails(write_members(tampered), "checkpoints/10.dsse.json",
                 "signature by untrusted key")


def test_checkpoint_with_wrong_head_signed_by_agent_key() -> None:
    members = read_members(HONEST)
    lying = sign_checkpoint(Checkpoint(AGENT_ID, 20, b"\x00" * 32, 1), agent_key())
    tampered = resign(replace(members, "checkpoints/20.dsse.json", lying))
    assert_fails(write_members(tampered), "checkpoints/20.dsse.json", "head mismatch at seq 20")


def test_manifest_edited() -> None:
    members = read_members(HONEST)
    manifest = json.loads(dict(members)["manifest.json"])
    manifest["case_id"] = "case-43"
    edited = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert_fails(write_members(replace(members, "manifest.json", edited)), "manifest.json",
                 "does not match the server-signed manifest")


def test_manifest_start_head_edited_by_compromised_server() -> None:
    def fix(m: dict[str, Any]) -> None:
        m["chain"]["start_head"] = "11" * 32
    tampered = resign(read_members(HONEST), fix)
    assert_fails(write_members(tampered), "checkpoints/10.dsse.json", "head mismatch at seq 10")


def test_server_signature_removed() -> None:
    members = [(n, d) for n, d in read_members(HONEST) if n != "manifest.dsse.json"]
    assert_fails(write_members(members), "manifest.dsse.json", "missing")


def test_manifest_signed_by_unpinned_server_key() -> None:
    tampered = resign(read_members(HONEST), key=other_key())
    assert_fails(write_members(tampered), "manifest.dsse.json", "signature by untrusted key")


def test_agent_key_not_pinned() -> None:
    pinned = TrustSet.of([server_key().public_key()], [other_key().public_key()])
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(io.BytesIO(HONEST), pinned, JSONCodec())
    assert any(c.member == "manifest.json" and "not pinned" in c.reason
               for c in info.value.failures)


def test_collected_file_replaced() -> None:
    members = read_members(HONEST)
    name = f"files/{FILE_SHA}"
    naive = replace(members, name, b"innocent content\n")
    assert_fails(write_members(naive), name, "digest mismatch")
    assert_fails(write_members(resign(naive)), name, "does not match its name")


def test_acquisition_record_signed_by_another_key() -> None:
    name = f"files/{FILE_SHA}.acquisition.dsse.json"
    tampered = resign(replace(read_members(HONEST), name,
                              acquisition(FILE_CONTENT, key=other_key())))
    assert_fails(write_members(tampered), name, "signature by untrusted key")


def test_unlisted_member_added() -> None:
    members = read_members(HONEST) + [("files/notes.txt", b"hello")]
    assert_fails(write_members(members), "files/notes.txt", "not listed in the manifest")


def test_events_jsonl_rewritten_by_compromised_server() -> None:
    members = read_members(HONEST)
    lines = dict(members)["events.jsonl"].split(b"\n")
    lines[2] = lines[2].replace(b"event 3", b"event 9")
    tampered = resign(replace(members, "events.jsonl", b"\n".join(lines)))
    assert_fails(write_members(tampered), "events.jsonl", "first difference at line 3")


def test_custody_must_parse() -> None:
    tampered = resign(replace(read_members(HONEST), "custody.jsonl", b'{"actor":"x"}\n'))
    assert_fails(write_members(tampered), "custody.jsonl", "missing")


def test_not_a_zip() -> None:
    assert_fails(b"PK\x03\x04 definitely not a zip", "(container)", "not a readable ZIP")


def test_byte_flipped_in_raw_zip_without_fixing_crc() -> None:
    with zipfile.ZipFile(io.BytesIO(HONEST)) as zf:
        info = zf.getinfo("events.bin")
    # STORED: the member's bytes start right after the 30-byte local header and its name.
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    raw = bytearray(HONEST)
    raw[offset] ^= 0x01
    assert_fails(bytes(raw), "events.bin", "")


def test_frame_claiming_huge_length_is_a_framing_error() -> None:
    members = read_members(HONEST)
    data = dict(members)["events.bin"]
    tampered = resign(replace(members, "events.bin", data[:8] + b"\xff\xff\xff\xff" + data[12:]))
    assert_fails(write_members(tampered), "events.bin", "framing: event at seq 1 claims")


def test_iter_frames_reads_back_the_stored_bytes() -> None:
    from evidence.bundle import iter_frames
    with zipfile.ZipFile(io.BytesIO(HONEST)) as zf, zf.open("events.bin") as f:
        frames = list(iter_frames(f))
    chain = honest_chain(40, every=10)
    assert frames == chain.events


def test_fast_line_encoder_equals_the_canonical_encoder() -> None:
    from evidence import _canonical
    from evidence.bundle import _ENCODE_LINE

    samples: list[dict[str, Any]] = [
        {}, {"b": 1, "a": [1, 2.5, None, True, False]}, {"\u00e9\n\x00": "\u2603\"\\"},
        {"nested": {"z": {"y": [{"x": -0.0, "w": 1e300}]}}, "n": -(2 ** 70)},
    ]
    for obj in samples:
        assert _ENCODE_LINE(obj) == _canonical.ENCODER.encode(obj)
    for bad in ({"f": float("nan")}, {"k": object()}):
        with pytest.raises((ValueError, TypeError)):
            _ENCODE_LINE(bad)


# ------------------------------------------------- events.jsonl compared in the events.bin pass

def _jsonl_resigned(edit: Any) -> bytes:
    members = read_members(HONEST)
    return write_members(resign(replace(members, "events.jsonl",
                                        edit(dict(members)["events.jsonl"]))))


@pytest.mark.parametrize("chunk", [bundle_module._CHUNK, 7, 97, 1000])
def test_rendering_comparison_names_the_first_differing_line(
        chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_module, "_CHUNK", chunk)  # frames and lines split across reads
    assert verify(HONEST).event_count == 40

    def line(n: int) -> Any:
        def edit(data: bytes) -> bytes:
            lines = data.split(b"\n")
            lines[n - 1] = lines[n - 1].replace(b"event", b"EVENT")
            return b"\n".join(lines)
        return edit
    for n in (1, 17, 40):
        assert_fails(_jsonl_resigned(line(n)), "events.jsonl", f"first difference at line {n}")
    assert_fails(_jsonl_resigned(lambda d: d + b'{"extra":1}\n'), "events.jsonl",
                 "first difference at line 41")
    assert_fails(_jsonl_resigned(lambda d: d[:d.rindex(b"\n", 0, -1) + 1]), "events.jsonl",
                 "first difference at line 40")
    assert_fails(_jsonl_resigned(lambda d: b""), "events.jsonl", "first difference at line 1")


def test_codec_failure_leaves_the_rendering_uncompared() -> None:
    class Failing(JSONCodec):
        def render(self, event_bytes: bytes) -> dict[str, Any]:
            if b'"seq":7,' in event_bytes:
                raise ValueError("unrenderable")
            return super().render(event_bytes)
    fails = failures(HONEST, codec=Failing())
    assert ("events.bin", "event at seq 7 cannot be decoded: unrenderable") in fails
    assert ("events.jsonl", "not compared: events.bin could not be rendered") in fails


def test_unsafe_skip_rendering_checks_the_rest_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    forged = _jsonl_resigned(lambda d: d.replace(b"event 3", b"event 9"))
    verified = verify_bundle(io.BytesIO(forged), trust(), JSONCodec(),
                             unsafe_skip_rendering=True)
    assert any(c.member == "events.jsonl" and "NOT regenerated" in c.reason
               for c in verified.report)
    assert "unsafe_skip_rendering" in caplog.text
    # Everything else still counts: binding, chain and digests.
    members = read_members(HONEST)
    frames = parse_frames(dict(members)["events.bin"])
    frames[9] = (10, make_event(10, agent_id="agent-evil"))
    tampered = write_members(resign(replace(members, "events.bin", frames_bytes(frames))))
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(io.BytesIO(tampered), trust(), JSONCodec(), unsafe_skip_rendering=True)
    assert any(c.member == "events.bin" and "from agent 'agent-evil'" in c.reason
               for c in info.value.report if not c.ok)
    naive = write_members(replace(members, "events.jsonl", b"{}\n"))
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(io.BytesIO(naive), trust(), JSONCodec(), unsafe_skip_rendering=True)
    assert any(c.member == "events.jsonl" and "digest mismatch" in c.reason
               for c in info.value.report if not c.ok)


# ------------------------------------------------------- events.jsonl rendered by worker processes

def _report(bundle: bytes, codec: Any, workers: int) -> list[tuple[str, bool, str]]:
    try:
        verified = verify_bundle(io.BytesIO(bundle), trust(), codec, workers=workers)
    except BundleVerificationError as e:
        return [(c.member, c.ok, c.reason) for c in e.report]
    return [(c.member, c.ok, c.reason) for c in verified.report]


def _agent_swapped_at(seq: int) -> bytes:
    members = read_members(HONEST)
    frames = parse_frames(dict(members)["events.bin"])
    frames[seq - 1] = (seq, make_event(seq, agent_id="agent-evil"))
    return write_members(resign(replace(members, "events.bin", frames_bytes(frames))))


def _line_edited(n: int) -> bytes:
    def edit(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[n - 1] = lines[n - 1].replace(b"event", b"EVENT")
        return b"\n".join(lines)
    return _jsonl_resigned(edit)


@pytest.mark.parametrize("case", [
    "honest", "line 1", "line 33", "extra line", "render fails at 7",
    "render fails at 7, agent swapped at 10", "render fails at 12, agent swapped at 10",
    "render fails at 10, agent swapped at 10", "checkpoint head wrong, render fails at 20"])
def test_worker_processes_give_the_in_process_report(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_module, "_CHUNK", 150)  # several chunks in flight at once
    codec: Any = JSONCodec()
    bundle = HONEST
    if case.startswith("line"):
        bundle = _line_edited(int(case.split()[1]))
    elif case == "extra line":
        bundle = _jsonl_resigned(lambda d: d + b"{}\n")
    elif case.startswith("checkpoint head wrong"):
        codec = RenderFailsAt(20)
        members = read_members(HONEST)
        lying = sign_checkpoint(Checkpoint(AGENT_ID, 20, b"\x00" * 32, 1), agent_key())
        bundle = write_members(resign(replace(members, "checkpoints/20.dsse.json", lying)))
    elif case.startswith("render fails at"):
        codec = RenderFailsAt(int(case.split()[3].rstrip(",")))
        if "agent swapped" in case:
            bundle = _agent_swapped_at(10)
    expected = _report(bundle, codec, workers=1)
    assert _report(bundle, codec, workers=2) == expected
    assert all(ok for _, ok, _ in expected) == (case == "honest")


def test_unpicklable_codec_falls_back_to_in_process_rendering(
        caplog: pytest.LogCaptureFixture) -> None:
    class Local(JSONCodec):  # defined in a function: worker processes cannot import it
        pass
    assert _report(HONEST, Local(), workers=2) == _report(HONEST, JSONCodec(), workers=1)
    assert "verifying in-process" in caplog.text


def test_default_workers_follow_the_size_of_events_bin(monkeypatch: pytest.MonkeyPatch) -> None:
    with zipfile.ZipFile(io.BytesIO(HONEST)) as zf:
        assert bundle_module._render_workers(zf, None) == 1  # small: in-process
        assert bundle_module._render_workers(zf, 3) == 3
        monkeypatch.setattr(bundle_module, "PARALLEL_MIN_EVENT_BYTES", 0)
        assert 1 <= bundle_module._render_workers(zf, None) <= bundle_module.MAX_RENDER_WORKERS


def test_frozen_executables_render_in_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(bundle_module, "PARALLEL_MIN_EVENT_BYTES", 0)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with zipfile.ZipFile(io.BytesIO(HONEST)) as zf:
        assert bundle_module._render_workers(zf, None) == 1
        assert bundle_module._render_workers(zf, 2) == 2  # an explicit choice still counts
