"""What the fuzz harnesses, the seed script and the property tests share.

A real gateway app with STT1 on (a keystore in a temporary folder, a fixed clock, the total
functions of ``tests/fixtures/fuzz``), a way to run one HTTP request through it in-process as
uvicorn would hand it over, the request input format of ``fuzz_request.py``, and the oracles:
what every answer must look like. Nothing here imports atheris, so tests can use it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python fuzz/<harness>.py`: the gateway lives one folder up
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

import gateway_app as gateway  # noqa: E402
import security  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "fuzz"
AUD = "http://127.0.0.1:8000"
T0 = 1_800_000_000  # the fixed "now" of every app built here: nothing waits on the real clock
UNAUTHORIZED = b'{"valid":false,"error":{"code":"unauthorized","message":"missing, invalid or expired token"}}'
_CODE = re.compile(r"[a-z][a-z_]*")  # the error codes are snake_case words: unauthorized, bad_json, ...
MAX_BODY = 4096  # small, so the fuzzers reach the 413 paths of the gateway


class Clock:
    """A settable clock: the app's notion of now, independent of the wall clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ErrorDetail(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    message: str


class ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    valid: bool
    error: ErrorDetail


_decode_error = msgspec.json.Decoder(ErrorBody).decode


def error_problem(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> str | None:
    """Why this answer breaks the error model (DESIGN.md), or None when it keeps it.

    Never a 500 (every 500 here is a gateway bug: the fixture functions cannot raise), and every
    4xx/5xx is ``{"valid": false, "error": {"code", "message"}}`` served as application/json.
    """
    if status == 500 or not 100 <= status <= 599:
        return f"status {status}: {body[:300]!r}"
    if status < 400:
        return None
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if content_type.split(b";")[0].strip() != b"application/json":
        return f"status {status} with content-type {content_type!r}"
    try:
        error = _decode_error(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return f"status {status} body is not the JSON error shape ({exc}): {body[:300]!r}"
    if error.valid is not False or not _CODE.fullmatch(error.error.code):
        return f"status {status} with an unexpected error {error!r}"
    return None


@dataclasses.dataclass
class Stack:
    """A secured gateway app and what a client needs to talk to it."""

    app: gateway.Gateway
    guard: security.Security  # the STT1 middleware: its replay store is swapped on long runs
    clock: Clock
    credential: security.Credential  # tenant "acme": may call every function
    calls: dict[str, int]  # the fixture's call counter: proves a refused request ran nothing

    def sign(self, method: str, target: bytes, content_type: bytes, body: bytes) -> tuple[str, str]:
        """A fresh valid token (and its jti) for exactly this request, at the app's now."""
        return security.sign_request(self.credential, method, target, content_type, body, self.clock())

    def s2c(self) -> security.DirectionKey:
        c = self.credential
        return security.DirectionKey(c.secret, "s2c", c.tid, c.kid)

    def fresh_replay_store(self) -> None:
        """Forget every jti: long runs at a fixed clock would otherwise fill the store (a 503)."""
        self.guard.replay = security.MemoryReplayStore(clock=self.clock)


def build_stack(folder: Path | None = None, modules: Path = FIXTURE) -> Stack:
    """A gateway app with STT1 on over ``modules``, its keystore in ``folder``: by default a new
    temporary folder inside $FUZZ_STATE_DIR (which run.py sets and removes after the run: libFuzzer
    ends the process without running any cleanup) or else in the system's temporary folder.

    The throttle never trips (a fuzzer sends thousands of bad tokens from one address) and the
    clock stands still at T0, so a token signed for T0 is valid for the whole run. /metrics is on:
    its request tracking wraps every /rest call.
    """
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="gw-fuzz-", dir=os.environ.get("FUZZ_STATE_DIR")))
    clock = Clock(T0)
    settings = gateway.Settings(db=str(folder / "gw.db"), reload=False, max_body=MAX_BODY, timeout=5.0, metrics=True)
    keystore = security.Keystore(settings.db, master_key=bytes(32), clock=clock)
    kid, k = keystore.add_tenant("acme")
    keystore.add_tenant("globex", functions=["add", "slug"])
    guard = security.Security(
        keystore,
        security.MemoryReplayStore(clock=clock),
        AUD,
        clock=clock,
        boot_time=T0 - 100,
        throttle=security.Throttle(per_address=10**12, per_tenant=10**12),
    )
    app = gateway.create_app(modules, settings=settings, security=guard)
    credential = security.Credential(stt=1, url=AUD, tid="acme", kid=kid, k=security.b64encode(k))
    calls = app.catalog.functions["add"].func.__globals__["CALLS"]
    return Stack(app, guard, clock, credential, calls)


# -- one request, in-process -----------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """An HTTP request as uvicorn's parser hands it to the app (header names lower-cased)."""

    method: str
    target: bytes  # raw path, plus "?query" when there is one
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: int = 1  # how many http.request messages the body arrives in

    def encode(self) -> bytes:
        """The fuzz input that ``parse_input`` reads back as this request (for seeds)."""
        lines = [f"{self.method} ".encode() + self.target]
        lines += [name + b": " + value for name, value in self.headers]
        return b"\n".join(lines) + b"\n\n" + self.body


@dataclasses.dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: methods and header names
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII: what the HTTP parsers pass on
_FIELD_VALUE = re.compile(rb"[^\x00\r\n]*")


def parse_input(data: bytes) -> Request | None:
    """Read a fuzz input, ``METHOD TARGET\\nName: value\\n...\\n\\nbody``, or None if no HTTP parser
    would have passed such a request line to the app (so the app never sees it).

    A blank line ends the headers; without one there is no body. ``\\r\\n`` works too. A header
    line no parser would accept is left out, not the whole input: most mutations of the head
    land in one, and the request without that line is still one the app can be sent.
    """
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    method, _, target = lines[0].partition(b" ")
    target = target.strip(b" ")
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target) or b"#" in target:
        return None
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if colon and _TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value):
            headers.append((name.lower(), value))
    return Request(method.decode("ascii"), target, headers, body)


def scope_for(request: Request) -> dict[str, Any]:
    """The ASGI scope uvicorn (httptools) builds for this request."""
    raw_path, _, query = request.target.partition(b"?")
    path = raw_path.decode("ascii")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "root_path": "",
        "method": request.method,
        "path": unquote(path) if "%" in path else path,
        "raw_path": raw_path,
        "query_string": query,
        "headers": list(request.headers),
    }


async def run_request(app: Any, request: Request, timeout: float = 5.0) -> Answer:
    """Send one request through the ASGI app; AssertionError if it breaks the ASGI contract.

    The body arrives in ``request.chunks`` messages; after that ``receive`` waits, as on a live
    connection. An app that takes longer than ``timeout`` is a hang: TimeoutError.
    """
    body = request.body
    pieces = max(1, request.chunks)
    size = -(-len(body) // pieces) or 1
    messages = [
        {"type": "http.request", "body": body[i : i + size], "more_body": i + size < len(body)}
        for i in range(0, max(len(body), 1), size)
    ]
    sent: list[dict[str, Any]] = []
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await never
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await asyncio.wait_for(app(scope_for(request), receive, send), timeout)
    finally:
        never.cancel()
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, f"{len(starts)} response starts"
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(starts[0]["status"], [(bytes(k), bytes(v)) for k, v in starts[0].get("headers", [])], body_out)


def routed_to_rest(request: Request) -> bool:
    """Whether the gateway sends this request through the STT1 middleware (see Gateway.__call__)."""
    path = scope_for(request)["path"]
    return bool(path == "/rest" or path.startswith("/rest/"))


def verify_response(stack: Stack, request_jti: str, answer: Answer) -> None:
    """Check the answer's STT1-Response token as a client must (PROTOCOL.md 4); InvalidToken if not."""
    token = answer.header(b"stt1-response")
    if token is None:
        raise security.InvalidToken()
    implicit = security.response_assertion(
        AUD, request_jti, answer.status, answer.header(b"content-type") or b"", answer.body
    )
    security.open_token(stack.s2c(), token.decode("latin-1"), implicit)


def content_type_of(request: Request) -> bytes:
    """The Content-Type the server binds into the token: the last one, as both readers take it."""
    return next((v for k, v in reversed(request.headers) if k == b"content-type"), b"")


def sign_placeholders(stack: Stack, request: Request) -> tuple[Request, str | None, bool]:
    """Put real tokens where the input says ``Authorization: STT1 @``; the seeds rely on it.

    Keys are made afresh per run, so an input cannot carry a valid token itself: ``@`` stands
    for a token signed now for exactly this request, ``@N`` for that token with its character N
    (modulo its length) deleted, ``@N:TEXT`` with that character replaced by TEXT. Returns the
    request to send, the signed token's jti (None if none was signed) and whether every
    Authorization header holds the exact signed token (anything else must be refused).
    """
    jti = None
    token = ""
    headers = []
    for name, value in request.headers:
        if name == b"authorization" and value.startswith(b"STT1 @"):
            if jti is None:
                token, jti = stack.sign(request.method, request.target, content_type_of(request), request.body)
            spec = value[len(b"STT1 @") :]
            digits, colon, text = spec.partition(b":")
            raw = token.encode("ascii")
            if digits.isdigit() and len(digits) < 6:
                at = int(digits) % len(raw)
                raw = raw[:at] + (text if colon else b"") + raw[at + 1 :]
            value = b"STT1 " + raw
        headers.append((name, value))
    auths = [value for name, value in headers if name == b"authorization"]
    exact = bool(auths) and all(value == b"STT1 " + token.encode("ascii") for value in auths)
    return dataclasses.replace(request, headers=headers), jti, exact


# -- fixed keys and tokens for fuzz_token.py -----------------------------------------------------

TOKEN_K = bytes(range(32))
TOKEN_TID = "acme"
TOKEN_KID = security.b64encode(bytes(range(16, 32)))
REQUEST_IMPLICIT = security.request_assertion(AUD, "POST", b"/rest/add", b"application/json", b'{"a":1,"b":2}')
RESPONSE_JTI = security.b64encode(bytes(16))
RESPONSE_IMPLICIT = security.response_assertion(AUD, RESPONSE_JTI, 200, b"application/json", b'{"results":3}')


def token_keys() -> dict[str, security.DirectionKey]:
    """The fixed c2s and s2c keys fuzz_token.py opens tokens with."""
    return {d: security.DirectionKey(TOKEN_K, d, TOKEN_TID, TOKEN_KID) for d in security.DIRECTIONS}


def minted_tokens() -> dict[str, list[str]]:
    """Valid tokens, the same on every run (fixed nonces): the only ones fuzz_token.py may accept.

    Per direction: a few iats (step boundaries included), with and without the optional claims.
    """
    keys = token_keys()
    rotated = security.RotatedKey(kid=security.b64encode(bytes(range(100, 116))), k=security.b64encode(bytes(32)))
    claims: dict[str, list[security.RequestClaims | security.ResponseClaims]] = {
        "c2s": [security.RequestClaims(jti=RESPONSE_JTI), security.RequestClaims(jti=TOKEN_KID, otp="123456")],
        "s2c": [security.ResponseClaims(jti=TOKEN_KID), security.ResponseClaims(jti=TOKEN_KID, rk=rotated)],
    }
    implicit = {"c2s": REQUEST_IMPLICIT, "s2c": RESPONSE_IMPLICIT}
    minted: dict[str, list[str]] = {"c2s": [], "s2c": []}
    for d, (direction, key) in enumerate(keys.items()):
        for n, (iat, claim) in enumerate((i, c) for i in (T0, T0 + 29, 0, 9_999_999_999) for c in claims[direction]):
            nonce = bytes([n, d]) * 16
            minted[direction].append(security.mint(key, iat, claim, implicit[direction], nonce=nonce))
    return minted
