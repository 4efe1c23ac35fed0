"""The committed generated modules are exactly what `make proto` produces from the .proto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
GENERATED = ("ringfence_pb2.py", "ringfence_pb2.pyi", "ringfence_pb2_grpc.py",
             "ringfence_pb2_grpc.pyi")


def test_generated_code_matches_the_contract(tmp_path: Path) -> None:
    (tmp_path / "proto").mkdir()
    shutil.copy(REPO / "proto" / "ringfence.proto", tmp_path / "proto" / "ringfence.proto")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--grpc_python_out=.", "--mypy_out=.", "--mypy_grpc_out=.",
                    "proto/ringfence.proto"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    stale = [name for name in GENERATED
             if (tmp_path / "proto" / name).read_bytes() != (REPO / "proto" / name).read_bytes()]
    assert not stale, f"regenerate with `make proto` and commit: {stale} differ from the .proto"


def test_import_direction_contracts_hold() -> None:
    """DESIGN.md's dependency direction, checked by import-linter (contracts in pyproject)."""
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
