"""Shared fixtures: a real uvicorn server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import gateway_app as gateway
import security

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


class Running:
    """A gateway app served by uvicorn on 127.0.0.1:<free port> until the test ends."""

    def __init__(self, app: gateway.Gateway):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(gateway._uvicorn_config(app, app.settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def post(self, path: str, json: object = None, **kwargs: object) -> httpx.Response:
        return self.client.post(path, json=json, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[object]:
    """Call ``serve(app)`` to run an app for this test; every server is stopped afterwards."""
    running: list[Running] = []

    def start(app: gateway.Gateway) -> Running:
        running.append(Running(app))
        return running[-1]

    yield start
    for server in running:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Secured:
    app: gateway.Gateway
    settings: gateway.Settings
    keystore: security.Keystore
    cred: Path  # a credential file for the tenant "acme", whose url is the server's origin


@contextlib.contextmanager
def secured_server(
    folder: Path,
    tmp_path: Path,
    public_url: str = "",
    throttle: security.Throttle | None = None,
    **overrides: Any,
) -> Iterator[Secured]:
    """A gateway with STT1 on, serving ``folder`` on a free port chosen before the app is built
    (the credential's url, the audience, names it unless ``public_url`` does: a proxy in front),
    with a tenant ``acme`` and its credential. ``throttle``: failure limits other than the defaults;
    ``overrides``: other Settings (max_body, concurrency, ...)."""
    settings = gateway.Settings(port=free_port(), db=str(tmp_path / "gw.db"), public_url=public_url, **overrides)
    keystore = security.Keystore(settings.db)
    kid, k = keystore.add_tenant("acme")
    cred = tmp_path / "acme.json"
    security.write_credential(
        cred, security.Credential(stt=1, url=settings.audience, tid="acme", kid=kid, k=security.b64encode(k))
    )
    # Tokens of the boot second itself are refused with the memory store (PROTOCOL 3.3, the safer
    # reading): this server's clock starts a second early instead of the test waiting.
    guard = security.Security(
        keystore,
        security.MemoryReplayStore(),
        settings.audience,
        boot_time=time.time() - 1,
        throttle=throttle,
    )
    app = gateway.create_app(folder, settings=settings, security=guard)
    server = uvicorn.Server(gateway._uvicorn_config(app, settings))
    sock = gateway._listen("127.0.0.1", settings.port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield Secured(app, settings, keystore, cred)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Gateway processes a test starts (in their own session); all are killed, workers too, at the end."""
    running: list[subprocess.Popen[str]] = []
    yield running
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
