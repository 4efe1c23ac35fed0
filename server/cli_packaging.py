"""`ringfence` commands for fleet admins shipping the agent: enrollment packages, release keys,
and signed release artifacts.

- `enroll-package create` issues a token and writes it, the fleet CA and the enrollment
  address(es) into one 0600 file for `ringfence-agent enroll --package`.
- `release-key create`, `sign-artifact` and `verify-artifact` sign and check release files
  (binary, .debs) with detached DSSE envelopes of type ARTIFACT_TYPE whose payload names the
  file, its SHA-256 and size. Verification checks the signature by a pinned key first, then
  the type, then the statement against the file, and raises on any mismatch.

The format logic is pure (`artifact_statement`, `verify_artifact`); the command functions do the
IO. Registered into the main parser by `register`; it holds no server state of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.enroll_package import EnrollPackage, write_package
from collector.store.sqlite import SQLiteStore
from evidence.dsse import sign_envelope, verify_envelope
from evidence.errors import FormatError, IntegrityError
from evidence.keys import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from server.fleet import create_token, load_config, parse_duration, token_id
from server.pki import ServerPaths

ARTIFACT_TYPE = "application/vnd.ringfence.artifact.v1+json"
SIGNATURE_SUFFIX = ".dsse.json"
_CHUNK = 1 << 20


class ArtifactMismatch(IntegrityError):
    """A correctly signed statement does not describe this file (name, size or digest)."""

    def __init__(self, field: str, signed: object, actual: object) -> None:
        super().__init__(f"the signature is for a different file: signed {field} {signed!r}, "
                         f"this file has {actual!r}")
        self.field = field


@dataclass(frozen=True)
class ArtifactStatement:
    name: str
    sha256: str
    size: int

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "sha256": self.sha256, "size": self.size},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> ArtifactStatement:
        try:
            raw = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as e:
            raise FormatError(f"artifact statement is not JSON: {e}") from e
        if not isinstance(raw, dict) or set(raw) != {"name", "sha256", "size"}:
            raise FormatError("artifact statement must hold exactly name, sha256 and size")
        name, digest, size = raw["name"], raw["sha256"], raw["size"]
        if (not isinstance(name, str) or not isinstance(digest, str) or len(digest) != 64
                or not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise FormatError("artifact statement fields have the wrong types")
        return cls(name, digest, size)


def artifact_statement(path: Path) -> ArtifactStatement:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return ArtifactStatement(path.name, digest.hexdigest(), size)


def verify_artifact(path: Path, envelope: bytes,
                    trusted: list[Ed25519PublicKey]) -> ArtifactStatement:
    """Verify `envelope` by a `trusted` key, then that its statement describes `path`.

    Raises TrustError (no keys), SignatureError, PayloadTypeError, FormatError or
    ArtifactMismatch; returns the verified statement.
    """
    verified = verify_envelope(envelope, ARTIFACT_TYPE, trusted)
    signed = ArtifactStatement.from_json(verified.payload)
    actual = artifact_statement(path)
    for field in ("name", "size", "sha256"):
        if getattr(signed, field) != getattr(actual, field):
            raise ArtifactMismatch(field, getattr(signed, field), getattr(actual, field))
    return signed


# -- commands ------------------------------------------------------------------------------------

def cmd_enroll_package_create(args: argparse.Namespace) -> int:
    from server.cli import CLIError

    paths = ServerPaths(Path(args.data_dir))
    fleet = load_config(paths)
    servers = tuple(args.server or (f"[{a}]:{fleet.enroll_port}" if ":" in a
                                    else f"{a}:{fleet.enroll_port}" for a in fleet.addresses))
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CLIError(f"{out} exists; remove it or pass --force (the old package's token "
                       "stays valid until it expires or is revoked)")
    ttl_s = parse_duration(args.ttl)
    store = SQLiteStore(paths.database)
    try:
        token = create_token(store, uses=args.token_uses, ttl_s=ttl_s)
    finally:
        store.close()
    package = EnrollPackage(servers, paths.ca_cert.read_bytes(), token, args.tls_name,
                            time.time_ns() + ttl_s * 1_000_000_000)
    write_package(out, package)
    print(f"enrollment package {out} (mode 0600): servers {', '.join(servers)}; token id "
          f"{token_id(token)}, {args.token_uses} use(s), expires in {args.ttl} (revoke with "
          f"`ringfence token revoke {token_id(token)} --data-dir {args.data_dir}`)")
    return 0


def cmd_release_key_create(args: argparse.Namespace) -> int:
    from server.cli import CLIError

    out = Path(args.out)
    private, public = out / "release.key", out / "release.pub"
    if private.exists():
        raise CLIError(f"{private} exists; refusing to overwrite a release key")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_private_key()
    save_private_key(key, private)
    save_public_key(key.public_key(), public)
    print(f"release key {key_id(key.public_key())}: private {private} (keep it secret, never "
          f"commit it), public {public} (publish it; verifiers pass it as --trust)")
    return 0


def cmd_sign_artifact(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    for name in args.files:
        path = Path(name)
        statement = artifact_statement(path)
        signature = path.with_name(path.name + SIGNATURE_SUFFIX)
        signature.write_bytes(sign_envelope(ARTIFACT_TYPE, statement.to_json(), key))
        print(f"signed {path.name} (sha256 {statement.sha256}, {statement.size} bytes) -> "
              f"{signature}")
    return 0


def cmd_verify_artifact(args: argparse.Namespace) -> int:
    from server.cli import CLIError

    if not args.trust:
        raise CLIError("pin at least one release public key with --trust KEY.pub")
    path = Path(args.file)
    signature = Path(args.signature or str(path) + SIGNATURE_SUFFIX)
    try:
        envelope = signature.read_bytes()
    except FileNotFoundError as e:
        raise CLIError(f"{signature}: no such signature file (pass --signature FILE)") from e
    trusted = [load_public_key(k) for k in args.trust]
    statement = verify_artifact(path, envelope, trusted)
    print(f"OK: {statement.name} (sha256 {statement.sha256}, {statement.size} bytes) is "
          "signed by a trusted release key")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the packaging commands to the `ringfence` parser's subcommands."""
    package = sub.add_parser("enroll-package", help="enrollment packages for agents").add_subparsers(
        dest="enroll_package_command", required=True)
    p = package.add_parser("create", help="issue a token and write it with the CA and server "
                           "address(es) into one 0600 file for `ringfence-agent enroll "
                           "--package`")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, help="file to write (mode 0600)")
    p.add_argument("--token-uses", type=int, default=1,
                   help="how many agents the package may enroll (default 1)")
    p.add_argument("--ttl", default="24h", help="token lifetime, e.g. 30m, 24h, 7d")
    p.add_argument("--server", action="append",
                   help="enrollment HOST:PORT agents use (repeatable; default: the addresses "
                        "given to `server init` with the enrollment port)")
    p.add_argument("--tls-name", help="name in the server certificate, if not the HOST")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=cmd_enroll_package_create)

    key = sub.add_parser("release-key", help="release signing keys").add_subparsers(
        dest="release_key_command", required=True)
    p = key.add_parser("create", help="generate an Ed25519 release key (release.key/.pub)")
    p.add_argument("--out", required=True, help="directory for release.key and release.pub")
    p.set_defaults(func=cmd_release_key_create)

    p = sub.add_parser("sign-artifact", help="write FILE.dsse.json: a DSSE signature of a "
                       "release artifact's name, SHA-256 and size")
    p.add_argument("files", nargs="+")
    p.add_argument("--key", required=True, help="release private key (PEM)")
    p.set_defaults(func=cmd_sign_artifact)

    p = sub.add_parser("verify-artifact", help="verify a release artifact against its DSSE "
                       "signature and a pinned release key")
    p.add_argument("file")
    p.add_argument("--signature", help=f"signature file (default FILE{SIGNATURE_SUFFIX})")
    p.add_argument("--trust", action="append", help="release public key (PEM), repeatable")
    p.set_defaults(func=cmd_verify_artifact)


__all__ = ["ARTIFACT_TYPE", "ArtifactMismatch", "ArtifactStatement", "artifact_statement",
           "register", "verify_artifact"]
