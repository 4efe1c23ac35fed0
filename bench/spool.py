"""Spool append throughput against the floor of a bare buffered file write of the same bytes.

Prints one JSON object: records/s for `Spool.append` of 250-byte records with the default
fsync policy (background fsync every 0.5 s, included in the timed run through a final flush),
records/s of a plain buffered `write` loop writing the same frame bytes, and their ratio.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.spool import (
    HEADER_BYTES,
    RecordKind,
    Spool,
    SpoolConfig,
    SpoolRecord,
    encode_frame,
)

RECORDS = int(os.environ.get("RINGFENCE_BENCH_SPOOL_RECORDS", "200000"))
DATA_BYTES = 250


def records(n: int) -> list[SpoolRecord]:
    data = b"x" * DATA_BYTES
    return [
        SpoolRecord(RecordKind.EVENT, seq, seq.to_bytes(32, "big"), data) for seq in range(1, n + 1)
    ]


def bench_spool(recs: list[SpoolRecord], directory: Path) -> tuple[float, float]:
    sp = Spool(directory / "spool", SpoolConfig())
    try:
        append = sp.append
        t0 = time.perf_counter()
        for r in recs:
            append(r)
        t_append = time.perf_counter() - t0
        sp.flush()
        t_total = time.perf_counter() - t0
    finally:
        sp.close()
    return t_append, t_total


def bench_floor(recs: list[SpoolRecord], directory: Path) -> float:
    frames = [encode_frame(r) for r in recs]  # same bytes, prepared outside the timing
    with open(directory / "floor.bin", "wb") as f:
        write = f.write
        t0 = time.perf_counter()
        for fr in frames:
            write(fr)
        f.flush()
        os.fsync(f.fileno())
        return time.perf_counter() - t0


def main() -> None:
    recs = records(RECORDS)
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        d = Path(tmp)
        bench_floor(recs[:1000], d)  # warm-up
        t_append, t_total = bench_spool(recs, d)
        t_floor = bench_floor(recs, d)
    rate = RECORDS / t_total
    floor = RECORDS / t_floor
    print(
        json.dumps(
            {
                "bench": "spool.append",
                "records": RECORDS,
                "data_bytes": DATA_BYTES,
                "frame_bytes": DATA_BYTES + HEADER_BYTES,
                "append_records_per_s": round(RECORDS / t_append),
                "append_plus_final_fsync_records_per_s": round(rate),
                "append_us_per_record": round(t_append / RECORDS * 1e6, 3),
                "baseline_buffered_write_records_per_s": round(floor),
                "ratio_baseline_over_spool": round(floor / rate, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
