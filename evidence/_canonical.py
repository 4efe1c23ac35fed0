"""Canonical JSON encoding and strict decoding shared by every signed ringfence format.

Canonical means: sorted keys, no whitespace, ASCII-only output. Strict decoding rejects
duplicate keys, NaN/Infinity and non-object roots. It does not validate any schema.
"""

from __future__ import annotations

import json
from typing import Any

from evidence.errors import FormatError

ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                           allow_nan=False)
"""The canonical encoder; built once because json.dumps with options builds one per call."""


def dumps(obj: object) -> bytes:
    """Encode `obj` as canonical JSON bytes (sorted keys, compact, ASCII)."""
    return ENCODER.encode(obj).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise FormatError(f"non-finite JSON number {name}")


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Strictly decode `data` as one JSON object; raise FormatError naming `what` otherwise."""
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except FormatError as e:
        raise FormatError(f"{what}: {e.reason}") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{what}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: JSON root is not an object")
    return obj


def require_keys(obj: dict[str, Any], required: set[str], what: str,
                 optional: set[str] | None = None) -> None:
    """Raise FormatError unless `obj` has exactly the `required` keys (plus `optional`)."""
    missing = required - obj.keys()
    if missing:
        raise FormatError(f"{what}: missing field(s) {sorted(missing)}")
    extra = obj.keys() - required - (optional or set())
    if extra:
        raise FormatError(f"{what}: unknown field(s) {sorted(extra)}")


def get_int(obj: dict[str, Any], key: str, what: str, minimum: int | None = 0) -> int:
    """Return obj[key] as an int (bools rejected), at least `minimum` when given."""
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{what}: field {key!r} is not an integer")
    if minimum is not None and value < minimum:
        raise FormatError(f"{what}: field {key!r} is below {minimum}")
    return value


def get_str(obj: dict[str, Any], key: str, what: str, nonempty: bool = True) -> str:
    """Return obj[key] as a str, non-empty unless told otherwise."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{what}: field {key!r} is not a string")
    if nonempty and not value:
        raise FormatError(f"{what}: field {key!r} is empty")
    return value


_HEX = frozenset("0123456789abcdef")


def get_hex(obj: dict[str, Any], key: str, what: str, nbytes: int) -> bytes:
    """Return obj[key] decoded from lowercase hex of exactly `nbytes` bytes."""
    value = get_str(obj, key, what)
    if len(value) != 2 * nbytes or not set(value) <= _HEX:
        raise FormatError(f"{what}: field {key!r} is not {nbytes} bytes of lowercase hex")
    return bytes.fromhex(value)


def is_sha256_hex(value: str) -> bool:
    """True when `value` is 64 lowercase hex digits."""
    return len(value) == 64 and set(value) <= _HEX
