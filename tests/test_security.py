"""STT1 on the wire (PROTOCOL.md 3 and 8), against a real uvicorn server on a loopback port.

The server's clock is a parameter, so time windows are tested to the second without waiting.
Every refusal also checks that the handler did not run and that the answer gives no hint.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pyotp
import pytest

import gateway_app as gateway
import security as s
from conftest import FIXTURES, ROOT

AUD = "https://api.example.test"  # never derived from the Host header, which is 127.0.0.1:port here
T0 = 1_800_000_000.0
BODY = b'{"a": 1, "b": 2}'
JSON = b"application/json"
UNAUTHORIZED = b'{"valid":false,"error":{"code":"unauthorized","message":"missing, invalid or expired token"}}'


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Cred:
    tid: str
    kid: str
    k: bytes


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    jti: str = ""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return values[0] if values else None


@dataclass
class Stack:
    """A gateway with STT1 on, its keystore, its clock, and two tenants."""

    running: object
    keystore: s.Keystore
    security: s.Security
    clock: Clock
    acme: Cred
    globex: Cred
    calls: dict = field(default_factory=dict)

    def send(self, method: str, target: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=10)  # type: ignore[attr-defined]
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers or []:
                conn.putheader(name, value)
            if body or method == "POST":
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return Answer(response.status, response.getheaders(), response.read())
        finally:
            conn.close()

    def call(
        self,
        cred: Cred | None = None,
        *,
        method: str = "POST",
        target: str = "/rest/add",
        body: bytes = BODY,
        content_type: bytes = JSON,
        **token_options: object,
    ) -> Answer:
        """A correctly signed request unless token_options say otherwise; checks nothing."""
        cred = cred or self.acme
        token, jti = mint_request(cred, method, target.encode(), content_type, body, int(self.clock()), **token_options)  # type: ignore[arg-type]
        headers = [("Authorization", f"STT1 {token}")]
        if content_type:
            headers.append(("Content-Type", content_type.decode()))
        answer = self.send(method, target, body, headers)
        answer.jti = jti
        return answer

    def with_token(self, token: str, target: str = "/rest/add", body: bytes = BODY) -> Answer:
        return self.send(
            "POST", target, body, [("Authorization", f"STT1 {token}"), ("Content-Type", "application/json")]
        )


def mint_request(
    cred: Cred,
    method: str,
    target: bytes,
    content_type: bytes,
    body: bytes,
    iat: int,
    *,
    jti: str | None = None,
    aud: str = AUD,
    direction: str = "c2s",
    otp: str | None = None,
) -> tuple[str, str]:
    jti = jti or s.new_jti()
    key = s.DirectionKey(cred.k, direction, cred.tid, cred.kid)
    implicit = s.request_assertion(aud, method, target, content_type, body)
    if direction == "c2s":
        claims = s.RequestClaims(jti=jti, otp=otp) if otp else s.RequestClaims(jti=jti)
        return s.mint(key, iat, claims, implicit), jti
    # A request signed with the s2c key but wearing a c2s footer: only the key is wrong.
    step = s.step_key(s.direction_key(cred.k, "s2c", cred.tid, cred.kid), s.time_step(iat))
    footer = s.build_footer("c2s", cred.tid, cred.kid, iat)
    return s.encrypt(step, msgspec.json.encode({"jti": jti}), footer, implicit), jti


def raw_token(cred: Cred, payload: bytes, iat: int, implicit: bytes, footer: bytes | None = None) -> str:
    """A well-signed token around any payload: for payload strictness tests."""
    step = s.step_key(s.direction_key(cred.k, "c2s", cred.tid, cred.kid), s.time_step(iat))
    return s.encrypt(step, payload, footer or s.build_footer("c2s", cred.tid, cred.kid, iat), implicit)


def response_claims(stack: Stack, answer: Answer, cred: Cred | None = None) -> s.ResponseClaims:
    """Verify the server's token exactly as a client must (PROTOCOL.md 4)."""
    cred = cred or stack.acme
    token = answer.header("stt1-response")
    assert token is not None, "the answer is not signed"
    implicit = s.response_assertion(
        AUD, answer.jti, answer.status, (answer.header("content-type") or "").encode(), answer.body
    )
    claims = s.open_token(s.DirectionKey(cred.k, "s2c", cred.tid, cred.kid), token, implicit).claims
    assert isinstance(claims, s.ResponseClaims)
    return claims


def make_stack(
    tmp_path: Path,
    serve,
    *,
    replay: object | None = None,
    clock: Clock | None = None,  # type: ignore[no-untyped-def]
    keystore: s.Keystore | None = None,
    throttle: s.Throttle | None = None,
) -> Stack:
    clock = clock or Clock(T0)
    keystore = keystore or s.Keystore(tmp_path / "gw.db", clock=clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    globex = Cred("globex", *keystore.add_tenant("globex", functions=["add", "echo"]))
    security = s.Security(
        keystore,
        replay if replay is not None else s.MemoryReplayStore(clock=clock),
        AUD,
        clock=clock,
        boot_time=T0 - 100,
        throttle=throttle or s.Throttle(per_address=10**9, per_tenant=10**9),
    )
    running = serve(gateway.create_app(FIXTURES / "e2e", security=security, max_body=2000))
    calls = running.app.catalog.functions["add"].func.__globals__["CALLS"]
    return Stack(running, keystore, security, clock, acme, globex, calls)


@pytest.fixture
def stack(tmp_path: Path, serve) -> Stack:  # type: ignore[no-untyped-def]
    return make_stack(tmp_path, serve)


def refused(stack: Stack, answer: Answer) -> None:
    """The one 401: same body, a challenge, unsigned, and the handler never ran."""
    assert answer.status == 401, answer.body
    assert answer.body == UNAUTHORIZED
    assert answer.header("www-authenticate") == "STT1"
    assert answer.header("stt1-response") is None


def replay_refused(stack: Stack, answer: Answer) -> None:
    """A replay is caught at step 8, after the token verified: the same 401, but signed (3.11)."""
    assert (answer.status, answer.body, answer.header("www-authenticate")) == (401, UNAUTHORIZED, "STT1")


def not_run(stack: Stack, before: int) -> None:
    assert stack.calls["add"] == before, "the handler ran for a refused request"


# -- the happy path ------------------------------------------------------------------------


def test_a_signed_call_is_answered_and_the_answer_is_signed(stack: Stack) -> None:
    answer = stack.call()
    assert (answer.status, json.loads(answer.body)) == (200, {"results": 3, "valid": True})
    claims = response_claims(stack, answer)
    assert claims.rk is msgspec.UNSET and len(claims.jti) == 22 and claims.jti != answer.jti


def test_health_and_openapi_stay_open_but_the_catalog_needs_a_token(stack: Stack) -> None:
    assert stack.send("GET", "/healthz").status == 200
    assert stack.send("GET", "/openapi.json").status == 200
    refused(stack, stack.send("GET", "/rest/"))
    catalog = stack.call(method="GET", target="/rest/", body=b"", content_type=b"")
    assert catalog.status == 200 and "acme_only" in json.loads(catalog.body)["results"]
    response_claims(stack, catalog)


# -- 3.1 and 3.2: the header and the token's shape -------------------------------------------


def test_every_single_character_change_is_refused(stack: Stack) -> None:
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    before = stack.calls["add"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for i, char in enumerate(token):
        changed = token[:i] + alphabet[(alphabet.index(char) + 1) % len(alphabet)] + token[i + 1 :]
        refused(stack, stack.with_token(changed))
    not_run(stack, before)
    assert stack.with_token(token).status == 200  # the original was good all along


def test_every_truncation_is_refused(stack: Stack) -> None:
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    before = stack.calls["add"]
    for length in range(len(token)):
        refused(stack, stack.with_token(token[:length]))
    not_run(stack, before)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "=",  # padding
        lambda t: "{}=.{}".format(*t.rsplit(".", 1)),  # padding at the end of the body
        lambda t: t + ".e30",  # an extra part
        lambda t: "v4" + t[2:],
        lambda t: t.replace("v3.local.", "v3.public."),
        lambda t: "V3" + t[2:],
        lambda t: t + "A" * (1030 - len(t)),  # oversized
        lambda t: t.rsplit(".", 1)[0],  # footer dropped
    ],
)
def test_malformed_tokens_are_refused(stack: Stack, mangle) -> None:  # type: ignore[no-untyped-def]
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    before = stack.calls["add"]
    refused(stack, stack.with_token(mangle(token)))
    not_run(stack, before)


def padded_token(cred: Cred, length: int, prefix: str = "") -> str:
    """A token signed with ``cred``, with a valid footer, whose payload pads ``prefix + token``
    to exactly ``length`` characters: the body alone makes it big, the footer stays valid."""
    implicit = s.request_assertion(AUD, "POST", b"/rest/add", JSON, BODY)
    for pad in range(1000):
        payload = b'{"jti":"' + s.new_jti().encode() + b'","pad":"' + b"x" * pad + b'"}'
        token = raw_token(cred, payload, int(T0), implicit)
        if len(prefix + token) == length:
            return token
    raise AssertionError(f"no token of {length} characters for tenant {cred.tid}")


@pytest.mark.parametrize(("length", "reason"), [(s.MAX_TOKEN_CHARS, "signature"), (s.MAX_TOKEN_CHARS + 1, "malformed")])
def test_an_authorization_over_1024_characters_is_refused_by_the_size_rule(
    stack: Stack, caplog, length: int, reason: str  # type: ignore[no-untyped-def]
) -> None:
    """PROTOCOL.md 3.1 and 8 "oversized". No token this gateway accepts is that long (its payload
    would be over 512 bytes), so only the reason shows which rule refused it: at the limit the
    size rule lets it through to the tag and payload checks, one character over it does not."""
    token = padded_token(stack.globex, length, prefix="STT1 ")  # acme's footer cannot make 1024 exactly
    assert s.parse(token).footer.tid == "globex"  # a well-formed token with a valid footer
    reasons: list[str] = []
    counted = stack.security.on_failure
    stack.security.on_failure = lambda why: (reasons.append(why), counted and counted(why))  # type: ignore[func-returns-value]
    before = stack.calls["add"]
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        refused(stack, stack.with_token(token))
    not_run(stack, before)
    assert reasons == [reason]
    assert ("Authorization is over 1024 characters" in caplog.text) == (reason == "malformed"), caplog.text


def test_parse_refuses_a_token_over_1024_characters_before_decoding_anything(stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    decoded: list[str] = []
    real = s.b64decode
    monkeypatch.setattr(s, "b64decode", lambda text: decoded.append(text) or real(text))
    at_limit = padded_token(stack.acme, s.MAX_TOKEN_CHARS)
    assert s.parse(at_limit).footer.tid == "acme" and decoded  # parsed: shape and footer are fine
    decoded.clear()
    with pytest.raises(s.InvalidToken):
        s.parse(padded_token(stack.acme, s.MAX_TOKEN_CHARS + 1))
    assert decoded == []  # refused on its length alone


def test_non_zero_trailing_bits_are_refused(stack: Stack) -> None:
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    head, body, footer = token.rsplit(".", 2)
    assert len(body) % 4 == 2  # the last character carries 4 unused bits, all zero
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(body[-1]) | 1]  # same decoded bytes, one unused bit set
    assert s.b64decode(body)
    with pytest.raises(ValueError):
        s.b64decode(body[:-1] + twin)
    refused(stack, stack.with_token(f"{head}.{body[:-1]}{twin}.{footer}"))


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Authorization", "Bearer {token}")],
        [("Authorization", "STT2 {token}")],
        [("Authorization", "stt1 {token}")],
        [("Authorization", "STT1  {token}")],
        [("Authorization", "STT1 {token}"), ("Authorization", "STT1 {token}")],
    ],
)
def test_the_authorization_header_must_be_exactly_one_stt1(stack: Stack, headers) -> None:  # type: ignore[no-untyped-def]
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    before = stack.calls["add"]
    sent = [(k, v.format(token=token)) for k, v in headers] + [("Content-Type", "application/json")]
    refused(stack, stack.send("POST", "/rest/add", BODY, sent))
    not_run(stack, before)


@pytest.mark.parametrize("rewrite", ["tid", "kid", "iat"])
def test_a_rewritten_footer_is_refused(stack: Stack, rewrite: str) -> None:
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    head, body, _ = token.rsplit(".", 2)
    footer = {
        "tid": ("c2s", "globex", stack.acme.kid, int(T0)),
        "kid": ("c2s", "acme", stack.globex.kid, int(T0)),
        "iat": ("c2s", "acme", stack.acme.kid, int(T0) + 1),
    }[rewrite]
    refused(stack, stack.with_token(f"{head}.{body}.{s.b64encode(s.build_footer(*footer))}"))


# -- keys and directions ----------------------------------------------------------------------


def test_another_tenants_key_or_a_swapped_tid_is_refused(stack: Stack) -> None:
    before = stack.calls["add"]
    refused(stack, stack.call(Cred("acme", stack.acme.kid, stack.globex.k)))
    refused(stack, stack.call(Cred("globex", stack.acme.kid, stack.acme.k)))
    refused(stack, stack.call(Cred("acme", stack.globex.kid, stack.globex.k)))
    not_run(stack, before)


def test_a_request_minted_with_the_s2c_key_is_refused(stack: Stack) -> None:
    refused(stack, stack.call(direction="s2c"))


def test_a_server_token_sent_back_as_a_request_is_refused(stack: Stack) -> None:
    answer = stack.call()
    refused(stack, stack.with_token(answer.header("stt1-response")))  # type: ignore[arg-type]


def test_a_request_token_offered_as_a_response_does_not_verify(stack: Stack) -> None:
    token, jti = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    implicit = s.response_assertion(AUD, jti, 200, JSON, b'{"results":3,"valid":true}')
    with pytest.raises(s.InvalidToken):
        s.open_token(s.DirectionKey(stack.acme.k, "s2c", "acme", stack.acme.kid), token, implicit)


# -- 3.3 time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("skew", "accepted"), [(-46, False), (-45, True), (0, True), (45, True), (46, False)])
def test_iat_window_is_45_seconds_either_way(tmp_path: Path, serve, skew: int, accepted: bool) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve)
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0) + skew)
    answer = stack.with_token(token)
    if accepted:
        assert answer.status == 200
    else:
        refused(stack, answer)


def test_with_the_memory_store_a_token_from_before_boot_is_refused(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    security = s.Security(keystore, s.MemoryReplayStore(clock=clock), AUD, clock=clock, boot_time=T0 - 0.5)
    running = serve(gateway.create_app(FIXTURES / "e2e", security=security))
    stack = Stack(running, keystore, security, clock, acme, acme)
    refused(stack, stack.with_token(mint_request(acme, "POST", b"/rest/add", JSON, BODY, int(T0) - 1)[0]))
    assert stack.with_token(mint_request(acme, "POST", b"/rest/add", JSON, BODY, int(T0))[0]).status == 200


# -- 3.5 to 3.7: what the token is bound to ------------------------------------------------


@pytest.mark.parametrize(
    ("field_", "sent"),
    [
        ("body", {"body": b'{"a": 1, "b": 3}'}),
        ("path", {"target": "/rest/echo"}),
        ("query", {"target": "/rest/add?x=1"}),
        ("method", {"method": "PUT"}),
        ("content type", {"content_type": b"application/json; charset=utf-8"}),
    ],
)
def test_anything_changed_after_signing_is_refused(stack: Stack, field_: str, sent: dict) -> None:
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    method = sent.get("method", "POST")
    headers = [("Authorization", f"STT1 {token}"), ("Content-Type", sent.get("content_type", JSON).decode())]
    before = stack.calls["add"]
    refused(stack, stack.send(method, sent.get("target", "/rest/add"), sent.get("body", BODY), headers))
    not_run(stack, before)


def test_a_token_for_another_audience_is_refused(stack: Stack) -> None:
    refused(stack, stack.call(aud="https://other-gateway.example.test"))
    refused(stack, stack.call(aud=f"http://127.0.0.1:{stack.running.port}"))  # type: ignore[attr-defined]


def test_the_query_string_is_part_of_the_signature(stack: Stack) -> None:
    answer = stack.call(target="/rest/echo/hi?x=1", body=b"")
    assert answer.status == 200 and json.loads(answer.body)["results"] == "hi"


def test_unknown_payload_fields_and_wrong_types_are_refused(stack: Stack) -> None:
    implicit = s.request_assertion(AUD, "POST", b"/rest/add", JSON, BODY)
    jti = s.new_jti()
    for payload in [
        {"jti": jti, "admin": True},
        {"jti": 12345},
        {"jti": jti, "otp": 123456},
        {"jti": jti, "rk": {"kid": stack.acme.kid, "k": s.b64encode(os.urandom(32))}},  # rk in a request
        {"jti": "short"},
        {},
    ]:
        token = raw_token(stack.acme, msgspec.json.encode(payload), int(T0), implicit)
        refused(stack, stack.with_token(token))
    refused(stack, stack.with_token(raw_token(stack.acme, b"not json", int(T0), implicit)))
    # bad UTF-8 inside the payload: msgspec raised UnicodeDecodeError out of open_token, a 500
    refused(stack, stack.with_token(raw_token(stack.acme, b'{"jti":"\xc8"}', int(T0), implicit)))


# -- 3.8 replay ---------------------------------------------------------------------------------


def test_the_same_token_twice_is_refused(stack: Stack) -> None:
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    assert stack.with_token(token).status == 200
    before = stack.calls["add"]
    replay_refused(stack, stack.with_token(token))
    not_run(stack, before)


def test_a_clock_stepped_forward_then_back_lets_no_token_run_twice(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """The store forgot a jti once the clock passed its expiry; a clock stepped forward (NTP, a
    resumed VM) then back made the clock check take that token again, and it ran twice. The
    server's clock (s.server_clock, shared by the check and the store) never goes back."""
    wall = Clock(T0)
    server = s._NeverBack(wall)
    stack = make_stack(tmp_path, serve, clock=server, replay=s.MemoryReplayStore(clock=server))  # type: ignore[arg-type]
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0) - 7)
    assert stack.with_token(token).status == 200
    before = stack.calls["add"]
    wall.now += 44  # stepped forward: the token's id (kept until T0 + 43) is purged by the next call
    fresh, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(wall.now))
    assert stack.with_token(fresh).status == 200
    wall.now -= 44  # and back
    refused(stack, stack.with_token(token))  # too old by the server's clock, which stayed
    assert stack.calls["add"] == before + 1
    assert s.Security(stack.keystore, s.MemoryReplayStore(), AUD).clock is s.server_clock
    assert s.MemoryReplayStore().clock is s.server_clock
    assert s.SqliteReplayStore(tmp_path / "r.db").clock is s.server_clock


def test_a_request_the_security_layer_refuses_has_its_access_line(stack: Stack, caplog) -> None:  # type: ignore[no-untyped-def]
    """One line per request: those refused before the gateway proper (401, 429, 413, 503) had
    none, so their ids were only in a warning limited to 10 a second, if at all."""
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        refused_answer = stack.send("POST", "/rest/add", BODY, [("Content-Type", "application/json")])
        served = stack.call()
        lines = [
            f"{refused_answer.header('x-request-id')} tenant=- func=- status=401 ",
            f"{served.header('x-request-id')} tenant=acme func=add status=200 ",
        ]
        deadline = time.monotonic() + 5
        while not all(line in caplog.text for line in lines):  # written in batches, every 0.25 s
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    assert refused_answer.status == 401 and served.status == 200


class JumpingClock(Clock):
    """Gives ``now`` once more, then jumps to ``jump_to``: the server reads the time first when a
    request's headers are in, so every later reading is the time after its body."""

    jump_to: float | None = None

    def __call__(self) -> float:
        now = self.now
        if self.jump_to is not None:
            self.now, self.jump_to = self.jump_to, None
        return now


def test_a_used_token_is_refused_however_late_its_body_arrives(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = JumpingClock(T0)
    stack = make_stack(tmp_path, serve, clock=clock)
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    assert stack.with_token(token).status == 200
    before = stack.calls["add"]
    clock.now = T0 + s.MAX_SKEW - 1  # its headers come in while the token is still in its window,
    clock.jump_to = T0 + s.REPLAY_TTL + 2  # its body once the first use can be forgotten
    conn = http.client.HTTPConnection("127.0.0.1", stack.running.port, timeout=10)  # type: ignore[attr-defined]
    conn.putrequest("POST", "/rest/add", skip_accept_encoding=True)
    for name, value in [("Authorization", f"STT1 {token}"), ("Content-Type", "application/json")]:
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(BODY)))
    conn.endheaders()  # the body is held back
    waited = 0
    while clock.jump_to is not None and waited < 2000:  # until the server has read the time
        time.sleep(0.005)
        waited += 1
    assert stack.call(stack.globex).status == 200  # any call, and the memory store forgets the first use
    conn.send(BODY)
    response = conn.getresponse()
    late = Answer(response.status, response.getheaders(), response.read())
    conn.close()
    refused(stack, late)
    assert stack.calls["add"] == before + 1  # globex's call only


def test_the_same_jti_in_a_new_token_is_refused(stack: Stack) -> None:
    jti = s.new_jti()
    assert stack.call(jti=jti).status == 200
    stack.clock.now += 1
    assert stack.call(jti=jti).status == 401
    assert stack.call(jti=jti, cred=stack.globex).status == 200  # the key includes the tenant and kid


def test_replay_across_two_workers_sharing_a_sqlite_store(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    first = make_stack(tmp_path, serve, clock=clock, replay=s.SqliteReplayStore(tmp_path / "replay.db", clock=clock))
    second_security = s.Security(
        s.Keystore(tmp_path / "gw.db", clock=clock),
        s.SqliteReplayStore(tmp_path / "replay.db", clock=clock),
        AUD,
        clock=clock,
    )
    second = Stack(
        serve(gateway.create_app(FIXTURES / "e2e", security=second_security)),
        first.keystore,
        second_security,
        clock,
        first.acme,
        first.globex,
    )
    token, _ = mint_request(first.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    assert first.with_token(token).status == 200
    replay_refused(second, second.with_token(token))


def test_replay_after_a_restart_is_refused(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    first = make_stack(tmp_path, serve, clock=clock, replay=s.SqliteReplayStore(tmp_path / "replay.db", clock=clock))
    token, _ = mint_request(first.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    assert first.with_token(token).status == 200
    first.running.stop()  # type: ignore[attr-defined]
    restarted = s.Security(
        s.Keystore(tmp_path / "gw.db", clock=clock),
        s.SqliteReplayStore(tmp_path / "replay.db", clock=clock),
        AUD,
        clock=clock,
    )
    again = Stack(
        serve(gateway.create_app(FIXTURES / "e2e", security=restarted)),
        first.keystore,
        restarted,
        clock,
        first.acme,
        first.globex,
    )
    replay_refused(again, again.with_token(token))


class BrokenStore:
    """A replay store whose backend is down."""

    shared = True

    def check_and_insert(self, key: bytes, expires_at: int) -> bool:
        raise s.ReplayStoreError("connection refused")


@pytest.mark.parametrize("store", ["full", "down", "closed sqlite"])
def test_a_failing_replay_store_fails_closed_with_a_signed_503(tmp_path: Path, serve, store: str) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    if store == "full":
        replay: object = s.MemoryReplayStore(max_entries=0, clock=clock)
    elif store == "down":
        replay = BrokenStore()
    else:
        replay = s.SqliteReplayStore(tmp_path / "replay.db", clock=clock)
        replay._db.close()  # type: ignore[attr-defined]
    stack = make_stack(tmp_path, serve, clock=clock, replay=replay)
    before = stack.calls["add"]
    answer = stack.call()
    assert answer.status == 503 and json.loads(answer.body)["error"]["code"] == "overloaded"
    response_claims(stack, answer)
    not_run(stack, before)


def test_the_memory_store_never_forgets_early_and_purges_late() -> None:
    clock = Clock(T0)
    store = s.MemoryReplayStore(max_entries=3, clock=clock)
    assert store.check_and_insert(b"a", int(T0) + 50) and store.check_and_insert(b"b", int(T0) + 50)
    assert not store.check_and_insert(b"a", int(T0) + 50)
    assert store.check_and_insert(b"c", int(T0) + 60)
    with pytest.raises(s.ReplayStoreError):
        store.check_and_insert(b"d", int(T0) + 60)  # full, and nothing has expired: refuse, never evict
    clock.now = T0 + 51
    assert store.check_and_insert(b"d", int(T0) + 100)  # a and b expired and were purged
    assert len(store) == 2 and not store.check_and_insert(b"c", int(T0) + 60)


# Half a million jtis held, 9,000 new a second, on a simulated clock: the soak's load, without
# the network. Prints the RSS (MB) at the end of the warm-up (60 s) and the most after it.
CHURN = """
import hashlib, sys
import security as s
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
class Clock:
    now = 1000.0
    def __call__(self):
        return self.now
clock = Clock()
store = s.MemoryReplayStore(clock=clock)
samples = []
for second in range(150):
    clock.now = 1000 + second
    for i in range(9000):
        store.check_and_insert(hashlib.sha256((second * 9000 + i).to_bytes(8, "big")).digest(), 1000 + second + 50)
    samples.append(rss())
print(samples[60], max(samples[60:]))
"""


def test_the_memory_store_gives_back_the_tables_it_rebuilds() -> None:
    """Purged keys leave dummy slots, so the set's 16 MB table is rebuilt every twenty seconds
    or so; glibc kept each freed table in the RSS (a 16 MB step at 120 s, which failed the
    soak) until the store pinned its mmap threshold."""
    done = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    at_warmup, most = map(float, done.stdout.split())
    assert most - at_warmup < 4, (at_warmup, most)


def test_the_sqlite_store_is_atomic_across_connections(tmp_path: Path) -> None:
    one = s.SqliteReplayStore(tmp_path / "r.db")
    two = s.SqliteReplayStore(tmp_path / "r.db")
    assert one.check_and_insert(b"k", 10) is True
    assert two.check_and_insert(b"k", 10) is False


# -- 3.9: what a tenant may call ------------------------------------------------------------------


def test_a_tenant_limited_to_some_functions_gets_a_signed_404_for_others(stack: Stack) -> None:
    assert stack.call(stack.globex).status == 200
    hidden = stack.call(stack.globex, target="/rest/scale/2", body=b'{"values": [1]}')
    missing = stack.call(stack.globex, target="/rest/nope", body=b"{}")
    assert hidden.status == missing.status == 404 and hidden.body == missing.body
    response_claims(stack, hidden, stack.globex)
    catalog = stack.call(stack.globex, method="GET", target="/rest/", body=b"", content_type=b"")
    assert sorted(json.loads(catalog.body)["results"]) == ["add", "echo"]


def test_the_keystore_allow_list_follows_changes_made_elsewhere(stack: Stack, tmp_path: Path) -> None:
    assert stack.call(stack.globex, target="/rest/echo/x", body=b"").status == 200
    cli = s.Keystore(tmp_path / "gw.db")  # another connection, as the CLI or another worker
    cli.set_functions("globex", ["add"])
    stack.clock.now += 1.5  # the cache looks at PRAGMA data_version at most once a second
    assert stack.call(stack.globex, target="/rest/echo/x", body=b"").status == 404


# -- 5: rotation --------------------------------------------------------------------------------


def test_rotation_in_band_from_rk_to_promotion_to_retirement(stack: Stack, caplog) -> None:  # type: ignore[no-untyped-def]
    [(tid, old, new)] = stack.keystore.rotate("acme")
    assert (tid, old) == ("acme", stack.acme.kid)
    stack.clock.now += s.ROTATION_SETTLE  # offered once every worker's cache knows it (see below)
    first, again = stack.call(), stack.call()
    rk = response_claims(stack, first).rk
    assert isinstance(rk, s.RotatedKey) and rk.kid == new
    assert response_claims(stack, again).rk == rk  # the same value every time until used
    error = stack.call(target="/rest/nope", body=b"{}")
    assert error.status == 404 and response_claims(stack, error).rk is msgspec.UNSET  # never on a 4xx
    successor = Cred("acme", rk.kid, s.b64decode(rk.k))
    promoted = stack.call(successor)
    assert promoted.status == 200 and response_claims(stack, promoted, successor).rk is msgspec.UNSET
    states = {row["kid"]: row["state"] for row in stack.keystore.rows()}
    assert states[new] == "active" and states[old] == "retiring"
    stack.clock.now += 1.5
    assert stack.call().status == 200  # the old kid still works in its grace period
    stack.clock.now += s.GRACE_SECONDS
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        refused(stack, stack.call())
    assert "ALERT" in caplog.text and old in caplog.text
    assert stack.call(successor).status == 200


def test_rotation_policy_makes_successors_for_old_credentials_only(stack: Stack) -> None:
    assert stack.keystore.rotate(older_than_days=1) == []
    stack.clock.now += 2 * 86400
    made = stack.keystore.rotate(older_than_days=1)
    assert sorted(tid for tid, _, _ in made) == ["acme", "globex"]
    assert stack.keystore.rotate(older_than_days=1) == []  # at most one pending per credential


def test_revoking_a_kid_during_a_rotation_revokes_its_successor_too(stack: Stack) -> None:
    [(_, old, new)] = stack.keystore.rotate("acme")
    stack.clock.now += s.ROTATION_SETTLE
    rk = response_claims(stack, stack.call()).rk  # whoever holds K, owner or thief, is sent K'
    assert rk is not None and rk.kid == new
    assert stack.keystore.revoke(old) == 2
    stack.clock.now += 1.5
    refused(stack, stack.call())
    refused(stack, stack.call(Cred("acme", rk.kid, s.b64decode(rk.k))))
    states = {row["kid"]: row["state"] for row in stack.keystore.rows() if row["tid"] == "acme"}
    assert states == {old: "retired", new: "retired"}


def test_a_revoked_kid_is_refused_and_its_use_raises_an_alert(stack: Stack, caplog) -> None:  # type: ignore[no-untyped-def]
    assert stack.keystore.revoke(stack.acme.kid) == 1
    stack.clock.now += 1.5
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        refused(stack, stack.call())
        for _ in range(20):  # anyone who has seen the kid can name it: such alerts keep to the log budget
            refused(stack, stack.call(Cred("acme", stack.acme.kid, os.urandom(32))))
    alerts = [r.getMessage() for r in caplog.records if r.name == "gateway.security" and "ALERT:" in r.getMessage()]
    assert 1 <= len(alerts) <= 10 and stack.acme.kid in alerts[0]
    assert "more ALERTs this second; not logging them" in caplog.text
    assert stack.call(stack.globex).status == 200


# -- 6: the second factor ---------------------------------------------------------------------


def test_a_function_flagged_otp_needs_a_fresh_code(stack: Stack) -> None:
    secret = stack.keystore.otp_enroll("acme")
    stack.clock.now += 1.5
    totp = pyotp.TOTP(secret)
    target = "/rest/guarded"
    without = stack.call(target=target, body=b"")
    assert without.status == 401 and without.body == UNAUTHORIZED
    response_claims(stack, without)  # after step 7: signed
    code = totp.at(stack.clock.now)
    assert stack.call(target=target, body=b"", otp=code).status == 200
    stack.clock.now += 1
    assert stack.call(target=target, body=b"", otp=code).status == 401  # the same timecode again
    stack.clock.now += 30
    previous = totp.at(stack.clock.now - 30)  # one step of drift is allowed, but it is not newer
    assert stack.call(target=target, body=b"", otp=previous).status == 401
    assert stack.call(target=target, body=b"", otp=totp.at(stack.clock.now)).status == 200
    wrong = f"{(int(totp.at(stack.clock.now + 30)) + 1) % 1000000:06d}"
    assert stack.call(target=target, body=b"", otp=wrong).status == 401


def test_a_code_sent_to_a_function_that_needs_none_is_refused(stack: Stack, caplog) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOL.md 2: the request payload carries "otp" only when 6 applies. It was ignored."""
    totp = pyotp.TOTP(stack.keystore.otp_enroll("acme"))
    stack.clock.now += 1.5
    with caplog.at_level(logging.WARNING, logger="gateway"):
        answer = stack.call(otp=totp.at(stack.clock.now))
    assert answer.status == 401 and answer.body == UNAUTHORIZED
    response_claims(stack, answer)  # the caller holds K: signed, as every answer after step 7
    assert "an authenticator code for `add`, which needs none" in caplog.text
    assert stack.call().status == 200


def wrong_code(totp: pyotp.TOTP, now: float) -> str:
    """A six-digit code that is none of the three the gateway accepts at ``now``."""
    valid = {totp.at(now + drift) for drift in (-30, 0, 30)}
    return next(code for code in ("000000", "111111", "222222", "333333") if code not in valid)


def test_wrong_authenticator_codes_lock_the_second_factor_for_longer_each_time(stack: Stack, caplog) -> None:  # type: ignore[no-untyped-def]
    totp = pyotp.TOTP(stack.keystore.otp_enroll("acme"))
    stack.clock.now += 1.5

    def call(code: str) -> Answer:
        return stack.call(target="/rest/guarded", body=b"", otp=code)

    def alerts() -> list[str]:
        return [r.message for r in caplog.records if r.name == "gateway.security" and "ALERT" in r.message]

    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        for _ in range(s.OTP_LOCK_AFTER):
            assert call(wrong_code(totp, stack.clock.now)).status == 401
        for _ in range(3):
            locked = call(totp.at(stack.clock.now))  # the right code: not even checked while locked
    assert len(alerts()) == 1  # the lock, once, when it began; the calls it refuses are not logged
    assert locked.status == 429 and locked.header("retry-after") == "60", locked.body
    assert json.loads(locked.body)["error"]["code"] == "throttled"
    response_claims(stack, locked)  # after step 7: signed like any answer to a verified token
    assert stack.call(target="/rest/add").status == 200  # only the second factor is locked
    stack.clock.now += 59
    assert call(totp.at(stack.clock.now)).header("retry-after") == "1"
    stack.clock.now += 1
    assert call(wrong_code(totp, stack.clock.now)).status == 401  # the lock is over, the count is not
    assert call(totp.at(stack.clock.now)).header("retry-after") == "120"  # twice as long
    stack.clock.now += 120
    assert call(totp.at(stack.clock.now)).status == 200
    for _ in range(s.OTP_LOCK_AFTER - 1):  # a right code cleared the count
        assert call(wrong_code(totp, stack.clock.now)).status == 401
    stack.clock.now += 30
    assert call(totp.at(stack.clock.now)).status == 200


def test_a_reused_code_counts_as_a_wrong_one_and_re_enrolling_unlocks(stack: Stack) -> None:
    totp = pyotp.TOTP(stack.keystore.otp_enroll("acme"))
    stack.clock.now += 1.5
    code = totp.at(stack.clock.now)
    assert stack.call(target="/rest/guarded", body=b"", otp=code).status == 200
    for _ in range(s.OTP_LOCK_AFTER):  # someone who saw the code replays it
        assert stack.call(target="/rest/guarded", body=b"", otp=code).status == 401
    assert stack.call(target="/rest/guarded", body=b"", otp=code).status == 429
    totp = pyotp.TOTP(stack.keystore.otp_enroll("acme"))  # the owner's way out: a new authenticator
    stack.clock.now += 1.5
    assert stack.call(target="/rest/guarded", body=b"", otp=totp.at(stack.clock.now)).status == 200


def test_the_otp_lock_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock(T0)
    keystore = s.Keystore(tmp_path / "gw.db", master_key=bytes(32), clock=clock)
    keystore.add_tenant("acme")
    totp = pyotp.TOTP(keystore.otp_enroll("acme"))
    for _ in range(s.OTP_LOCK_AFTER):
        assert not keystore.check_otp("acme", wrong_code(totp, clock.now), clock.now)
    keystore.close()
    restarted = s.Keystore(tmp_path / "gw.db", master_key=bytes(32), clock=clock)
    with pytest.raises(s.OtpLocked) as locked:
        restarted.check_otp("acme", totp.at(clock.now), clock.now)
    assert locked.value.retry_after == s.OTP_LOCK_SECONDS
    writer = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a locked authenticator is refused without the write lock
    with pytest.raises(s.OtpLocked):
        restarted.check_otp("acme", totp.at(clock.now), clock.now)
    writer.execute("ROLLBACK")
    clock.now += s.OTP_LOCK_SECONDS
    assert restarted.check_otp("acme", totp.at(clock.now), clock.now)


def test_the_otp_lock_doubles_up_to_a_day_and_each_lock_is_logged_once(caplog) -> None:  # type: ignore[no-untyped-def]
    now = 1000.0
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        assert [s._otp_locked_until("acme", n, now) for n in range(s.OTP_LOCK_AFTER)] == [0.0] * s.OTP_LOCK_AFTER
        assert caplog.records == []
        waits = [s._otp_locked_until("acme", n, now) - now for n in range(s.OTP_LOCK_AFTER, s.OTP_LOCK_AFTER + 14)]
    assert waits[:4] == [60, 120, 240, 480] and max(waits) == waits[-1] == s.OTP_MAX_LOCK_SECONDS == 86400
    assert len(caplog.records) == 14 and "ALERT tenant acme: 5 wrong authenticator codes" in caplog.records[0].message
    assert s._otp_locked_until("acme", 10**9, now) - now == 86400  # no overflow for an absurd count


def test_a_tenant_without_an_authenticator_cannot_call_an_otp_function(stack: Stack) -> None:
    assert stack.call(stack.globex, target="/rest/guarded", body=b"", otp="123456").status == 404  # not allowed
    assert stack.call(target="/rest/guarded", body=b"", otp="123456").status == 401


# -- limits, throttling, 413 -------------------------------------------------------------------


def test_an_oversized_body_is_refused_with_413_before_it_is_read(stack: Stack) -> None:
    big = b'{"text": "' + b"x" * 3000 + b'"}'
    answer = stack.call(target="/rest/echo", body=big)
    assert answer.status == 413 and answer.header("stt1-response") is None


def test_repeated_failures_from_one_address_are_throttled(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve, throttle=s.Throttle(per_address=5, per_tenant=1000))
    for _ in range(5):
        refused(stack, stack.call(aud="https://elsewhere.test"))
    throttled = stack.call(aud="https://elsewhere.test")
    assert throttled.status == 429 and throttled.header("retry-after") == "60"
    assert throttled.header("stt1-response") is None  # refused before any token is verified
    assert stack.call().status == 200  # a valid call from the same address (a NAT, a proxy) still goes through
    stack.clock.now += 60
    refused(stack, stack.call(aud="https://elsewhere.test"))  # a new window


def test_repeated_failures_for_one_tenant_are_throttled(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve, throttle=s.Throttle(per_address=1000, per_tenant=3))
    for _ in range(3):
        refused(stack, stack.call(aud="https://elsewhere.test"))
    throttled = stack.call(aud="https://elsewhere.test")
    assert throttled.status == 429 and throttled.header("retry-after") == "60"
    assert throttled.header("stt1-response") is None  # refused before any token is verified
    assert stack.call(stack.globex, aud="https://elsewhere.test").status == 401  # another tenant's count
    stack.clock.now += 60
    refused(stack, stack.call(aud="https://elsewhere.test"))  # a new window


@pytest.mark.parametrize("per", ["address", "tenant"])
def test_replayed_tokens_are_failures_the_throttle_counts(tmp_path: Path, serve, per: str) -> None:  # type: ignore[no-untyped-def]
    limits = {"per_address": 3, "per_tenant": 1000} if per == "address" else {"per_address": 1000, "per_tenant": 3}
    stack = make_stack(tmp_path, serve, throttle=s.Throttle(**limits))
    token, jti = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    assert stack.with_token(token).status == 200
    before = stack.calls["add"]
    for _ in range(3):
        replay_refused(stack, stack.with_token(token))
    throttled = stack.with_token(token)
    assert throttled.status == 429 and throttled.header("retry-after") == "60"
    throttled.jti = jti
    response_claims(stack, throttled)  # caught after the token verified (step 8): signed
    assert stack.call(aud="https://elsewhere.test").status == 429  # any other failure from there too
    not_run(stack, before)
    assert stack.call().status == 200  # a valid call still goes through


def test_the_failure_counts_stay_bounded_without_a_rebuild_per_failure() -> None:
    throttle = s.Throttle(per_address=3, max_entries=100)
    rebuilds = 0
    for n in range(1000):  # one window, a made-up tenant each time: no entry ever gets old
        table = throttle._counts
        throttle.fail("tid", f"tenant-{n}", T0)
        rebuilds += throttle._counts is not table
        assert len(throttle._counts) <= 100
    assert rebuilds <= 1000 // 50  # once per 50 new entries, not on every failure
    for _ in range(3):
        throttle.fail("addr", "10.0.0.1", T0)
    assert throttle.blocked("addr", "10.0.0.1", T0)  # the newest entries are kept


def test_nobody_can_lock_a_tenant_out_by_sending_bad_tokens_in_its_name(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve, throttle=s.Throttle(per_address=1000, per_tenant=3))
    forged = stack.call(cred=Cred("acme", stack.acme.kid, os.urandom(32)))  # the tid is in every footer
    refused(stack, forged)
    for _ in range(5):
        stack.call(cred=Cred("acme", stack.acme.kid, os.urandom(32)))
    assert stack.call(cred=Cred("acme", stack.acme.kid, os.urandom(32))).status == 429
    assert stack.call().status == 200  # the tenant's own calls verify, and go through


def test_refusal_logs_are_rate_limited(stack: Stack, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        for _ in range(15):
            stack.call(aud="https://elsewhere.test")
    lines = [r for r in caplog.records if r.name == "gateway.security"]
    assert len(lines) == 11 and "not logging" in lines[-1].getMessage()


# -- conformance and secrecy ------------------------------------------------------------------


def test_every_401_is_identical_whatever_failed(stack: Stack) -> None:
    token, _ = mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0))
    answers = [
        stack.send("POST", "/rest/add", BODY, [("Content-Type", "application/json")]),
        stack.with_token(token[:-3]),
        stack.call(aud="https://elsewhere.test"),
        stack.call(Cred("acme", stack.acme.kid, stack.globex.k)),
        stack.with_token(mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0) - 100)[0]),
        stack.call(Cred("nobody", stack.acme.kid, stack.acme.k)),
    ]
    assert {(a.status, a.body, a.header("www-authenticate"), a.header("content-type")) for a in answers} == {
        (401, UNAUTHORIZED, "STT1", "application/json")
    }


def test_the_reason_is_logged_with_the_request_id(stack: Stack, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        answer = stack.call(aud="https://elsewhere.test")
    assert f"request {answer.header('x-request-id')}: 401: token does not verify" in caplog.text


def test_secrets_never_reach_logs_reprs_or_bodies(stack: Stack, caplog, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.DEBUG):
        answers = [
            stack.call(),
            stack.call(aud="x"),
            stack.call(target="/rest/boom", body=b"{}"),
            stack.call(Cred("acme", stack.acme.kid, stack.globex.k)),
        ]
        stack.keystore.rotate("acme")
        stack.clock.now += s.ROTATION_SETTLE
        answers.append(stack.call())
    secrets_ = [stack.acme.k, stack.globex.k]
    cache = stack.keystore.snapshot()
    texts = [
        caplog.text,
        repr(cache.keys),
        repr(list(cache.keys.values())),
        repr(stack.keystore.rows()),
        *[a.body.decode() for a in answers],
    ]
    rk = response_claims(stack, answers[-1]).rk
    texts.append(repr(rk))
    assert isinstance(rk, s.RotatedKey)
    for secret in [*secrets_, s.b64decode(rk.k)]:
        for text in texts:
            assert s.b64encode(secret) not in text and secret.hex() not in text
    database = (tmp_path / "gw.db").read_bytes() + (tmp_path / "gw.db-wal").read_bytes()
    for secret in secrets_:
        assert secret not in database and s.b64encode(secret).encode() not in database  # encrypted at rest


def test_a_wrong_master_key_cannot_read_the_keystore(stack: Stack, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the master key does not open the credentials in"):
        s.Keystore(tmp_path / "gw.db", master_key=os.urandom(32))
    assert oct((tmp_path / "gw.db.key").stat().st_mode)[-3:] == "600"


def test_a_lost_key_file_is_never_replaced_while_the_keystore_holds_credentials(tmp_path: Path) -> None:
    s.Keystore(tmp_path / "gw.db").add_tenant("acme")  # the key file is made for the empty keystore
    key_file = tmp_path / "gw.db.key"
    assert len(s.b64decode(key_file.read_text().strip())) == 32 and oct(key_file.stat().st_mode)[-3:] == "600"
    assert sorted(p.name for p in tmp_path.iterdir() if ".key" in p.name) == ["gw.db.key"]  # no temporary left
    key_file.unlink()  # a backup restored without it, say
    with pytest.raises(ValueError, match="no master key: .*gw.db.key is missing"):
        s.Keystore(tmp_path / "gw.db")
    assert not key_file.exists()  # a new key would have sealed new credentials beside unreadable old ones


def test_a_credential_sealed_under_another_master_key_is_refused_alone(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    keystore = s.Keystore(tmp_path / "gw.db", master_key=bytes(32))
    acme_kid, _ = keystore.add_tenant("acme")
    globex_kid, _ = keystore.add_tenant("globex")
    with sqlite3.connect(tmp_path / "gw.db") as db:  # as if written by a gateway with another master key
        db.execute("UPDATE credentials SET secret = ? WHERE kid = ?", (os.urandom(60), globex_kid))
    keystore.clock = lambda: time.time() + 5  # past the cache's 1 s
    with caplog.at_level(logging.ERROR, logger="gateway.security"):
        keys = keystore.snapshot().keys
    assert ("acme", acme_kid) in keys and ("globex", globex_kid) not in keys  # acme keeps working
    assert f"ALERT keystore: kid {globex_kid} of tenant globex does not open" in caplog.text


def test_a_failed_change_leaves_the_keystore_as_it_was(stack: Stack) -> None:
    rows = stack.keystore.rows()
    with pytest.raises(ValueError, match="exists already"):
        stack.keystore.add_tenant("acme")
    with pytest.raises(ValueError, match="no tenant"):
        stack.keystore.rotate("nobody")
    assert stack.keystore.rows() == rows


def test_the_replay_key_separates_tenants_kids_and_jtis() -> None:
    keys = {
        s.replay_key("a", "k", "j"),
        s.replay_key("a", "k", "J"),
        s.replay_key("b", "k", "j"),
        s.replay_key("a", "K", "j"),
        s.replay_key("a\x00k", "", "j"),
    }
    assert len(keys) == 5
    assert s.replay_key("a", "k", "j") == hashlib.sha256(s.pae(b"a", b"k", b"c2s", b"j")).digest()


def test_the_keystore_file_is_a_wal_sqlite_database(stack: Stack, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "gw.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {r[0] for r in db.execute("SELECT state FROM credentials")} == {"active"}


def test_the_rotation_policy_runs_in_the_server(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    acme = Cred("acme", *keystore.add_tenant("acme"))
    clock.now += 3 * 86400  # the credential is three days old when the gateway starts
    security = s.Security(keystore, s.MemoryReplayStore(clock=clock), AUD, clock=clock, boot_time=T0)
    running = serve(gateway.create_app(FIXTURES / "e2e", security=security, rotate_days=2))
    stack = Stack(running, keystore, security, clock, acme, acme)
    deadline = time.monotonic() + 5
    while len(keystore.rows()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [row["state"] for row in keystore.rows()] == ["active", "pending"]
    clock.now += s.ROTATION_SETTLE
    assert isinstance(response_claims(stack, stack.call()).rk, s.RotatedKey)


def test_the_memory_store_purges_by_time_even_with_one_expiry_second() -> None:
    clock = Clock(T0)
    store = s.MemoryReplayStore(clock=clock)
    for _ in range(1000):
        store.check_and_insert(os.urandom(32), int(T0) + 50)  # one expiry second: one bucket
    clock.now = T0 + 50
    store.check_and_insert(b"x" * 32, int(T0) + 100)
    assert len(store) == 1001  # not before expires_at ...
    clock.now = T0 + 51
    store.check_and_insert(b"y" * 32, int(T0) + 101)
    assert len(store) == 2  # ... and within a second after it


# -- review fixes: rotation across workers, logs under throttling and outages, the clock window ----


def test_a_successor_is_offered_only_once_every_worker_knows_it(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """Two workers (two Security instances, each its own keystore connection and cache) over one
    SQLite file. rk is offered only ROTATION_SETTLE after the successor was made, and from then on
    a call under the new kid succeeds on the other worker too, however its cache was timed."""
    clock = Clock(T0)
    one = make_stack(tmp_path, serve, clock=clock)
    keystore = s.Keystore(tmp_path / "gw.db", clock=clock)
    other = Stack(serve(gateway.create_app(FIXTURES / "e2e", security=s.Security(
        keystore, s.MemoryReplayStore(clock=clock), AUD, clock=clock, boot_time=T0 - 100,
        throttle=s.Throttle(per_address=10**9, per_tenant=10**9)), max_body=2000)),
        keystore, one.security, clock, one.acme, one.globex)  # fmt: skip
    assert other.call().status == 200  # the other worker's cache is checked now, at T0
    [(_, _, new)] = one.keystore.rotate("acme")
    offered = []
    for clock.now in (T0 + 0.5, int(T0) + s.ROTATION_SETTLE - 0.1, int(T0) + s.ROTATION_SETTLE):
        rk = response_claims(one, one.call()).rk
        if isinstance(rk, s.RotatedKey):  # the client switches at once, and may reach the other worker
            assert other.call(Cred("acme", rk.kid, s.b64decode(rk.k))).status == 200
            offered.append(clock.now)
    assert offered == [int(T0) + s.ROTATION_SETTLE] and rk.kid == new  # type: ignore[union-attr]


def test_a_throttled_address_still_logs_the_alert_for_a_retired_kid(tmp_path: Path, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve, throttle=s.Throttle(per_address=3, per_tenant=10**9))
    stolen = stack.acme
    stack.keystore.revoke(stolen.kid)
    stack.clock.now += 1.5
    for _ in range(3):  # junk first, until the address is throttled
        stack.call(Cred("acme", s.new_jti(), os.urandom(32)))
    stack.clock.now += 1  # a new second: the log budget is not what hides anything here
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        answer = stack.call(stolen)
    assert answer.status == 429 and answer.header("stt1-response") is None  # the answer is unchanged
    assert f"ALERT: a token names retired kid {stolen.kid}" in caplog.text
    assert "answered 429" in caplog.text


def test_junk_tokens_cannot_use_up_the_log_lines_an_alert_needs(tmp_path: Path, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    """Refusals are logged 10 a second: 20 junk tokens in the second a revoked key is used hid
    its ALERT while both shared one budget."""
    stack = make_stack(tmp_path, serve)
    stolen = stack.acme
    stack.keystore.revoke(stolen.kid)
    stack.clock.now += 1.5
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        for _ in range(20):
            stack.call(Cred("acme", s.new_jti(), os.urandom(32)))
        refused(stack, stack.call(stolen))
    assert "more refused tokens this second; not logging them" in caplog.text
    assert f"ALERT: a token names retired kid {stolen.kid}" in caplog.text


@pytest.mark.parametrize(("skew", "accepted"), [(-46, False), (-45, True), (45, True), (46, False)])
def test_the_clock_window_counts_whole_seconds_whatever_the_fraction(tmp_path: Path, serve, caplog, skew: int,  # type: ignore[no-untyped-def]
                                                                     accepted: bool) -> None:
    """PROTOCOL.md 8: iat = now +-45 s accepted, +-46 s refused, with now in whole seconds, as iat is."""
    stack = make_stack(tmp_path, serve, clock=Clock(T0 + 0.7))
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        answer = stack.with_token(mint_request(stack.acme, "POST", b"/rest/add", JSON, BODY, int(T0) + skew)[0])
    if accepted:
        assert answer.status == 200
    else:
        refused(stack, answer)
        assert f"iat {int(T0) + skew} is {skew:+d} s from now" in caplog.text  # its sign: past is minus


def test_store_failures_are_logged_within_a_budget_of_their_own(tmp_path: Path, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, serve, replay=BrokenStore())
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        for _ in range(50):  # one second of the (fake) clock
            assert stack.call().status == 503
        refused(stack, stack.call(aud="https://elsewhere.test"))  # a 401 has its own budget still
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 11 and errors[-1] == "more store failures this second; not logging them"
    assert "401: token does not verify" in caplog.text
