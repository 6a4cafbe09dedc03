"""Microseconds per request that STT1 adds on the server: verify the request token, remember
its jti, and sign the answer. Run: python bench/micro_stt1.py [--n 20000]

Two figures, each the median of several runs, tokens minted beforehand (one per request,
since each may be used once):

- the token work, the figure the issue's 25 us target is about ("verify + sign"): the calls
  security.Security._handle and its signing wrapper make on the token itself, in a straight
  line. That is parse, the audience/method/target/body assertion, open_token (HMAC, then
  AES-CTR), the replay store insert, and the mint of the answer's token;
- the whole middleware: Security.wrap around an ASGI app that answers at once, driven with
  ASGI messages, less the same app driven without it. On top of the token work, it reads the
  headers and the body, checks the clock and the key's state twice, builds the caller, and
  buffers and re-sends the answer with its token.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import security as s  # noqa: E402 (after the sys.path line)

AUD = "http://127.0.0.1:8000"
BODY = b'{"a": 1, "b": 2}'
ANSWER = b'{"results":3.0,"valid":true}'


def one_run(n: int, keystore: s.Keystore, tid: str, kid: str, k: bytes, replay: object) -> float:
    now = int(time.time())
    client_key = s.DirectionKey(k, "c2s", tid, kid)
    implicit = s.request_assertion(AUD, "POST", b"/rest/add/", b"application/json", BODY)
    tokens = [s.mint(client_key, now, s.RequestClaims(jti=s.new_jti()), implicit) for _ in range(n)]
    started = time.perf_counter()
    for token in tokens:
        parsed = s.parse(token)
        footer = parsed.footer
        key = keystore.snapshot().keys[(footer.tid, footer.kid)]
        claims = s.open_token(key.c2s, parsed, s.request_assertion(
            AUD, "POST", b"/rest/add/", b"application/json", BODY)).claims
        assert replay.check_and_insert(s.replay_key(tid, kid, claims.jti), footer.iat + s.REPLAY_TTL)  # type: ignore[attr-defined]
        s.mint(key.s2c, now, s.ResponseClaims(jti=s.new_jti()),
               s.response_assertion(AUD, claims.jti, 200, b"application/json", ANSWER))
    return (time.perf_counter() - started) / n * 1e6


async def _answer(scope: object, receive: object, send: Callable[[dict[str, object]], Any]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


def middleware_run(n: int, keystore: s.Keystore, tid: str, kid: str, k: bytes) -> float:
    """Microseconds per request of Security.wrap(app) over app alone, both driven by ASGI calls."""
    now = int(time.time())
    guard = s.Security(keystore, s.MemoryReplayStore(), AUD, boot_time=now - 100)
    client_key = s.DirectionKey(k, "c2s", tid, kid)
    implicit = s.request_assertion(AUD, "POST", b"/rest/add/", b"application/json", BODY)
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"content-length", b"16")]
    scopes = [
        {
            "type": "http", "method": "POST", "path": "/rest/add/", "raw_path": b"/rest/add/", "query_string": b"",
            "client": ("127.0.0.1", 5000),
            "headers": [*headers, (b"authorization", b"STT1 " + s.mint(client_key, now, s.RequestClaims(
                jti=s.new_jti()), implicit).encode())],
        }  # fmt: skip
        for _ in range(n)
    ]
    statuses: list[int] = []
    request = {"type": "http.request", "body": BODY, "more_body": False}

    async def receive() -> dict[str, object]:
        return request

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def drive(app: Any) -> float:
        started = time.perf_counter()
        for scope in scopes:
            await app(dict(scope), receive, send)
        return time.perf_counter() - started

    bare = asyncio.run(drive(_answer))
    statuses.clear()
    wrapped = asyncio.run(drive(guard.wrap(_answer)))
    if statuses != [200] * n:  # a refused token would make the middleware look cheap
        raise RuntimeError(f"the middleware refused: {sorted(set(statuses))}")
    return (wrapped - bare) / n * 1e6


def primitives_only(local_key: s._LocalKey) -> None:
    """The primitive calls of one verify + sign in a straight line, none of the protocol around
    them (parse, checks, claims, replay store): the floor any Python STT1 server pays here."""
    for _ in range(2):  # open the request token, then seal the answer's
        nonce = os.urandom(32)
        hashlib.sha256(BODY).digest()
        tag = s._hmac_sha384(local_key.auth_key(nonce), bytes(200))
        ek, n2 = local_key.encryption_key(nonce)
        s.b64encode(nonce + s._aes_ctr(ek, n2, ANSWER) + tag)
    hashlib.sha256(os.urandom(16)).digest()  # the answer's jti, and the replay key


def reference() -> dict[str, float]:
    """What this machine's primitives cost (best of 5), to read the absolute figures against.

    The issue's 25 us budget was set where one hmac.digest costs about 1 us and PASETO v3.local
    through cryptography's HKDF objects about 20 us per token; pyseto is that implementation,
    so timing it here tells how this machine compares with the one the budget was set on.
    """
    import pyseto  # the dev requirements pin it (the tests check our tokens against it)

    key, counter, message = bytes(32), bytes(16), bytes(200)
    local_key = s._LocalKey(key)
    paseto_key = pyseto.Key.new(version=3, purpose="local", key=key)
    claims = msgspec.json.encode(s.RequestClaims(jti=s.new_jti()))
    footer = s.build_footer("c2s", "bench", s.b64encode(os.urandom(16)), int(time.time()))
    implicit = s.request_assertion(AUD, "POST", b"/rest/add/", b"application/json", BODY)
    token = pyseto.encode(paseto_key, claims, footer, implicit)

    def best(call: Callable[[], object]) -> float:
        return min(timeit.repeat(call, number=20000, repeat=5)) / 20000 * 1e6

    return {
        "hmac.digest(SHA-384, 200 B)": best(lambda: hmac.digest(key, message, "sha384")),
        "AES-256-CTR of 32 B (Cipher)": best(
            lambda: Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor().update(message[:32])
        ),
        "os.urandom(32)": best(lambda: os.urandom(32)),
        "the primitives of one verify + sign, nothing else (floor)": best(lambda: primitives_only(local_key)),
        "pyseto v3.local encrypt, one token (the issue: about 20 us)": best(
            lambda: pyseto.encode(paseto_key, claims, footer, implicit)
        ),
        "pyseto v3.local decrypt, one token (the issue: about 20 us)": best(
            lambda: pyseto.decode(paseto_key, token, implicit_assertion=implicit)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout (for bench/run.py)")
    args = parser.parse_args()
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        keystore = s.Keystore(Path(folder) / "gw.db", master_key=bytes(32))
        kid, k = keystore.add_tenant("bench")
        for name, make in [
            ("memory", lambda: s.MemoryReplayStore()),
            ("sqlite", lambda: s.SqliteReplayStore(Path(folder) / f"r{time.perf_counter_ns()}.db")),
        ]:
            runs = [one_run(args.n, keystore, "bench", kid, k, make()) for _ in range(args.runs)]
            figures[name] = {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}
            if not args.json:
                print(
                    f"verify + replay ({name}) + sign: median {statistics.median(runs):.1f} us per request "
                    f"(min {min(runs):.1f}, max {max(runs):.1f}; {args.runs} runs of {args.n})"
                )
        runs = [middleware_run(args.n, keystore, "bench", kid, k) for _ in range(args.runs)]
        figures["middleware"] = {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}
        if not args.json:
            print(
                f"the whole middleware (memory store): median {statistics.median(runs):.1f} us per request "
                f"(min {min(runs):.1f}, max {max(runs):.1f}; {args.runs} runs of {args.n})"
            )
    figures["reference"] = reference()
    if args.json:
        print(json.dumps(figures))
    else:
        for what, us in figures["reference"].items():  # type: ignore[attr-defined]
            print(f"reference: {what}: {us:.2f} us")


if __name__ == "__main__":
    main()
