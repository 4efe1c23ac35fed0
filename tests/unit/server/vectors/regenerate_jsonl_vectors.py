"""Regenerate jsonl_rendering.json: the events.jsonl lines for jsonl_samples.samples().

Bundles already issued carry events.jsonl lines rendered by this code; the verifier regenerates
them byte for byte, so changing a line breaks verification of every existing bundle. Run this
only for a deliberate, versioned format change:
    .venv/bin/python tests/unit/server/vectors/regenerate_jsonl_vectors.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[3])]

from jsonl_samples import AGENT, samples

from evidence.bundle import render_line
from server.codec import ProtoEventCodec


def main() -> None:
    codec = ProtoEventCodec()
    cases = []
    for event in samples():
        data = event.SerializeToString(deterministic=True)
        cases.append({"event_hex": data.hex(), "line": render_line(codec, data).decode("ascii")})
    out = {"agent_id": AGENT, "cases": cases}
    (HERE / "jsonl_rendering.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
