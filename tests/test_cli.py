"""The command line, as a user runs it: real processes, real ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import FIXTURES, ROOT, free_port


def start(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "gateway.py"), "--auth", "off", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # so a failed test can kill the workers too
    )


def wait_healthy(url: str, process: subprocess.Popen[str], seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited {process.returncode}: {process.stdout.read()}")  # type: ignore[union-attr]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).json()  # type: ignore[no-any-return]
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("gateway did not become healthy")


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    return output


def test_serves_the_folder_and_logs_one_access_line_per_request(processes) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    processes.append(process := start("--port", str(port), "--modules", str(FIXTURES / "e2e")))
    assert wait_healthy(f"http://127.0.0.1:{port}", process)["functions"] == 13
    response = httpx.post(f"http://127.0.0.1:{port}/rest/add/2", json={"b": 3})
    assert response.json() == {"results": 5, "valid": True}
    output = stop(process)
    [line] = [line for line in output.splitlines() if "gateway.access" in line]
    assert f"{response.headers['x-request-id']} tenant=- func=add status=200 " in line
    assert line.endswith("ms")


def test_settings_come_from_the_environment_too(processes) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = {"GATEWAY_PORT": str(port), "GATEWAY_MODULES": str(FIXTURES / "e2e"), "GATEWAY_MAX_BODY": "10"}
    processes.append(process := start(env=env))
    wait_healthy(f"http://127.0.0.1:{port}", process)
    assert httpx.post(f"http://127.0.0.1:{port}/rest/add", json={"a": 1, "b": 2}).status_code == 413
    stop(process)


def test_a_port_in_use_is_a_clear_startup_failure(processes) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    processes.append(first := start("--port", str(port), "--modules", str(FIXTURES / "e2e")))
    wait_healthy(f"http://127.0.0.1:{port}", first)
    second = start("--port", str(port), "--modules", str(FIXTURES / "e2e"))
    output, _ = second.communicate(timeout=20)
    assert second.returncode == 3
    assert f"gateway: cannot listen on 127.0.0.1:{port}: Address already in use" in output


def test_a_missing_modules_folder_is_a_clear_startup_failure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), "--modules", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 3
    assert f"gateway: modules folder '{tmp_path / 'nope'}' does not exist (set --modules)" in result.stderr


def test_a_bad_setting_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), "--timeout", "0"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert (result.returncode, result.stderr.strip()) == (3, "gateway: --timeout must be positive")


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--log-level", "warn"], {}, "--log-level must be one of debug, info, warning, error, critical, not 'warn'"),
    (["--log-level", "verbose", "tenant", "list"], {},
     "--log-level must be one of debug, info, warning, error, critical, not 'verbose'"),
    ([], {"GATEWAY_LOG_LEVEL": "verbose"},
     "--log-level must be one of debug, info, warning, error, critical, not 'verbose'"),
    (["--port", "70000"], {}, "--port must be 0-65535, not 70000"),
    (["--port", "-1"], {}, "--port must be 0-65535, not -1"),
    ([], {"GATEWAY_PORT": "65536"}, "--port must be 0-65535, not 65536"),
    (["--rotate-days", "-1"], {}, "--rotate-days must be 0 (no policy) or positive, not -1"),
    (["--public-url", "ftp://x"], {}, "--public-url must be an origin like https://api.example.com, not 'ftp://x'"),
    (["--public-url", "https://api.example.com/v1"], {},
     "--public-url must be an origin like https://api.example.com, not 'https://api.example.com/v1'"),
    # A bad environment value names its variable and exits 3, not argparse's 2 with "--port".
    ([], {"GATEWAY_PORT": "8000x"}, "GATEWAY_PORT='8000x' is not a valid int"),
    (["tenant", "list"], {"GATEWAY_WORKERS": "2x"}, "GATEWAY_WORKERS='2x' is not a valid int"),
    ([], {"GATEWAY_TIMEOUT": "soon"}, "GATEWAY_TIMEOUT='soon' is not a valid float"),
    (["--timeout", "nan"], {}, "--timeout must be positive"),
    ([], {"GATEWAY_RATE": "nan"}, "--rate must be 0 (no limit) or positive"),
    # Read as "no" (or "yes"), unwarned: GATEWAY_METRICS=enabled served no /metrics.
    ([], {"GATEWAY_METRICS": "enabled"},
     "GATEWAY_METRICS='enabled' is not one of 1, true, yes, on or 0, false, no, off"),
    ([], {"GATEWAY_RELOAD": "maybe"}, "GATEWAY_RELOAD='maybe' is not one of 1, true, yes, on or 0, false, no, off"),
])
def test_a_bad_log_level_or_port_is_a_startup_failure_not_a_traceback(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    """Exit 3, which systemd does not restart (RestartPreventExitStatus=3); a traceback is exit 1."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), "--auth", "off", "--modules", str(FIXTURES / "e2e"), *args],
        capture_output=True, text=True, timeout=20, cwd=tmp_path, env={**os.environ, **env},
    )  # fmt: skip
    assert (result.returncode, result.stderr.strip()) == (3, f"gateway: {message}")
    assert os.listdir(tmp_path) == []


def test_package_plugins_are_served(processes) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = {"PYTHONPATH": str(FIXTURES / "pkgs")}
    processes.append(
        process := start("--port", str(port), "--modules", str(FIXTURES / "e2e"), "--package", "gwplugin", env=env)
    )
    wait_healthy(f"http://127.0.0.1:{port}", process)
    response = httpx.post(f"http://127.0.0.1:{port}/rest/plugin_echo/hi")
    assert response.json() == {"results": "hi", "valid": True}
    stop(process)


def test_several_workers_serve_the_same_port(processes) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    processes.append(process := start("--port", str(port), "--modules", str(FIXTURES / "e2e"), "--workers", "2"))
    wait_healthy(f"http://127.0.0.1:{port}", process, seconds=40)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
    assert sum(b"spawn_main" in command for command in commands) == 2, commands
    for _ in range(10):
        assert httpx.post(f"http://127.0.0.1:{port}/rest/add", json={"a": 1, "b": 2}).json()["results"] == 3
    stop(process)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_drains_calls_in_flight_then_exits_0(processes, tmp_path: Path, stop_signal: int) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP too: a closed terminal or a log rotation hook killed the process at once (129)."""
    (tmp_path / "slow.py").write_text(
        "import asyncio\n__all_exposed__ = ['slow']\n\n\nasync def slow(seconds: float) -> str:\n"
        "    await asyncio.sleep(seconds)\n    return 'finished'\n")
    port = free_port()
    processes.append(process := start("--port", str(port), "--modules", str(tmp_path)))
    wait_healthy(f"http://127.0.0.1:{port}", process)
    answers: list[httpx.Response] = []
    call = threading.Thread(target=lambda: answers.append(
        httpx.post(f"http://127.0.0.1:{port}/rest/slow", json={"seconds": 1.5}, timeout=10)))
    call.start()
    time.sleep(0.5)  # the call is in flight
    process.send_signal(stop_signal)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no new connections once draining
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    call.join(10)
    output, _ = process.communicate(timeout=20)
    assert answers[0].json() == {"results": "finished", "valid": True}
    assert process.returncode == 0, output


def test_gateway_py_stays_a_launcher_and_keeps_the_embedding_api() -> None:
    """`import gateway` offers what README's Embedding section uses, and the script stays a few
    lines: CPython keeps the syntax tree of the script it runs for the server's whole life."""
    import gateway
    import gateway_app

    for name in ("Settings", "create_app", "load_modules", "main", "serve"):
        assert getattr(gateway, name) is getattr(gateway_app, name)
    assert len((ROOT / "gateway.py").read_text().splitlines()) < 40


@pytest.mark.parametrize("create_port", [None, "same"])
def test_serving_elsewhere_than_the_tokens_port_is_warned_about(tmp_path: Path, create_port: str | None) -> None:
    port = free_port()
    keyword = f"port={port}, " if create_port else ""
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import gateway\n"
        f"app = gateway.create_app({str(ROOT / 'modules')!r}, {keyword}db={str(tmp_path / 'gw.db')!r}, reload=False)\n"
        f"gateway.serve(app, port={port})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until it serves
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert process.poll() is None
                time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        _, errors = process.communicate(timeout=30)
    warned = f"serving on port {port}, but tokens are bound to http://127.0.0.1:8000: pass port={port}" in errors
    assert warned == (create_port is None), errors


def test_an_ipv6_host_is_bracketed_in_the_origin_tokens_name() -> None:
    import gateway_app

    assert gateway_app.Settings(host="::1", port=8001).audience == "http://[::1]:8001"
    assert gateway_app.Settings(host="127.0.0.1", port=8001).audience == "http://127.0.0.1:8001"
