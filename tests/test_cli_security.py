"""The security subcommands as an operator runs them: real processes, a real keystore file."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyotp
import pytest
from test_faults import fill, immutable, small_disk  # noqa: F401 (a fixture)
from test_redis import RedisServer

import security as s
from conftest import FIXTURES, ROOT, free_port


def cli(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(ROOT / "gateway.py"), "--db", str(tmp_path / "gw.db"), *args],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "GATEWAY_MASTER_KEY"})
    if check:
        assert result.returncode == 0, result.stderr
    return result



def wait_until_listening(process: subprocess.Popen[str], port: int, within: float) -> None:
    """Until the gateway started as ``process`` accepts a connection on ``port``."""
    deadline = time.monotonic() + within
    while True:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz")
            return
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)

def test_tenant_add_writes_a_private_credential_file(tmp_path: Path) -> None:
    out = cli(tmp_path, "tenant", "add", "acme", "--functions", "add,echo").stdout
    cred_path = tmp_path / "acme-credential.json"
    assert "for http://127.0.0.1:8000 written to acme-credential.json" in out  # the url the file calls
    assert oct(cred_path.stat().st_mode)[-3:] == "600"
    assert oct((tmp_path / "gw.db.key").stat().st_mode)[-3:] == "600"
    cred = s.read_credential(cred_path)
    assert (cred.stt, cred.url, cred.tid) == (1, "http://127.0.0.1:8000", "acme")
    listing = cli(tmp_path, "tenant", "list").stdout
    assert re.search(rf"acme\s+{re.escape(cred.kid)}\s+active\s+functions=\[\"add\", \"echo\"\]", listing)
    assert cred.k not in listing


def test_public_url_is_the_credentials_url(tmp_path: Path) -> None:
    cli(tmp_path, "--public-url", "https://api.example.com/", "tenant", "add", "acme", "--out", "c.json")
    assert s.read_credential(tmp_path / "c.json").url == "https://api.example.com"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "0:0::0"])
def test_a_credential_for_an_address_no_client_calls_is_warned_about(tmp_path: Path, host: str) -> None:
    """Listening everywhere (the Docker image's default) binds tokens to http://0.0.0.0:8000
    unless --public-url says where clients call: say so, where the credential is made."""
    added = cli(tmp_path, "--host", host, "tenant", "add", "acme")
    assert "--public-url" in added.stderr and "listens on every address" in added.stderr
    assert "listens on every address" not in cli(tmp_path, "--host", host, "tenant", "list").stderr
    public = cli(tmp_path, "--host", host, "--public-url", "http://127.0.0.1:8000", "tenant", "export", "acme",
                 "--out", "a.json")
    assert "listens on every address" not in public.stderr
    assert "listens on every address" not in cli(tmp_path, "tenant", "export", "acme", "--out", "b.json").stderr


def test_a_credential_file_that_exists_is_never_overwritten(tmp_path: Path) -> None:
    """It may hold a live credential: overwritten, its key would stay active with nobody holding it."""
    cli(tmp_path, "tenant", "add", "acme", "--out", "a.json")
    before = (tmp_path / "a.json").read_bytes()
    rows = cli(tmp_path, "tenant", "list").stdout
    for args in (("export", "acme", "--out", "a.json"), ("add", "beta", "--out", "a.json")):
        refused = cli(tmp_path, "tenant", *args, check=False)
        assert refused.returncode == 3 and "a.json exists already" in refused.stderr, refused.stderr
        assert "the keystore was not changed" in refused.stderr
    assert (tmp_path / "a.json").read_bytes() == before
    assert cli(tmp_path, "tenant", "list").stdout == rows


def test_tenant_list_shows_a_retiring_key_as_retired_once_its_grace_is_over(tmp_path: Path) -> None:
    cli(tmp_path, "tenant", "add", "acme")
    old = s.read_credential(tmp_path / "acme-credential.json").kid
    new = cli(tmp_path, "tenant", "rotate", "acme").stdout.split(" -> ")[1].split()[0]
    keystore = s.Keystore(tmp_path / "gw.db")
    assert keystore.promote(new)
    keystore.close()
    listed = cli(tmp_path, "tenant", "list").stdout.splitlines()
    states = {line.split()[1]: line.split(maxsplit=2)[2] for line in listed}
    assert states[old].startswith("retiring until 20") and states[new].startswith("active")
    with sqlite3.connect(tmp_path / "gw.db") as db:  # the grace period, passed
        db.execute("UPDATE credentials SET retire_at = ? WHERE kid = ?", (int(time.time()) - 1, old))
    states = {line.split()[1]: line.split()[2] for line in cli(tmp_path, "tenant", "list").stdout.splitlines()}
    assert states[old] == "retired"


def test_bad_names_and_duplicates_are_refused_with_exit_3(tmp_path: Path) -> None:
    cli(tmp_path, "tenant", "add", "acme")
    duplicate = cli(tmp_path, "tenant", "add", "acme", check=False)
    assert (duplicate.returncode, duplicate.stderr.strip()) == (3, "gateway: tenant 'acme' exists already")
    bad = cli(tmp_path, "tenant", "add", "Not_OK", check=False)
    assert bad.returncode == 3 and "tenant name 'Not_OK'" in bad.stderr
    missing = cli(tmp_path, "tenant", "rotate", "nobody", check=False)
    assert (missing.returncode, missing.stderr.strip()) == (3, "gateway: no tenant 'nobody'")


def test_rotate_export_and_revoke(tmp_path: Path) -> None:
    cli(tmp_path, "tenant", "add", "acme")
    kid = s.read_credential(tmp_path / "acme-credential.json").kid
    rotated = cli(tmp_path, "tenant", "rotate", "acme").stdout
    assert rotated.startswith(f"tenant acme: {kid} -> ") and "pending" in rotated
    assert "nothing to rotate" in cli(tmp_path, "tenant", "rotate", "acme").stdout
    cli(tmp_path, "tenant", "export", "acme", "--out", "laptop.json")
    second = s.read_credential(tmp_path / "laptop.json")
    assert second.tid == "acme" and second.kid != kid
    successor = rotated.split(" -> ")[1].split()[0]
    # the kid goes with its pending successor
    assert cli(tmp_path, "tenant", "revoke", kid).stdout.strip() == f"{kid}: 2 credential(s) retired"
    states = {line.split()[1]: line.split()[2] for line in cli(tmp_path, "tenant", "list").stdout.splitlines()}
    assert states[kid] == states[successor] == "retired" and states[second.kid] == "active"
    assert cli(tmp_path, "tenant", "revoke", "acme").stdout.strip() == "acme: 1 credential(s) retired"


def test_otp_enroll_prints_an_otpauth_uri(tmp_path: Path) -> None:
    cli(tmp_path, "tenant", "add", "acme")
    uri = cli(tmp_path, "tenant", "otp-enroll", "acme").stdout.strip()
    assert uri.startswith("otpauth://totp/gateway:acme?secret=")
    totp = pyotp.parse_uri(uri)
    keystore = s.Keystore(tmp_path / "gw.db")
    now = time.time()
    assert keystore.check_otp("acme", totp.at(now), now)
    assert not keystore.check_otp("acme", totp.at(now), now)


def test_the_master_key_can_come_from_the_environment(tmp_path: Path) -> None:
    key = s.b64encode(os.urandom(32))
    env = {**os.environ, "GATEWAY_MASTER_KEY": key}
    run = [sys.executable, str(ROOT / "gateway.py"), "--db", str(tmp_path / "gw.db"), "tenant"]
    subprocess.run([*run, "add", "acme"], check=True, cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert not (tmp_path / "gw.db.key").exists()
    listing = subprocess.run([*run, "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "acme" in listing.stdout
    env["GATEWAY_MASTER_KEY"] = "too-short"
    bad = subprocess.run([*run, "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (bad.returncode, bad.stderr.strip()) == (
        3, f"gateway: cannot open the keystore {tmp_path / 'gw.db'}: GATEWAY_MASTER_KEY must be the base64url of 32 "
        "random bytes")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    failed = subprocess.run(  # it changes nothing: it left an empty gw.db behind
        [*run[:-3], "--db", str(fresh / "gw.db"), "tenant", "add", "m1"], cwd=fresh, env=env, capture_output=True,
        text=True, timeout=60,
    )
    assert failed.returncode == 3 and os.listdir(fresh) == []


def test_token_prints_a_curl_command_for_exactly_that_request(tmp_path: Path) -> None:
    cli(tmp_path, "tenant", "add", "acme")
    line = cli(tmp_path, "token", "--cred", "acme-credential.json", "POST", "/rest/add?x=1",
               "--data", '{"a": 1}').stdout.strip()
    assert line.startswith("curl -sS --path-as-is -X POST 'http://127.0.0.1:8000/rest/add?x=1' "
                           "-H 'Authorization: STT1 ")
    assert line.endswith("""-H 'Content-Type: application/json' --data-raw '{"a": 1}'""")
    token = re.search(r"STT1 (v3\.local\.[A-Za-z0-9_.-]+)'", line).group(1)  # type: ignore[union-attr]
    cred = s.read_credential(tmp_path / "acme-credential.json")
    key = s.DirectionKey(cred.secret, "c2s", "acme", cred.kid)
    implicit = s.request_assertion(cred.url, "POST", b"/rest/add?x=1", b"application/json", b'{"a": 1}')
    assert isinstance(s.open_token(key, token, implicit).claims, s.RequestClaims)


def test_token_signs_the_path_as_curl_sends_it(tmp_path: Path) -> None:
    """curl percent-encodes a space or a non-ASCII character: a token signed over the raw
    bytes was refused (401), and a space made curl refuse the URL."""
    cli(tmp_path, "tenant", "add", "acme")
    line = cli(tmp_path, "token", "--cred", "acme-credential.json", "POST", "/rest/slugify/Grüße ✓ a%2Fb?q=x y").stdout
    sent = "/rest/slugify/Gr%C3%BC%C3%9Fe%20%E2%9C%93%20a%2Fb?q=x%20y"
    assert f"'http://127.0.0.1:8000{sent}'" in line
    token = re.search(r"STT1 (v3\.local\.[A-Za-z0-9_.-]+)'", line).group(1)  # type: ignore[union-attr]
    cred = s.read_credential(tmp_path / "acme-credential.json")
    key = s.DirectionKey(cred.secret, "c2s", "acme", cred.kid)
    assert s.open_token(key, token, s.request_assertion(cred.url, "POST", sent.encode(), b"", b""))


@pytest.mark.parametrize("replay", ["memory", "mongodb://x"])
def test_workers_need_a_shared_replay_store(tmp_path: Path, replay: str) -> None:
    (tmp_path / "modules").mkdir()
    result = cli(tmp_path, "--workers", "2", "--replay", replay, check=False)
    assert result.returncode == 3
    expected = ("gateway: --workers > 1 needs a replay store the workers share: add --replay sqlite"
                if replay == "memory" else "gateway: unknown replay store 'mongodb://x'")
    assert result.stderr.strip().startswith(expected)


def test_serving_with_an_unusable_master_key_is_a_clean_startup_failure(tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    env = {**os.environ, "GATEWAY_MASTER_KEY": "short"}
    result = subprocess.run([sys.executable, str(ROOT / "gateway.py"), "--db", str(tmp_path / "gw.db")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert (result.returncode, result.stderr.strip()) == (
        3, "gateway: GATEWAY_MASTER_KEY must be the base64url of 32 random bytes")


def test_workers_share_replay_protection_and_each_reload_modules(tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "where.py").write_text(
        "import os\n__all_exposed__ = ['pid']\n\n\ndef pid() -> int:\n    return os.getpid()\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "gateway.py"), "--port", str(port), "--workers", "2", "--replay", "sqlite",
         "--db", str(tmp_path / "gw.db")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        wait_until_listening(process, port, within=40)
        time.sleep(1)
        cred = s.read_credential(tmp_path / "demo-credential.json")

        def send(token: str) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a new connection each time
            conn.request("POST", "/rest/pid", headers={"Authorization": f"STT1 {token}"})
            response = conn.getresponse()
            return response.status, response.read()

        def fresh() -> str:
            return s.sign_request(cred, "POST", b"/rest/pid", b"", b"", time.time())[0]

        pids = {json.loads(send(fresh())[1])["results"] for _ in range(40)}
        assert len(pids) == 2, "both workers should have answered some of 40 connections"
        token = fresh()
        statuses = [send(token)[0] for _ in range(20)]
        assert statuses.count(200) == 1 and statuses.count(401) == 19
        # Each worker watches the folder on its own: after a save, every worker serves the change.
        (tmp_path / "modules" / "where.py").write_text(
            "import os\n__all_exposed__ = ['pid']\n\n\ndef pid() -> int:\n    return -os.getpid()\n")
        deadline = time.monotonic() + 15
        while True:
            answers = [json.loads(send(fresh())[1])["results"] for _ in range(40)]
            if all(pid < 0 for pid in answers) and len(set(answers)) == 2:
                break
            assert time.monotonic() < deadline, answers
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def keys(tmp_path: Path) -> list[tuple[str, str]]:
    """(tenant, state) of every key, read straight from the database."""
    with sqlite3.connect(tmp_path / "gw.db") as db:
        return sorted(db.execute("SELECT tid, state FROM credentials").fetchall())


def test_a_credential_file_that_cannot_be_written_changes_nothing(tmp_path: Path) -> None:
    cli(tmp_path, "tenant", "add", "acme")
    added = cli(tmp_path, "tenant", "add", "beta", "--out", str(tmp_path / "nope" / "b.json"), check=False)
    assert (added.returncode, added.stderr.strip()) == (
        3, f"gateway: cannot write {tmp_path / 'nope' / 'b.json'}: No such file or directory; "
        "the keystore was not changed")
    exported = cli(tmp_path, "tenant", "export", "acme", "--out", "nope/a.json", check=False)
    assert (exported.returncode, exported.stderr.strip()) == (
        3, "gateway: cannot write nope/a.json: No such file or directory; the keystore was not changed")
    folder = cli(tmp_path, "tenant", "export", "acme", "--out", ".", check=False)
    assert (folder.returncode, folder.stderr.strip()) == (
        3, "gateway: cannot write .: it is a folder; the keystore was not changed")
    assert keys(tmp_path) == [("acme", "active")]  # no tenant beta, no key nobody holds
    cli(tmp_path, "tenant", "add", "beta", "--out", "b.json")  # the retry is not "exists already"
    assert s.read_credential(tmp_path / "b.json").tid == "beta"


def test_a_credential_write_that_fails_late_revokes_the_key_it_made(tmp_path: Path, small_disk: Path) -> None:  # noqa: F811
    """The file could be created, then the disk was full: the key just saved is revoked at once."""
    cli(tmp_path, "tenant", "add", "acme")
    fill(small_disk)
    out = str(small_disk / "c.json")
    for args in (("add", "beta"), ("export", "acme")):
        failed = cli(tmp_path, "tenant", *args, "--out", out, check=False)
        assert failed.returncode == 3 and failed.stderr.count("\n") == 1, failed.stderr
        assert failed.stderr.startswith(f"gateway: cannot write {out}: No space left on device; its key ")
        assert failed.stderr.strip().endswith(
            f" was revoked (`gateway.py tenant export {args[1]} --out FILE` issues another)")
    assert keys(tmp_path) == [("acme", "active"), ("acme", "retired"), ("beta", "retired")]
    assert os.listdir(small_disk) == ["filler"]  # no temporary file left behind


def test_a_first_run_in_a_read_only_folder_is_a_clean_startup_failure(tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with immutable(cwd):  # not even root can create a file in it
        result = subprocess.run([sys.executable, str(ROOT / "gateway.py"), "--db", str(tmp_path / "gw.db"),
                                 "--modules", str(tmp_path / "modules")],
                                capture_output=True, text=True, timeout=60, cwd=cwd)
    assert (result.returncode, result.stderr.strip()) == (
        3, f"gateway: first run: cannot write {cwd / 'demo-credential.json'}: Operation not permitted; start from "
        "a writable folder, or create a tenant first with `gateway.py tenant add NAME --out FILE`")
    assert sorted(os.listdir(tmp_path)) == ["cwd", "modules"]  # no keystore with a demo nobody holds


def test_a_first_run_on_a_busy_port_writes_no_credential_and_the_next_start_is_a_first_run(tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "gateway.py"), "--port", str(port), "--db", "gw.db"],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 3 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "First run" not in result.stdout  # no commands printed for a credential of a port not ours
    assert not (tmp_path / "demo-credential.json").exists()
    port = free_port()  # the next start, on a free port, is the first run, and the credential names it
    process = subprocess.Popen([sys.executable, str(ROOT / "gateway.py"), "--port", str(port), "--db", "gw.db",
                                "--no-reload"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        wait_until_listening(process, port, within=30)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert "First run: created gw.db with the tenant 'demo'" in output
    assert s.read_credential(tmp_path / "demo-credential.json").url == f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("action", [["list"], ["rotate", "acme"], ["revoke", "acme"],
                                    ["export", "acme", "--out", "a.json"], ["otp-enroll", "acme"]])
def test_tenant_commands_other_than_add_need_an_existing_keystore(tmp_path: Path, action: list[str]) -> None:
    result = cli(tmp_path, "tenant", *action, check=False)
    assert (result.returncode, result.stderr.strip()) == (
        3, f"gateway: no keystore at {tmp_path / 'gw.db'} (check --db; `tenant add` creates one)")
    assert os.listdir(tmp_path) == []  # neither a database nor a master key was created


def test_token_refuses_a_malformed_code_or_path_clearly(tmp_path: Path) -> None:
    cli(tmp_path, "tenant", "add", "acme")
    cred = ["token", "--cred", "acme-credential.json", "POST"]
    for args, message in [
        (["/rest/add", "--otp", "12345"], "--otp must be the 6-digit code the authenticator app shows"),
        (["/rest/add", "--otp", "12345a"], "--otp must be the 6-digit code the authenticator app shows"),
        (["rest/add"], "the path must start with /, e.g. /rest/add (not 'rest/add')"),
    ]:
        result = cli(tmp_path, *cred, *args, check=False)
        assert (result.returncode, result.stdout, result.stderr.strip()) == (3, "", f"gateway: {message}")


def serve_briefly(tmp_path: Path, *args: str, env: dict[str, str]) -> str:
    """Start `python gateway.py`, wait until it answers, stop it with Ctrl+C; its output."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "gateway.py"), "--port", str(port), "--modules", str(FIXTURES / "e2e"),
         "--no-reload", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        wait_until_listening(process, port, within=30)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    return output


def test_a_shared_keystore_with_a_per_process_replay_store_is_warned_about(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    keystore = redis_server.url.replace("/0", "/1")
    env = {**os.environ, "GATEWAY_MASTER_KEY": s.b64encode(os.urandom(32))}
    try:
        memory = serve_briefly(tmp_path, "--keystore", keystore, env=env)  # --replay memory, the default
        shared = serve_briefly(tmp_path, "--keystore", keystore, "--replay", redis_server.url, env=env)
    finally:
        redis_server.stop()
    warning = (f"WARNING gateway: --keystore {keystore} is shared but --replay memory is not: with several hosts, "
               "a token used on one can be replayed once on each other host within 45 s; give them "
               "--replay redis://...")
    assert warning in memory and "is shared but" not in shared, (memory, shared)


def test_a_worker_that_cannot_open_the_keystore_exits_3_without_a_traceback(tmp_path: Path) -> None:
    """--workers N: uvicorn starts each worker through app_from_env; a master key file removed
    since the start must give the operator one line, not a traceback per restart."""
    cli(tmp_path, "tenant", "add", "acme")
    (tmp_path / "gw.db.key").unlink()
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_MASTER_KEY"}
    env.update(GATEWAY_DB=str(tmp_path / "gw.db"), GATEWAY_MODULES=str(FIXTURES / "e2e"), GATEWAY_REPLAY="sqlite")
    worker = subprocess.run(
        [sys.executable, "-c", "import gateway_app; gateway_app.app_from_env()"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert worker.returncode == 3, worker.stderr
    assert worker.stderr.startswith("gateway: worker ") and "cannot start" in worker.stderr, worker.stderr
    assert "Traceback" not in worker.stderr


def test_tenant_functions_are_names_spaces_aside(tmp_path: Path) -> None:
    """"add, power" stored " power", which no function has: the tenant got 404s, unwarned."""
    cli(tmp_path, "tenant", "add", "acme", "--functions", " power, add ,")
    assert 'functions=["add", "power"]' in cli(tmp_path, "tenant", "list").stdout
    bad = cli(tmp_path, "tenant", "add", "beta", "--functions", "add,bad-name,1x", check=False)
    assert (bad.returncode, bad.stderr.strip()) == (
        3, "gateway: --functions takes function names separated by commas, not 'bad-name', '1x'")
    assert "beta" not in cli(tmp_path, "tenant", "list").stdout and not (tmp_path / "beta-credential.json").exists()
    empty = cli(tmp_path, "tenant", "add", "gamma", "--functions", " , ", check=False)  # it could call nothing
    assert (empty.returncode, empty.stderr.strip()) == (
        3, "gateway: --functions names no function: leave it out to allow every function")
    assert "gamma" not in cli(tmp_path, "tenant", "list").stdout


def test_tenant_list_keeps_its_columns_for_a_retiring_key(tmp_path: Path) -> None:
    """A "retiring until <time>" state pushed the functions column of its row out of line."""
    cli(tmp_path, "tenant", "add", "acme")
    cli(tmp_path, "tenant", "rotate", "acme")
    keystore = s.Keystore(tmp_path / "gw.db")
    pending = next(row["kid"] for row in keystore.rows() if row["state"] == "pending")
    assert keystore.promote(pending)  # the old key now retires after its grace period
    keystore.close()
    lines = cli(tmp_path, "tenant", "list").stdout.splitlines()
    assert any("retiring until" in line for line in lines) and len(lines) == 2
    assert len({line.index("functions=") for line in lines}) == 1, lines


def test_no_kid_starts_with_a_dash_so_it_can_be_typed(tmp_path: Path) -> None:
    """One kid in 64 started with "-": `tenant revoke -AbC...` was then taken for an option
    (this file's rotate test failed that way). The keystores make kids with new_kid."""
    assert not any(s.new_kid().startswith("-") for _ in range(5000))
    keystore = s.Keystore(tmp_path / "gw.db")
    kids = [keystore.add_tenant(f"t{i}")[0] for i in range(3)]
    assert all(len(s.b64decode(kid)) == 16 for kid in kids)
    assert cli(tmp_path, "tenant", "revoke", "--", kids[0]).stdout.strip() == f"{kids[0]}: 1 credential(s) retired"
