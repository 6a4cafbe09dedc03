"""Microseconds per request that STT1 adds on the server: verify the request token, remember
its jti, and sign the answer. Run: python bench/micro_stt1.py [--n 20000]

It times exactly the calls the middleware makes (security.Security._handle), minus the
network: parse, audience/method/target/body assertion, open_token (HMAC then AES-CTR),
the replay store insert, and mint of the s2c answer token. Tokens are minted beforehand,
one per request, since each may be used once. Reports the median of several runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        keystore = s.Keystore(Path(folder) / "gw.db", master_key=bytes(32))
        kid, k = keystore.add_tenant("bench")
        for name, make in [("memory", lambda: s.MemoryReplayStore()),
                           ("sqlite", lambda: s.SqliteReplayStore(Path(folder) / f"r{time.perf_counter_ns()}.db"))]:
            runs = [one_run(args.n, keystore, "bench", kid, k, make()) for _ in range(args.runs)]
            print(f"verify + replay ({name}) + sign: median {statistics.median(runs):.1f} us per request "
                  f"(min {min(runs):.1f}, max {max(runs):.1f}; {args.runs} runs of {args.n})")


if __name__ == "__main__":
    main()
