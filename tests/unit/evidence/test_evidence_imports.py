"""The evidence package depends on the standard library and `cryptography` only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import evidence

ALLOWED_THIRD_PARTY = {"cryptography"}


def test_evidence_imports_only_stdlib_and_cryptography() -> None:
    package = Path(evidence.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                if root != "evidence" and root not in sys.stdlib_module_names \
                        and root not in ALLOWED_THIRD_PARTY:
                    offenders.append(f"{path.name}: {root}")
    assert offenders == []
    assert list(package.rglob("*.py")), "the scan must see the package's modules"
