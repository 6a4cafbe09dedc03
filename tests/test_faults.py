"""Faults, each one real (issue 7): misbehaving clients, functions and modules, stores that are
locked, read-only or full, and processes killed under load.

Every fault is the real thing on real components: raw sockets against a real uvicorn, SQLite
files locked by another connection or made immutable (``chattr +i``: the tests run as root,
for whom chmod stops nothing, and the immutable flag stops root too), a tiny tmpfs that fills
up, and ``python gateway.py`` processes sent SIGTERM or SIGKILL. Where a limit is a parameter
(timeouts, sizes, the security clock) the tests set it small instead of waiting on the clock.

Already covered elsewhere (not repeated here): a function that raises, times out or returns
something unencodable, the concurrency limit, a disconnect mid-body and 413s (test_http.py); a
failing replay store, replay after a restart, a failed keystore change (test_security.py);
Redis down (test_redis.py); SIGTERM draining one call (test_cli.py); a broken reload
(test_reload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import uvicorn
from test_security import T0, Answer, Clock, Cred, Stack, make_stack, response_claims

import gateway_app as gateway
import security as s
from conftest import FIXTURES, ROOT, free_port


class Served:
    """A real uvicorn on a free loopback port, built exactly as gateway.serve builds it, with
    ``extra`` uvicorn settings (small HTTP limits) on top."""

    def __init__(self, app: gateway.Gateway, **extra: Any) -> None:
        self.app = app
        sock = gateway._listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(gateway._uvicorn_config(app, app.settings, **extra))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def add(self) -> httpx.Response:
        return self.client.post("/rest/add", json={"a": 1, "b": 2})

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def served() -> Iterator[Any]:
    """``served(app, **uvicorn_settings)`` runs an app for this test; all are stopped afterwards."""
    running: list[Served] = []

    def start(app: gateway.Gateway, **extra: Any) -> Served:
        running.append(Served(app, **extra))
        return running[-1]

    yield start
    for server in running:
        server.stop()


def e2e(**settings: Any) -> gateway.Gateway:
    return gateway.create_app(FIXTURES / "e2e", auth="off", reload=False, **settings)


def quick(**limits: float) -> dict[str, Any]:
    """uvicorn settings for the gateway's HTTP protocol with small limits."""
    return {"http": functools.partial(gateway.http_protocol, **limits)}


ADD = b'{"a": 1, "b": 2}'
ADD_REQUEST = (
    b"POST /rest/add HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(ADD), ADD)
)


def read_response(sock: socket.socket) -> tuple[int, bytes, bool]:
    """(status, body, closed): one response read off a raw socket, and whether the server then
    closed the connection."""
    [(status, body)] = read_answers(sock, 1)
    sock.settimeout(2)
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:  # closed with the rest of a refused request unread
        closed = True
    except TimeoutError:
        closed = False
    return status, body, closed


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """(status, body) of the next ``count`` responses off a raw socket, however the server's
    writes were split or joined across reads; the connection is left as it is."""
    data, answers = b"", []
    while len(answers) < count:
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
            length = int(fields[b"content-length"])
            if len(rest) >= length:
                answers.append((int(head.split(b" ")[1]), rest[:length]))
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(answers)} of {count} responses: {data!r}")
        data += chunk
    return answers


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Wait for the server to close the connection; (closed, whatever it sent first)."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        pass
    return True, received


# -- clients that misbehave ------------------------------------------------------------------


def test_a_client_sending_a_byte_at_a_time_is_served_and_holds_up_no_one(served) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e())
    with gw.connect() as slow:
        for i, byte in enumerate(ADD_REQUEST):
            slow.sendall(bytes([byte]))
            time.sleep(0.002)
            if i == len(ADD_REQUEST) // 2:  # half-way through its head, everyone else is served at once
                started = time.monotonic()
                assert gw.add().json()["results"] == 3
                assert time.monotonic() - started < 0.5
        status, body, _ = read_response(slow)
    assert (status, body) == (200, b'{"results":3,"valid":true}')


@pytest.mark.parametrize(
    "head",
    [
        b"X-Big: " + b"a" * 100_000 + b"\r\n",  # one huge header, arriving in many reads
        b"".join(b"X-%d: v\r\n" % i for i in range(20_000)),  # very many small ones
        b"X-Big: " + b"a" * 70_000 + b"\r\n",  # just over the limit, in one read
    ],
    ids=["huge-header", "many-headers", "just-over"],
)
def test_an_oversized_request_head_is_a_431_and_the_worker_keeps_serving(served, head: bytes) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e())
    with gw.connect() as sock:
        sock.sendall(ADD_REQUEST.replace(b"Host: x\r\n", b"Host: x\r\n" + head))
        status, body, closed = read_response(sock)
    assert status == 431 and closed
    assert body.startswith(b'{"valid":false,"error":{"code":"too_large","message":"the request head is over 65536')
    assert gw.add().json()["results"] == 3
    assert gw.client.post("/rest/add", json={"a": 1, "b": 2}, headers={"x-big": "a" * 60_000}).status_code == 200


def test_a_request_head_that_never_ends_is_a_408_after_the_head_timeout(served) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e(), **quick(head_timeout=0.3))
    with gw.connect() as silent, gw.connect() as trickle:
        started = time.monotonic()
        trickle.sendall(b"POST /rest/add HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # still sending, but not fast enough: the deadline is for the whole head
            time.sleep(0.1)
            trickle.sendall(b"X: y\r\n")
        for sock in (silent, trickle):
            closed, sent = closed_within(sock, 5)
            assert closed and sent.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert b'"code":"timeout"' in sent
        assert time.monotonic() - started < 2
    assert gw.add().json()["results"] == 3


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /rest/add HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /rest/add HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /rest/a\x01dd HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["content-length", "chunk", "control-byte"],
)
def test_a_request_that_is_not_http_gets_a_json_400(served, request_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e())
    with gw.connect() as sock:
        sock.sendall(request_bytes)
        status, body, closed = read_response(sock)
    assert status == 400 and closed
    error = {"code": "bad_request", "message": "the request is not valid HTTP/1.1"}
    assert json.loads(body) == {"valid": False, "error": error}
    assert gw.add().json()["results"] == 3


def test_bare_line_ends_after_a_request_do_not_keep_the_connection_for_ever(served) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e(), **quick(head_timeout=0.3))
    with gw.connect() as sock:
        sock.sendall(ADD_REQUEST)
        assert read_response(sock)[:2] == (200, b'{"results":3,"valid":true}')
        started = time.monotonic()
        for _ in range(6):  # a CRLF every 0.1 s starts no request, but it is not a head either
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                sock.sendall(b"\r\n")
        closed, sent = closed_within(sock, 5)
        assert closed and sent.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert time.monotonic() - started < 3  # the head timeout, not uvicorn's 5 s keep-alive
    assert gw.add().json()["results"] == 3


def test_a_body_that_stalls_is_dropped_after_the_body_timeout(served) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e(), **quick(body_timeout=0.3))
    with gw.connect() as sock:
        sock.sendall(ADD_REQUEST.replace(b"Content-Length: 16", b"Content-Length: 99")[:-4])
        closed, _ = closed_within(sock, 5)
    assert closed
    assert gw.add().json()["results"] == 3


def test_a_slow_body_that_keeps_coming_is_not_cut_off(served) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e(), **quick(body_timeout=0.3))
    head, _, body = ADD_REQUEST.partition(b"\r\n\r\n")
    with gw.connect() as sock:
        sock.sendall(head + b"\r\n\r\n")
        for byte in body:  # 16 bytes over 0.8 s: longer than the body timeout, but never idle that long
            time.sleep(0.05)
            sock.sendall(bytes([byte]))
        assert read_response(sock)[:2] == (200, b'{"results":3,"valid":true}')


def test_five_hundred_idle_connections_neither_block_others_nor_stay_for_ever(served) -> None:  # type: ignore[no-untyped-def]
    gw = served(e2e(), **quick(head_timeout=1.0))
    idle = [gw.connect() for _ in range(500)]
    try:
        for sock in idle[::2]:
            sock.sendall(b"POST /rest/add HTTP/1.1\r\n")  # half of them start a request and stop
        started = time.monotonic()
        for _ in range(20):
            assert gw.add().json()["results"] == 3
        assert time.monotonic() - started < 2
        deadline = time.monotonic() + 10
        while len(gw.server.server_state.connections) > 1:  # only the test's own keep-alive client
            assert time.monotonic() < deadline, len(gw.server.server_state.connections)
            time.sleep(0.05)
        assert all(closed_within(sock, 1)[0] for sock in idle[::50])
    finally:
        for sock in idle:
            sock.close()
    assert gw.add().json()["results"] == 3


def data_segments_received(sock: socket.socket) -> int:
    """tcp_info.tcpi_data_segs_in (Linux 4.6+): TCP segments with data this socket received."""
    return int.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)[152:156], sys.byteorder)


def test_each_answer_leaves_in_one_write_and_nothing_is_held_back(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "big.py").write_text(BIG)
    gw = served(gateway.create_app(tmp_path, auth="off", reload=False))

    def big(size: int) -> bytes:
        body = b'{"size": %d}' % size
        request = ADD_REQUEST.replace(b"/rest/add", b"/rest/big")
        return request.replace(b"16\r\n\r\n" + ADD, b"%d\r\n\r\n%s" % (len(body), body))

    with gw.connect() as sock:
        for _ in range(20):  # keep-alive: head and body of every answer in one TCP segment, not two
            sock.sendall(big(5))
            assert read_answers(sock, 1) == [(200, b'{"results":"xxxxx","valid":true}')]
        assert data_segments_received(sock) == 20
        sock.sendall(big(200_000))  # past CORK_LIMIT: sent on as it is written
        assert read_answers(sock, 1) == [(200, b'{"results":"' + b"x" * 200_000 + b'","valid":true}')]
        sock.sendall(big(3) + big(1) + big(4))  # pipelined: three answers, in the order asked
        assert read_answers(sock, 3) == [
            (200, b'{"results":"xxx","valid":true}'),
            (200, b'{"results":"x","valid":true}'),
            (200, b'{"results":"xxxx","valid":true}'),
        ]
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a head and no body: still sent
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")


def test_the_production_limits_are_the_documented_ones() -> None:
    config = gateway._uvicorn_config(e2e(), gateway.Settings())
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = config.http_protocol_class(
            config=config, server_state=uvicorn.server.ServerState(), app_state={}, _loop=loop
        )
    finally:
        loop.close()
    assert protocol.limits == (64 * 1024, 10.0, 30.0)



# -- functions that misbehave ---------------------------------------------------------------

BIG = '__all_exposed__ = ["big"]\n\n\ndef big(size: int) -> str:\n    return "x" * size\n'


def test_a_huge_result_is_a_clean_500_and_the_worker_keeps_serving(served, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "big.py").write_text(BIG)
    gw = served(gateway.create_app(tmp_path, auth="off", reload=False))  # the default limit, 16 MiB
    assert len(gw.client.post("/rest/big", json={"size": 1 << 20}).json()["results"]) == 1 << 20
    started = time.monotonic()
    response = gw.client.post("/rest/big", json={"size": 50 << 20})
    assert time.monotonic() - started < 5
    assert (response.status_code, response.json()["error"]) == (
        500,
        {"code": "internal_error", "message": f"the result is over {16 << 20} bytes"},
    )
    assert f"request {response.headers['x-request-id']}: internal_error the result is over" in caplog.text
    assert gw.client.post("/rest/big", json={"size": 10}).json()["results"] == "x" * 10


def test_the_result_limit_is_a_setting(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "big.py").write_text(BIG)
    gw = served(gateway.create_app(tmp_path, auth="off", reload=False, max_result=1000))
    assert gw.client.post("/rest/big", json={"size": 1000 - 27}).status_code == 200  # {"results":"","valid":true} is 27
    assert gw.client.post("/rest/big", json={"size": 1000 - 26}).status_code == 500
    by_name = gw.client.post("/rest/", json={"funcName": "big", "size": 1000 - 26})
    assert by_name.status_code == 500  # named in the body: a function's result all the same


def test_the_result_limit_leaves_the_catalog_alone(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--max-result 2000 made GET /rest/ a 500 (the examples' catalog is about 3.5 KB): the
    console and `client.py --catalog` could list nothing."""
    (tmp_path / "big.py").write_text(BIG)
    gw = served(gateway.create_app(tmp_path, auth="off", reload=False, max_result=100))
    catalog = gw.client.get("/rest/")
    assert catalog.status_code == 200 and len(catalog.content) > 100 and "big" in catalog.json()["results"]


LEAK = """
__all_exposed__ = ["leak", "version"]
_KEPT = []


class Blob:
    def __init__(self) -> None:
        self.data = bytearray(1 << 20)


def leak() -> int:
    _KEPT.append(Blob())  # a megabyte per call, never let go: the module's own bug
    return len(_KEPT)


def version() -> int:
    return VERSION
"""


def wait_for(check, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_function_that_leaks_per_call_is_served_and_a_reload_gives_the_memory_back(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "leaky.py").write_text(LEAK + "VERSION = 1\n")
    (tmp_path / "steady.py").write_text('__all_exposed__ = ["steady"]\n\n\ndef steady() -> int:\n    return 7\n')
    gw = served(gateway.create_app(tmp_path, auth="off"))
    time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher is up
    for n in range(1, 41):
        assert gw.client.post("/rest/leak").json()["results"] == n
        assert gw.client.post("/rest/steady").json()["results"] == 7  # everything else goes on as before
    kept = gw.app.catalog.functions["leak"].func.__globals__["_KEPT"]
    first = weakref.ref(kept[0])
    del kept
    # What the gateway can promise about a leak is to keep serving; the memory comes back when
    # the module is reloaded (save it, or fix it), since a reload imports a fresh module object
    # and lets go of the old one, even though the unchanged module beside it still serves.
    (tmp_path / "leaky.py").write_text(LEAK + "VERSION = 2\n")
    wait_for(lambda: gw.client.post("/rest/version").json()["results"] == 2)
    gc.collect()
    assert first() is None, "the old module's memory is still held"
    assert gw.client.post("/rest/leak").json()["results"] == 1
    assert gw.client.post("/rest/steady").json()["results"] == 7


@pytest.mark.parametrize(
    "busy",
    ["time.sleep(1.5)", "deadline = time.monotonic() + 1.5\nwhile time.monotonic() < deadline:\n    pass"],
    ids=["waiting", "computing"],  # on the network, say, or holding the GIL
)
def test_a_slow_import_during_a_reload_blocks_no_request(served, tmp_path, busy: str) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "slow.py").write_text(LEAK + "VERSION = 1\n")
    gw = served(gateway.create_app(tmp_path, auth="off"))
    time.sleep(gateway.WATCH_DELAY + 0.2)
    (tmp_path / "slow.py").write_text("import time\n" + busy + "\n" + LEAK + "VERSION = 2\n")
    seen, slowest = set(), 0.0
    deadline = time.monotonic() + 10
    while 2 not in seen:  # the old version answers, promptly, until the new one is in
        assert time.monotonic() < deadline
        started = time.monotonic()
        seen.add(gw.client.post("/rest/version").json()["results"])
        slowest = max(slowest, time.monotonic() - started)
        assert gw.client.get("/healthz").status_code == 200
    assert seen == {1, 2} and gw.app.reloads == 1
    assert slowest < 0.5, f"a call took {slowest:.2f} s during the reload"


# -- modules that misbehave at import, as `python gateway.py` runs them ------------------------


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Gateway processes started by the test; whatever is left is killed with its children."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def start_gateway(processes, cwd: Path, *args: str, port: int = 0) -> tuple[subprocess.Popen[str], str]:  # type: ignore[no-untyped-def]
    """``python gateway.py ARGS`` in ``cwd`` on ``port`` (else a free one), once /healthz answers."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "gateway.py"), "--port", str(port), *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    processes.append(process)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            return process, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)


def sigterm(process: subprocess.Popen[str], seconds: float = 15) -> str:
    """SIGTERM, then the output; the process must have exited 0 within ``seconds``."""
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=seconds)
    assert process.returncode == 0, output
    return output


SIDE_EFFECTS = """
import os, sys, threading, time
print("imported, with side effects", flush=True)
os.makedirs("elsewhere", exist_ok=True)
os.chdir("elsewhere")
sys.path.insert(0, "/nowhere")
os.environ["GATEWAY_PORT"] = "1"
__all_exposed__ = ["where"]


def where() -> str:
    return os.getcwd()
"""
VERSION = '__all_exposed__ = ["version"]\n\n\ndef version() -> int:\n    return {}\n'


def test_a_module_that_changes_the_working_directory_at_import_breaks_nothing(processes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "a_side_effects.py").write_text(SIDE_EFFECTS)  # imported first
    (tmp_path / "modules" / "b_version.py").write_text(VERSION.format(1))
    process, url = start_gateway(processes, tmp_path, "--auth", "off", "--modules", "modules")  # a relative folder
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "functions": 2, "refused": []}
    assert httpx.post(f"{url}/rest/where").json()["results"] == str(tmp_path)  # changed back
    time.sleep(gateway.WATCH_DELAY + 0.3)
    (tmp_path / "modules" / "b_version.py").write_text(VERSION.format(2))
    wait_for(lambda: httpx.post(f"{url}/rest/version").json()["results"] == 2)  # the watcher watches modules/
    output = sigterm(process)
    assert "imported, with side effects" in output
    assert "a_side_effects.py changed the working directory at import; changed it back to" in output


STUCK = """
import threading, time
__all_exposed__ = [{"name": "hang", "timeout": 0.2}]


def _forever() -> None:
    while True:
        time.sleep(0.05)


threading.Thread(target=_forever, name="module-thread").start()  # not a daemon: exit would wait for it


def hang() -> str:
    time.sleep(3600)  # a thread cannot be killed: it runs on after its 504
    return "never"
"""


def test_sigterm_ends_the_process_even_with_a_hung_call_and_a_module_thread(processes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "stuck.py").write_text(STUCK)
    process, url = start_gateway(processes, tmp_path, "--auth", "off", "--modules", str(tmp_path))
    assert httpx.post(f"{url}/rest/hang").status_code == 504
    started = time.monotonic()
    output = sigterm(process, seconds=gateway.EXIT_GRACE + 10)
    assert time.monotonic() - started < gateway.EXIT_GRACE + 5
    assert "Application shutdown complete" in output  # drained and shut down first, as always
    assert "exiting with 2 thread(s) still running: " in output
    assert "module-thread" in output and "gateway-call" in output


def test_a_call_cut_off_by_the_stop_gets_a_signed_503_with_its_id(tmp_path, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    """Past the stop's grace period uvicorn cancels the calls still running; the gateway let the
    cancellation through, and uvicorn answered a bare text/plain 500 with no request id, which
    the clients called a forgery."""
    stack = make_stack(tmp_path, serve)
    stack.running.server.config.timeout_graceful_shutdown = 0.3  # type: ignore[attr-defined]
    gate = stack.running.app.catalog.functions["wait_for_gate"].func.__globals__["GATE"]  # type: ignore[attr-defined]
    gate.clear()
    threads, answers = in_threads(1, lambda: stack.call(target="/rest/wait_for_gate", body=b""))
    time.sleep(0.3)  # the call is in, waiting for a gate nobody opens (its timeout is the default 30 s)
    stack.running.server.should_exit = True  # type: ignore[attr-defined]
    threads[0].join(10)
    answer = answers[0]
    assert answer.status == 503 and answer.header("content-type") == "application/json"
    assert json.loads(answer.body)["error"] == {
        "code": "overloaded",
        "message": "the gateway is stopping: this call was cut off and may have run; check before retrying",
    }
    response_claims(stack, answer)  # signed, for this very request
    assert f"request {answer.header('x-request-id')}: `wait_for_gate` cut off: the gateway is stopping" in caplog.text


# -- stores that are locked, read-only or full ------------------------------------------------


def overloaded(stack: Stack, answer: Answer, message: str) -> None:
    """The fail-closed answer: a signed 503 `overloaded`, and the function did not run."""
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == {"code": "overloaded", "message": message}
    response_claims(stack, answer)  # signed for this very request


def in_threads(count: int, call: Callable[[], Any]) -> tuple[list[threading.Thread], list[Any]]:
    """Start ``count`` threads each making one call; (the threads, the list their results go to)."""
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def test_a_locked_replay_store_fails_closed_without_stalling_the_worker(tmp_path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    replay = s.SqliteReplayStore(tmp_path / "replay.db", clock=clock, timeout=0.5)
    stack = make_stack(tmp_path, serve, clock=clock, replay=replay)
    assert stack.call().status == 200
    before = stack.calls["add"]
    locker = sqlite3.connect(tmp_path / "replay.db", isolation_level=None)  # a backup, a stuck worker...
    locker.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        threads, answers = in_threads(4, stack.call)
        time.sleep(0.1)  # the four calls wait on the lock, each in its own thread
        started = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{stack.running.port}/healthz").status_code == 200
        assert time.monotonic() - started < 0.3, "the event loop waited for the lock"
        for thread in threads:
            thread.join(10)
        for answer in answers:
            overloaded(stack, answer, "replay protection unavailable")
        assert stack.calls["add"] == before
        # Every call fails now: /healthz said "ok" all the same (a full disk, as a lock), and a
        # load balancer kept the host in.
        health = httpx.get(f"http://127.0.0.1:{stack.running.port}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert health.json()["reason"].startswith("replay store failed: sqlite replay store: still locked")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert stack.call().status == 200  # the lock is gone: back by itself
    assert stack.calls["add"] == before + 1
    assert httpx.get(f"http://127.0.0.1:{stack.running.port}/healthz").status_code == 200


def test_a_full_sqlite_replay_store_makes_room_once_its_ids_have_expired(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Purged only after successful inserts, a full store (disk, or here SQLite's own page
    limit) stayed full, failing every call, after every id in it had expired."""
    clock = Clock(T0)
    store = s.SqliteReplayStore(tmp_path / "replay.db", clock=clock)
    store._db.execute("PRAGMA max_page_count = 30")  # a full disk, as SQLite reports it: SQLITE_FULL

    async def inserts(count: int) -> list[bool | str]:
        answers: list[bool | str] = []
        for _ in range(count):
            try:
                answers.append(store.check_and_insert(os.urandom(32), int(clock.now) + s.REPLAY_TTL))  # type: ignore[arg-type]
            except s.ReplayStoreError as exc:
                answers.append(str(exc))
        return answers

    filled = asyncio.run(inserts(20_000))
    assert "sqlite replay store: database or disk is full" in filled  # fails closed
    clock.now += s.REPLAY_TTL + s.MAX_SKEW + 1  # every id in it has expired (purged MAX_SKEW late)
    later = asyncio.run(inserts(50))
    assert later[-45:] == [True] * 45, later  # a call or two may fail while it makes room, then it fits


def test_a_replay_store_locked_only_briefly_just_delays_the_call(tmp_path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    stack = make_stack(tmp_path, serve, clock=clock, replay=s.SqliteReplayStore(tmp_path / "replay.db", clock=clock))
    locker = sqlite3.connect(tmp_path / "replay.db", isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, lambda: locker.execute("ROLLBACK")).start()
    started = time.monotonic()
    assert stack.call().status == 200  # waited for the lock in a thread, then went through
    assert 0.25 < time.monotonic() - started < 2
    locker.close()


def rotated(stack: Stack, cred: Cred | None = None) -> Cred:
    """Rotate a tenant's key (acme's by default); the successor its next answer delivers (rk)."""
    cred = cred or stack.acme
    stack.keystore.rotate(cred.tid)
    stack.clock.now += s.ROTATION_SETTLE  # rk is offered once every worker's cache knows the successor
    rk = response_claims(stack, stack.call(cred), cred).rk
    assert isinstance(rk, s.RotatedKey)
    return Cred(cred.tid, rk.kid, s.b64decode(rk.k))


def states(stack: Stack, tid: str = "acme") -> list[str]:
    return [row["state"] for row in stack.keystore.rows() if row["tid"] == tid]


def test_a_locked_keystore_defers_a_promotion_and_serves_the_call(tmp_path, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve)
    successor = rotated(stack)
    locker = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)  # `tenant add` mid-way, a backup...
    locker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        answer = stack.call(successor)  # the first use of the successor: it should be promoted now
        assert time.monotonic() - started < 1, "the worker waited for the keystore's lock"
        assert answer.status == 200 and json.loads(answer.body)["results"] == 3
        response_claims(stack, answer, successor)
        assert f"kid {successor.kid} not promoted yet: database is locked" in caplog.text
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert states(stack) == ["active", "pending"]  # nothing half-done: as before the call
    stack.clock.now += 1
    assert stack.call(successor).status == 200  # the lock is gone: promoted on this call
    assert states(stack) == ["retiring", "active"]
    assert stack.call().status == 200  # the old key, in its grace period


def test_a_locked_keystore_fails_an_otp_call_closed_with_a_signed_503(tmp_path, serve) -> None:  # type: ignore[no-untyped-def]
    """A right code that cannot be recorded as used could be used twice: 503, not a call and not a 500."""
    stack = make_stack(tmp_path, serve)
    totp = pyotp.TOTP(stack.keystore.otp_enroll("acme"))
    stack.clock.now += 1.5
    locker = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        answer = stack.call(target="/rest/guarded", body=b"", otp=totp.at(stack.clock.now))
        assert answer.status == 503 and json.loads(answer.body)["error"]["code"] == "overloaded"
        response_claims(stack, answer)  # after the token verified: signed
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert stack.call(target="/rest/guarded", body=b"", otp=totp.at(stack.clock.now)).status == 200  # by itself


def tenant_cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), "--db", str(db), "tenant", *args],
        cwd=db.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def intact(db: Path) -> bool:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as check:
        return check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@contextlib.contextmanager
def immutable(*files: Path) -> Iterator[None]:
    """Files no process may write, root included: chmod stops nothing for root, the immutable
    attribute (chattr +i, on ext4 where the tests' tmp folder is) stops root too, and even writes
    through descriptors opened before it was set. Give it a database and its -wal, not its -shm:
    that is SQLite's shared memory, mapped, and a write to a mapped page of an immutable file is
    SIGBUS, which no real read-only file system does to a mapping open for writing."""
    subprocess.run(["chattr", "+i", *map(str, files)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, files)], check=True)


def test_a_read_only_keystore_keeps_serving_and_refuses_changes_cleanly(tmp_path, serve) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve)
    successor = rotated(stack, stack.globex)
    db = tmp_path / "gw.db"
    rows = stack.keystore.rows()
    with immutable(db, Path(f"{db}-wal")):
        stack.clock.now += 1.5  # the worker reads the keystore again
        assert stack.call().status == 200  # reading works: every key is served as before
        assert stack.call(successor).status == 200  # its promotion cannot be written: deferred
        refused = tenant_cli(db, "rotate", "acme")
        assert (refused.returncode, refused.stdout) == (3, "")
        assert refused.stderr.startswith(f"gateway: the keystore {db} was not changed: ")
        with pytest.raises(sqlite3.Error):
            stack.keystore.rotate("acme")
        assert stack.keystore.rows() == rows
    assert intact(db)
    assert tenant_cli(db, "rotate", "acme").returncode == 0  # writable again: it works at once
    stack.clock.now += 1.5
    assert isinstance(response_claims(stack, stack.call()).rk, s.RotatedKey)
    assert stack.call(successor).status == 200 and states(stack, "globex") == ["retiring", "active"]  # promoted


def test_the_rotation_policy_outlives_a_failed_pass(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """--rotate-days: a pass that fails (here on a read-only keystore) is logged and tried again;
    the policy goes on and rotates once the keystore can be written. The retry pause is a parameter."""
    clock = Clock(T0)
    db = tmp_path / "gw.db"
    keystore = s.Keystore(db, clock=clock)
    keystore.add_tenant("acme")
    clock.now += 2 * 86400  # acme's key is now two days old
    app = gateway.create_app(FIXTURES / "e2e", settings=gateway.Settings(rotate_days=1, reload=False),
                             security=s.Security(keystore, s.MemoryReplayStore(clock=clock), "http://x", clock=clock))

    async def until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        with immutable(db, Path(f"{db}-wal")):
            policy = asyncio.create_task(app._rotate_by_policy(keystore, retry=0.01))
            await until(lambda: caplog.text.count("rotation policy failed, trying again in 0.01 s: ") >= 3)
        await until(lambda: [row["state"] for row in keystore.rows()] == ["active", "pending"])
        assert not policy.done()  # rotated, and waiting for the next hourly pass
        policy.cancel()

    with caplog.at_level(logging.INFO, logger="gateway"):
        asyncio.run(scenario())
    assert "rotation policy: tenant acme kid " in caplog.text
    assert "Traceback" not in caplog.text  # an expected store failure is one line, not a stack


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), so that a full disk is the kernel's ENOSPC. Mounting
    needs root with CAP_SYS_ADMIN, as the tests and CI have here; it fails loudly otherwise."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs here: {mounted.stderr!r}"
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(size))
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_fails_a_rotation_cleanly_and_every_key_keeps_working(tmp_path, serve, small_disk) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    db = small_disk / "gw.db"
    stack = make_stack(tmp_path, serve, clock=clock, keystore=s.Keystore(db, clock=clock))
    successor = rotated(stack, stack.globex)  # globex has a successor waiting for its first use
    stack.keystore._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # any change now has to grow a file
    rows = stack.keystore.rows()
    filler = fill(small_disk)
    refused = tenant_cli(db, "rotate", "acme")
    assert refused.returncode == 3 and refused.stderr.strip().endswith("database or disk is full"), refused.stderr
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        stack.keystore.rotate("acme")
    clock.now += 1.5
    assert stack.call().status == 200  # acme's key, as before
    assert stack.call(successor).status == 200  # the successor works; its promotion waits
    assert stack.keystore.rows() == rows and intact(db)  # nothing half-written
    filler.unlink()
    assert tenant_cli(db, "rotate", "acme").returncode == 0  # space again: it works, no restart
    clock.now += 1.5
    assert isinstance(response_claims(stack, stack.call()).rk, s.RotatedKey)
    assert stack.call(successor).status == 200 and states(stack, "globex") == ["retiring", "active"]
    assert intact(db)


def test_a_read_only_replay_store_fails_closed_and_recovers_by_itself(tmp_path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    path = tmp_path / "replay.db"
    stack = make_stack(tmp_path, serve, clock=clock, replay=s.SqliteReplayStore(path, clock=clock, timeout=0.3))
    assert stack.call().status == 200
    before = stack.calls["add"]
    with immutable(path, Path(f"{path}-wal")):
        for _ in range(3):
            overloaded(stack, stack.call(), "replay protection unavailable")
        assert stack.calls["add"] == before
    assert stack.call().status == 200  # writable again: no restart needed
    assert intact(path)


def test_a_replay_store_read_only_at_start_recovers_once_writable(tmp_path, serve) -> None:  # type: ignore[no-untyped-def]
    """SQLite opens a file it cannot write read-only, and that connection stays read-only after the
    file becomes writable: the store must drop it on the first refused write and open a new one."""
    clock = Clock(T0)
    path = tmp_path / "replay.db"
    made = s.SqliteReplayStore(path, clock=clock)  # an existing store, as a restart finds it
    assert made.check_and_insert(b"k" * 32, int(T0) + 50)
    with immutable(path, Path(f"{path}-wal")):
        store = s.SqliteReplayStore(path, clock=clock, timeout=0.3)  # starts on the read-only file
        stack = make_stack(tmp_path, serve, clock=clock, replay=store)
        before = stack.calls["add"]
        for _ in range(2):
            overloaded(stack, stack.call(), "replay protection unavailable")  # fails closed meanwhile
        assert stack.calls["add"] == before
    assert stack.call().status == 200  # writable again: no restart needed
    assert intact(path)


# -- processes stopped or killed under load, then restarted ------------------------------------


class Load:
    """Threads calling `add` with fresh STT1 tokens, one connection per call, until the gateway
    stops answering; keeps the tokens of calls that were answered 200 (and verified)."""

    def __init__(self, cred: s.Credential, port: int, threads: int = 4) -> None:
        self.cred, self.port = cred, port
        self.answered: list[str] = []  # tokens of verified 200s
        self.problems: list[str] = []  # anything but a verified 200 or a refused/dropped connection
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def first_served(self) -> None:
        """Wait out the memory store's first second, in which it refuses every token (README)."""
        deadline = time.monotonic() + 5
        while self.send(self.sign()[0])[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.25)  # a few refusals only: 30 a minute from one address are throttled

    def send(self, token: str) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Authorization": f"STT1 {token}", "Content-Type": "application/json"}
            conn.request("POST", "/rest/add", ADD, headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def sign(self) -> tuple[str, str]:
        return s.sign_request(self.cred, "POST", b"/rest/add", b"application/json", ADD, time.time())

    def _run(self) -> None:
        while not self.stop.is_set():
            token, jti = self.sign()
            try:
                status, headers, body = self.send(token)
            except (OSError, http.client.HTTPException):  # killed, or no longer accepting: the end
                return
            if status == 200 and body == b'{"results":3,"valid":true}' and self.verifies(jti, status, headers, body):
                self.answered.append(token)
            else:
                self.problems.append(f"{status} {body!r}")

    def verifies(self, jti: str, status: int, headers: list[tuple[str, str]], body: bytes) -> bool:
        token = dict((k.lower(), v) for k, v in headers).get("stt1-response", "")
        key = s.DirectionKey(self.cred.secret, "s2c", self.cred.tid, self.cred.kid)
        implicit = s.response_assertion(self.cred.url, jti, status, b"application/json", body)
        with contextlib.suppress(s.InvalidToken):
            return isinstance(s.open_token(key, token, implicit).claims, s.ResponseClaims)
        return False

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


@pytest.mark.parametrize("replay", ["sqlite", "memory"])
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopped_under_load_then_restarted_nothing_is_half_written_and_no_token_replays(
    processes, tmp_path, stop: signal.Signals, replay: str
) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(FIXTURES / "e2e" / "calls.py", tmp_path / "calls.py")
    args = ("--modules", str(tmp_path), "--db", str(tmp_path / "gw.db"), "--replay", replay, "--no-reload")
    process, url = start_gateway(processes, tmp_path, *args)  # a first run: it makes the tenant `demo`
    port = int(url.rsplit(":", 1)[1])
    load = Load(s.read_credential(tmp_path / "demo-credential.json"), port)
    load.first_served()
    load.start()
    time.sleep(0.5)  # calls in flight on every thread
    if stop == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    else:
        sigterm(process)
    load.join()
    assert load.problems == [] and len(load.answered) > 20
    files = [tmp_path / "gw.db"] + ([tmp_path / "gw.db.replay"] if replay == "sqlite" else [])
    assert all(intact(file) for file in files)  # a kill mid-write leaves every database whole

    process, _ = start_gateway(processes, tmp_path, *args, port=port)  # the same port, files and tenant
    load.first_served()
    # The last ones answered before the stop, the likeliest to be lost, and some from throughout:
    # 20, under the 30 refusals a minute after which one address is throttled (429).
    sample = load.answered[-10:] + load.answered[: -10 : max(1, len(load.answered) // 10)][:10]
    replays = [load.send(token)[0] for token in sample]
    assert set(replays) == {401}, "a token answered before the restart was accepted again"
    assert load.send(load.sign()[0])[0] == 200
    sigterm(process)
