"""(Re)generate the seed corpora ``fuzz/corpus/token/`` and ``fuzz/corpus/request/``.

A fuzzer starts from these: valid tokens and valid requests reach the deep code (MAC check,
claims, dispatch, binding) that random bytes almost never would. The output is deterministic
(fixed keys and nonces; request tokens are placeholders signed at run time), so running this
again rewrites the same files. ``regress-*`` seeds are inputs that once crashed a harness.

    .venv/bin/python fuzz/seed.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import common

security = common.security  # common puts the repository root on sys.path first

CORPUS = Path(__file__).resolve().parent / "corpus"
JSON = (b"content-type", b"application/json")
SIGNED = (b"authorization", b"STT1 @")


def post(target: str, body: object = None, *extra: tuple[bytes, bytes]) -> bytes:
    """A signed POST with a JSON body (none when ``body`` is None)."""
    raw = b"" if body is None else json.dumps(body).encode()
    headers = [SIGNED, JSON] if raw else [SIGNED]
    return common.Request("POST", target.encode(), [*headers, *extra], raw).encode()


def request_seeds() -> dict[str, bytes]:
    def raw(method: str, target: str, *headers: tuple[bytes, bytes], body: bytes = b"") -> bytes:
        return common.Request(method, target.encode(), list(headers), body).encode()

    add = {"a": 1, "b": 2}
    return {
        "add": post("/rest/add", add),
        "add-var1": post("/rest/add/1", {"b": 2.5}),
        "add-query": post("/rest/add?x=1&y=%20", add),
        "add-trailing-slash": post("/rest/add/", add),
        "count-var1": post("/rest/count/5"),
        "slug-var1": post("/rest/slug/Hello%20World", {"separator": "_"}),
        "stock": post("/rest/stock", {"sku": "apple"}),
        "when-var1": post("/rest/when/2026-11-28"),
        "scale": post("/rest/scale", {"values": [1, 2.5, -3e10], "factor": 2}),
        "order": post("/rest/order", {"item": {"sku": "a", "qty": 2, "tags": ["x"]}, "rush": True}),
        "choose": post("/rest/choose/a", {"note": None}),
        "blob": post("/rest/blob", {"data": "aGVsbG8="}),
        "nothing": post("/rest/nothing"),
        "acme-only": post("/rest/acme_only"),
        "guarded-otp": post("/rest/guarded"),
        "funcname": post("/rest/", {"funcName": "add", **add}),
        "catalog": raw("GET", "/rest/", SIGNED),
        "request-id": post("/rest/add", add, (b"x-request-id", b"fuzz-1")),
        "chunked-length": post("/rest/add", add, (b"content-length", b"13")),
        "get-405": raw("GET", "/rest/add", SIGNED),
        "text-415": raw("POST", "/rest/add", SIGNED, (b"content-type", b"text/plain"), body=b"{}"),
        "declared-413": post("/rest/add", add, (b"content-length", b"99999999")),
        "missing-404": post("/rest/missing", {}),
        "string-422": post("/rest/add", {"a": "1", "b": 2}),
        "bad-json-400": raw("POST", "/rest/add", SIGNED, JSON, body=b'{"a": 1,'),
        "mutated-delete": raw("POST", "/rest/add", (b"authorization", b"STT1 @40"), JSON, body=b"{}"),
        "mutated-replace": raw("POST", "/rest/add", (b"authorization", b"STT1 @200:x"), JSON, body=b"{}"),
        "mutated-footer": raw("POST", "/rest/nothing", (b"authorization", b"STT1 @9999:A")),
        "two-authorizations": raw("POST", "/rest/nothing", SIGNED, SIGNED),
        "no-token": raw("POST", "/rest/add", JSON, body=b'{"a": 1, "b": 2}'),
        "junk-token": raw("POST", "/rest/add", (b"authorization", b"STT1 v3.local.AAAA.YzJzLmFjbWU")),
        "healthz": raw("GET", "/healthz"),
        "healthz-post": raw("POST", "/healthz"),
        "openapi": raw("GET", "/openapi.json"),
        "console": raw("GET", "/console"),
        "static": raw("GET", "/static/stt1.js", (b"if-none-match", b'"x"')),
        "static-head": raw("HEAD", "/static/console.css"),
        "static-nul": raw("GET", "/static/%00"),
        "nowhere": raw("OPTIONS", "/nowhere"),
        # Inputs that once crashed fuzz_request.py (bad UTF-8 and deep nesting in a JSON body: 500s).
        "regress-bad-utf8": raw("POST", "/rest/add", SIGNED, JSON, body=b'{"a-\xc8\xdf1, "b": 2}'),
        "regress-deep-json": raw("POST", "/rest/add", SIGNED, JSON, body=b"[" * 3000),
        # ... and Starlette's text/plain 400 for a malformed Range on a file.
        "regress-range": raw("GET", "/console", (b"range", b"ttif")),
    }


def token_seeds() -> dict[str, bytes]:
    minted = common.minted_tokens()
    seeds = {}
    for mode, direction in enumerate(security.DIRECTIONS):
        for n, token in enumerate(minted[direction]):
            seeds[f"{direction}-{n}"] = bytes([mode]) + token.encode("ascii")
        seeds[f"{direction}-truncated"] = bytes([mode]) + minted[direction][0][:-3].encode("ascii")
    jti = common.RESPONSE_JTI
    payloads = {
        "jti": {"jti": jti},
        "otp": {"jti": jti, "otp": "123456"},
        "unknown": {"jti": jti, "admin": True},
        "rk": {"jti": jti, "rk": {"kid": jti, "k": "A" * 43}},
    }
    for name, payload in payloads.items():
        seeds[f"payload-{name}"] = b"\x02" + json.dumps(payload).encode()
    seeds["regress-payload-bad-utf8"] = b'\x02{"jti":"\xc8"}'  # once escaped open_token as UnicodeDecodeError
    seeds["b64"] = b"\x03" + security.b64encode(bytes(range(7))).encode()
    return seeds


def write(name: str, seeds: dict[str, bytes]) -> None:
    folder = CORPUS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for seed, data in seeds.items():
        (folder / seed).write_bytes(data)
    print(f"{folder}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


def main() -> int:
    write("token", token_seeds())
    write("request", request_seeds())
    return 0


if __name__ == "__main__":
    sys.exit(main())
