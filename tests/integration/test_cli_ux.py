"""The responder CLI's polish against a real server and agent: --json everywhere it matters,
CSV and Timesketch exports, `events --follow`, exit statuses, --version, JSON logs and shell
completion."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import uuid
from pathlib import Path

from server.cli_ux import (
    CSV_COLUMNS,
    EXIT_DENIED,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from tests.integration.fleet import (
    BIN,
    REPO,
    agent_config,
    cli,
    quiet_sensors,
    running_agent,
    running_fleet,
    wait_for,
)


def test_exports_follow_json_and_exit_codes(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        data = str(fleet.data_dir)
        config = agent_config(tmp_path / "agent", quiet_sensors(process="psutil"))
        with running_agent(config) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            wait_for(lambda: fleet.store.chain_state(agent.agent_id).last_seq >= 1,
                     what="first events stored")
            hosts = json.loads(cli("hosts", "--data-dir", data, "--json").stdout)
            assert hosts[0]["agent_id"] == enrollment.agent_id
            table = cli("hosts", "--data-dir", data).stdout.splitlines()
            assert table[0].split()[:3] == ["HOSTNAME", "AGENT", "ID"]
            assert enrollment.agent_id in table[1]

            rows = list(csv.reader(io.StringIO(cli(
                "events", enrollment.agent_id, "--data-dir", data, "--format", "csv",
                "--kind", "lifecycle").stdout)))
            assert tuple(rows[0]) == CSV_COLUMNS
            assert rows[1][4] == "lifecycle" and rows[1][1] == "1"
            assert len(rows[1][7]) == 64  # chain hash hex

            out = tmp_path / "timeline.jsonl"
            result = json.loads(cli("timeline", enrollment.agent_id, "-o", str(out),
                                    "--data-dir", data, "--json").stdout)
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            assert result["events"] == len(lines) >= 1
            for row in lines:
                assert {"message", "datetime", "timestamp_desc", "timestamp",
                        "chain_hash"} <= set(row)
            assert [r["seq"] for r in lines] == sorted(r["seq"] for r in lines)

            # --follow prints events that arrive after it started, then stops on its timeout.
            marker = f"rf-follow-{uuid.uuid4().hex[:8]}"
            follow = subprocess.Popen(
                [str(BIN / "ringfence"), "events", enrollment.agent_id, "--data-dir", data,
                 "--kind", "process", "--follow", "--follow-timeout", "8", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            try:
                proc = subprocess.Popen(["sh", "-c", "sleep 1", marker])
                proc.wait()
                stdout, stderr = follow.communicate(timeout=60)
            finally:
                follow.kill()
            assert follow.returncode == 0, stderr
            assert marker in stdout

            # A viewer is refused with the permission-denied status.
            cli("responder", "create", "vic", "--role", "viewer", "--data-dir", data, "--json")
            identity = fleet.paths.responder_identity("vic")
            denied = cli("isolate", enrollment.agent_id, "--reason", "x", "--data-dir", data,
                         "--identity", str(identity), check=False)
            assert denied.returncode == EXIT_DENIED and "responder role" in denied.stderr

            bundle = tmp_path / "b.zip"
            made = wait_for(lambda: (r := cli("bundle", "create", enrollment.agent_id,
                                              "--case", "C-1", "-o", str(bundle), "--data-dir",
                                              data, "--json", check=False)).returncode == 0
                            and r, timeout=30, interval=1, what="a bundle")
            assert json.loads(made.stdout)["bytes"] == bundle.stat().st_size

        token = json.loads(cli("token", "create", "--data-dir", data, "--json").stdout)
        assert token["token"].startswith("rft_")
        revoked = json.loads(cli("token", "revoke", token["token_id"], "--data-dir", data,
                                 "--json").stdout)
        assert revoked == {"token_id": token["token_id"], "revoked": True}
        key = json.loads(cli("agent", "key", enrollment.agent_id, "--data-dir", data,
                             "--json").stdout)
        assert "BEGIN PUBLIC KEY" in key["public_key_pem"]
    # The server is gone: its own exit status, and the message says what to do.
    (fleet.data_dir / "run" / "server.json").unlink()
    gone = cli("hosts", "--data-dir", data, check=False)
    assert gone.returncode == EXIT_UNREACHABLE and "ringfence server run" in gone.stderr


def test_version_usage_logs_and_completion(tmp_path: Path) -> None:
    version = cli("--version").stdout
    assert version.startswith("ringfence ")
    assert cli("hosts", "--bogus", check=False).returncode == EXIT_USAGE
    assert "exit status" in cli("--help").stdout
    missing = cli("hosts", "--server", "127.0.0.1:1", "--identity",
                  str(tmp_path / "nope.identity.pem"), check=False)
    assert missing.returncode == EXIT_NOT_FOUND and "no such file" in missing.stderr
    init = cli("--log-format", "json", "server", "init", "--data-dir", str(tmp_path / "d"),
               "--json")
    assert json.loads(init.stdout)["admin_identity"].endswith(".pem")
    logs = [json.loads(line) for line in init.stderr.splitlines() if line.strip()]
    assert logs and all({"time", "level", "logger", "message"} <= set(r) for r in logs)
    script = cli("completion", "bash").stdout
    assert "complete -o default -F _ringfence ringfence" in script
    completed = subprocess.run(
        ["bash", "-c", script + '\nCOMP_WORDS=(ringfence events x --fo); COMP_CWORD=3; '
         '_ringfence; echo "${COMPREPLY[@]}"'], capture_output=True, text=True, timeout=30, check=False)
    assert completed.stdout.split() == ["--follow", "--follow-timeout", "--format"]
    agent_version = subprocess.run([str(BIN / "ringfence-agent"), "--log-format", "json",
                                    "--version"], capture_output=True, text=True, timeout=60,
                                   check=False)
    assert agent_version.returncode == 0 and "ringfence-agent" in agent_version.stdout
