"""The Python client and the README's first-run flow against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import client as stt1_client
import security as s
from conftest import FIXTURES, ROOT, free_port, secured_server


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    with secured_server(FIXTURES / "e2e", tmp_path) as server:
        yield server.keystore, server.cred


def test_the_client_calls_and_verifies(served) -> None:  # type: ignore[no-untyped-def]
    _, cred = served
    with stt1_client.Client(cred) as api:
        assert api.call("add", 40, b=2) == 42
        assert api.call("echo", text="hi", times=2) == "hihi"
        assert "add" in api.catalog()
        with pytest.raises(stt1_client.NotFound):
            api.call("acme_only_not_here")
        with pytest.raises(stt1_client.InvalidArguments, match=r"Expected `int`, got `str` - at `\$\.b`"):
            api.call("add", a=1, b="2")
        with pytest.raises(stt1_client.ServerError):
            api.call("boom")


def test_the_async_client(served) -> None:  # type: ignore[no-untyped-def]
    _, cred = served

    async def calls() -> list[int]:
        async with stt1_client.AsyncClient(cred) as api:
            return list(await asyncio.gather(*(api.call("add", i, b=1) for i in range(5))))

    assert asyncio.run(calls()) == [1, 2, 3, 4, 5]


def test_the_client_adopts_a_rotated_key_end_to_end(served) -> None:  # type: ignore[no-untyped-def]
    keystore, cred = served
    old = s.read_credential(cred)
    keystore.clock = lambda: time.time() - s.ROTATION_SETTLE  # made long enough ago that rk is offered
    [(_, _, new)] = keystore.rotate("acme")  # the server's own keystore: its cache follows at once
    keystore.clock = time.time
    with stt1_client.Client(cred) as api:
        assert api.call("add", 1, b=1) == 2  # answer carries rk: stored, then used
        stored = s.read_credential(cred)
        assert stored.kid == old.kid and stored.next is not None and stored.next.kid == new
        assert api.call("add", 1, b=2) == 3  # signed with the new kid: promoted on both sides
    adopted = s.read_credential(cred)
    assert (adopted.kid, adopted.next) == (new, s.msgspec.UNSET)
    assert oct(cred.stat().st_mode)[-3:] == "600"
    states = {row["kid"]: row["state"] for row in keystore.rows()}
    assert states == {old.kid: "retiring", new: "active"}


def test_the_client_cli(served) -> None:  # type: ignore[no-untyped-def]
    _, cred = served
    run = [sys.executable, str(ROOT / "client.py"), "--cred", str(cred)]
    ok = subprocess.run([*run, "add", "2", "--json", '{"b": 3}'], capture_output=True, text=True, timeout=30)
    assert (ok.returncode, ok.stdout.strip()) == (0, "5")
    bad = subprocess.run([*run, "add", "--json", '{"a": 1}'], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: 422 invalid_arguments: Object missing required field `b`"


def test_the_readme_first_run(tmp_path: Path) -> None:
    """`python gateway.py` on a fresh folder: demo tenant, credential file, and both printed commands work."""
    shutil.copytree(ROOT / "modules", tmp_path / "modules")
    port = free_port()
    env = {**os.environ, "GATEWAY_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "gateway.py")],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
        time.sleep(1)  # tokens from the gateway's boot second are refused (memory replay store)
        cred = tmp_path / "demo-credential.json"
        assert oct(cred.stat().st_mode)[-3:] == "600"
        assert s.read_credential(cred).url == f"http://127.0.0.1:{port}"
        assert httpx.post(f"http://127.0.0.1:{port}/rest/add", json={"a": 1, "b": 2}).status_code == 401
        printed = []  # the message is out before the gateway serves: its commands, run exactly as printed
        assert process.stdout is not None
        while not printed or not printed[-1].startswith("or in a browser"):
            printed.append(process.stdout.readline())
            assert printed[-1], "".join(printed)
        commands = [line.strip() for line in printed if line.startswith("  ")]
        assert len(commands) == 3, "".join(printed)
        answers = [
            subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
            for command in commands
        ]
        assert answers[0].returncode == 0 and {"add", "power"} <= set(json.loads(answers[0].stdout)), answers[0]
        assert (answers[1].returncode, answers[1].stdout.strip()) == (0, "3.0"), answers[1].stderr
        assert answers[2].stdout == '{"results":3.0,"valid":true}', answers[2].stderr
        page = httpx.get(f"http://127.0.0.1:{port}/console")  # the printed browser route (tests/test_browser.py)
        assert page.status_code == 200 and "<title>Gateway console</title>" in page.text
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    output = "".join(printed) + output
    assert "First run: created gateway.db with the tenant 'demo'" in output
    assert 'client.py --cred demo-credential.json add --json \'{"a": 1, "b": 2}\'' in output
    assert f"open http://127.0.0.1:{port}/console and choose demo-credential.json" in output
