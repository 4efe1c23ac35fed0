"""Build the release artifacts into a dist directory (`make package` runs this).

    python packaging/build.py --dist dist [--release-key KEY] [--version V]

1. build/gen/ringfence_build_info.py (version, commit, build time, Python);
2. PyInstaller: one-file `ringfence-agent`, one-dir `ringfence` (server + CLI);
3. ringfence-agent_V_amd64.deb and ringfence-server_V_amd64.deb (dpkg-deb, root-owned files,
   mtimes clamped to SOURCE_DATE_EPOCH);
4. a detached DSSE signature FILE.dsse.json per artifact (binary and .debs) made with the release
   key (generated into build/release-key/ when none is given, and said so), release.pub, and
   SHA256SUMS over every file in the dist directory.

Reproducibility: SOURCE_DATE_EPOCH defaults to the last commit's time and PYTHONHASHSEED is 0 for
PyInstaller; build-time paths are the only known remaining difference between machines.
Needs dpkg-deb, patchelf and the project's venv (pyinstaller); prints each step's duration.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
BUILD = REPO / "build"
VENV_BIN = Path(sys.executable).parent
UNITS = {"ringfence-agent": ["ringfence-agent.service", "ringfence-isolation.service"],
         "ringfence-server": ["ringfence-server.service"]}


class BuildError(Exception):
    """A build step failed; the message names the step and what to do."""


def step(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    started = time.monotonic()
    result = subprocess.run(argv, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{name} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                         f"{result.stderr[-4000:]}")
    print(f"  {name}: {time.monotonic() - started:.1f} s", flush=True)


def step_quiet(argv: list[str]) -> None:
    result = subprocess.run(argv, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def source_date_epoch() -> int:
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    out = subprocess.run(["git", "log", "-1", "--format=%ct"], check=False, cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    return int(out or 0)


def pyinstaller(spec: str, env: dict[str, str]) -> None:
    step(f"pyinstaller {spec}", [str(VENV_BIN / "pyinstaller"), "--noconfirm", "--clean",
                                 "--log-level", "WARN", "--workpath", str(BUILD / "pyinstaller"),
                                 "--distpath", str(BUILD / "dist"), str(PACKAGING / spec)],
         env)


def install(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def gz(text: bytes, dst: Path, epoch: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=epoch,
                                              compresslevel=9) as f:
        f.write(text)
    dst.chmod(0o644)


def stage_common(root: Path, package: str, version: str, epoch: int) -> None:
    doc = root / "usr/share/doc" / package
    install(PACKAGING / "deb/copyright", doc / "copyright", 0o644)
    install(REPO / "docs/deployment.md", doc / "deployment.md", 0o644)
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(epoch))
    gz((f"{package} ({version}) unstable; urgency=medium\n\n  * Release {version}.\n\n"
        f" -- ringfence maintainers <ringfence@example.org>  {stamp}\n").encode(),
       doc / "changelog.gz", epoch)
    for unit in UNITS[package]:
        install(PACKAGING / "systemd" / unit, root / "lib/systemd/system" / unit, 0o644)
    debian = root / "DEBIAN"
    for script in ("postinst", "prerm", "postrm"):
        install(PACKAGING / "deb" / package / script, debian / script, 0o755)
    if (PACKAGING / "deb" / package / "conffiles").exists():
        install(PACKAGING / "deb" / package / "conffiles", debian / "conffiles", 0o644)


def finish_deb(root: Path, package: str, version: str, epoch: int, out: Path) -> Path:
    size_kib = 0
    md5 = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == "DEBIAN":
            continue
        if path.is_file() and not path.is_symlink():
            size_kib += (path.stat().st_size + 1023) // 1024
            md5.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
    control = (PACKAGING / "deb" / package / "control").read_text()
    control = control.replace("@VERSION@", version).replace("@INSTALLED_SIZE@", str(size_kib))
    (root / "DEBIAN/control").write_text(control)
    (root / "DEBIAN/md5sums").write_text("".join(md5))
    for path in [root, *root.rglob("*")]:
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    deb = out / f"{package}_{version}_amd64.deb"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    step(f"dpkg-deb {deb.name}", ["dpkg-deb", "--root-owner-group", "-Zxz", "--build",
                                  str(root), str(deb)], env)
    return deb


def build_agent_deb(version: str, epoch: int, out: Path) -> Path:
    root = BUILD / "deb" / "ringfence-agent"
    shutil.rmtree(root, ignore_errors=True)
    install(BUILD / "dist/ringfence-agent", root / "usr/bin/ringfence-agent", 0o755)
    install(PACKAGING / "deb/ringfence-agent/agent.toml", root / "etc/ringfence/agent.toml",
            0o644)
    state = root / "var/lib/ringfence"
    state.mkdir(parents=True)
    state.chmod(0o700)
    stage_common(root, "ringfence-agent", version, epoch)
    return finish_deb(root, "ringfence-agent", version, epoch, out)


def build_server_deb(version: str, epoch: int, out: Path) -> Path:
    root = BUILD / "deb" / "ringfence-server"
    shutil.rmtree(root, ignore_errors=True)
    lib = root / "usr/lib/ringfence-server"
    shutil.copytree(BUILD / "dist/ringfence-server", lib, symlinks=True)
    for path in lib.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o755 if path == lib / "ringfence" else 0o644)
            if path.suffix == ".so" or ".so." in path.name:
                # The build interpreter's RUNPATH (e.g. /root/.pyenv/...) means nothing on a
                # target host and would let a directory there inject libraries: drop it.
                step_quiet(["patchelf", "--remove-rpath", str(path)])
        elif path.is_dir():
            path.chmod(0o755)
    install(PACKAGING / "deb/ringfence-server/lintian-overrides",
            root / "usr/share/lintian/overrides/ringfence-server", 0o644)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/ringfence").symlink_to("../lib/ringfence-server/ringfence")
    data = root / "var/lib/ringfence-server"
    data.mkdir(parents=True)
    data.chmod(0o700)
    stage_common(root, "ringfence-server", version, epoch)
    return finish_deb(root, "ringfence-server", version, epoch, out)


def release_key(given: str | None) -> Path:
    if given:
        key = Path(given)
        if not key.is_file():
            raise BuildError(f"RELEASE_KEY {key} does not exist")
        return key
    key = BUILD / "release-key" / "release.key"
    if not key.exists():
        step("release key", [str(VENV_BIN / "ringfence"), "release-key", "create", "--out",
                             str(key.parent)])
        print(f"  generated a release key: {key} (development builds only; pass "
              "RELEASE_KEY=... for a release, and never commit it)")
    else:
        print(f"  release key: {key} (generated earlier; pass RELEASE_KEY=... for a release)")
    return key


def write_public_key(private: Path, out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from evidence.keys import load_private_key, save_public_key

    target = out / "release.pub"
    target.unlink(missing_ok=True)
    save_public_key(load_private_key(private).public_key(), target)
    target.chmod(0o644)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default="dist")
    parser.add_argument("--release-key", help="Ed25519 release private key (PEM)")
    parser.add_argument("--version", help="package version (default: agent.__version__)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from agent import __version__

    version = args.version or __version__
    epoch = source_date_epoch()
    out = (REPO / args.dist).resolve()
    started = time.monotonic()
    print(f"building ringfence {version} (SOURCE_DATE_EPOCH={epoch}) into {out}", flush=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
    try:
        step("build info", [sys.executable, str(PACKAGING / "gen_build_info.py"),
                            str(BUILD / "gen")], env)
        pyinstaller("ringfence-agent.spec", env)
        pyinstaller("ringfence-server.spec", env)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        binary = out / "ringfence-agent"
        install(BUILD / "dist/ringfence-agent", binary, 0o755)
        artifacts = [binary, build_agent_deb(version, epoch, out),
                     build_server_deb(version, epoch, out)]
        key = release_key(args.release_key)
        write_public_key(key, out)
        step("sign artifacts", [str(VENV_BIN / "ringfence"), "sign-artifact", "--key", str(key),
                                *map(str, artifacts)])
    except BuildError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                   for p in sorted(out.iterdir()) if p.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text(sums)
    print(f"built in {time.monotonic() - started:.0f} s:")
    for path in sorted(out.iterdir()):
        print(f"  {path.stat().st_size:>12,d}  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
