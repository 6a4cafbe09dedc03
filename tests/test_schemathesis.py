"""Schemathesis against the gateway's own /openapi.json: a real uvicorn server with STT1 on,
serving the example modules, every generated request signed with a fresh token.

What it pins: no example function answers 500 to any input, valid or not; every answer's
status is documented, with its content type, body schema and headers; requests that break the
schema are refused with a 4xx and requests that fit it are accepted; a call without a token, or
with a bad one, is refused; and every answer past the token check carries a gateway token that
verifies for that very request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis

import security
from conftest import FIXTURES, ROOT, Secured, secured_server

# Bounded: a fixed number of generated examples per operation (plus schemathesis' deterministic
# boundary cases), no example database left behind. slow_report gets fewer: each example past
# its 1 s timeout waits for it, and there its 504 is the documented answer, not a failure.
CONFIG = schemathesis.Config.from_str(
    """
[generation]
max-examples = 50
database = "none"

[[operations]]
include-operation-id = "slow_report"
generation.max-examples = 4
checks.not_a_server_error.expected-statuses = ["2xx", "4xx", "504"]
"""
)


class STT1Auth(requests.auth.AuthBase):
    """Signs each request as it goes on the wire: requests applies auth after it has prepared the
    body, so method, target (with its query), Content-Type and body are exactly the bytes sent."""

    def __init__(self, credential: security.Credential) -> None:
        self.credential = credential

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        content_type = request.headers.get("Content-Type", "").encode("latin-1")
        token, jti = security.sign_request(
            self.credential, str(request.method), request.path_url.encode(), content_type, body, time.time()
        )
        request.headers["Authorization"] = f"STT1 {token}"
        request.stt1_jti = jti  # type: ignore[attr-defined]  # what the answer's token must be bound to
        return request


def signed_for(credential: security.Credential) -> Callable[..., None]:
    """A check: every answer past the token check carries one gateway token bound to this request's
    jti and to the status, content type and body received (PROTOCOL.md 3.11). 413 and 429 come
    before the check, unsigned; a 401 or 503 may (a bad token, an unreachable keystore)."""
    key = security.DirectionKey(security.b64decode(credential.k), "s2c", credential.tid, credential.kid)

    def answer_is_signed(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Any) -> None:
        tokens = response.headers.get("stt1-response", [])
        status = response.status_code
        if status in (413, 429) or (status in (401, 503) and not tokens):
            return
        assert len(tokens) == 1, f"a {status} without exactly one STT1-Response header"
        content_type = response.headers.get("content-type", [""])[0].encode("latin-1")
        jti = response.request.stt1_jti  # type: ignore[attr-defined]
        implicit = security.response_assertion(credential.url, jti, status, content_type, response.content)
        security.open_token(key, tokens[0], implicit)  # InvalidToken fails the check

    return answer_is_signed


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Secured]:
    # Schemathesis also sends calls with no token and with a bad one, to see them refused: a
    # higher failure limit keeps those answers 401s instead of turning them into 429s.
    with secured_server(ROOT / "modules", tmp_path, throttle=security.Throttle(per_address=10_000)) as secured:
        yield secured


@pytest.fixture
def api(served: Secured, request: pytest.FixtureRequest) -> schemathesis.BaseSchema:
    # schemathesis 4.32's lazy loader reads Node._nodeid, which pytest 9 no longer has.
    request.node._nodeid = request.node.nodeid  # type: ignore[attr-defined]
    schema = schemathesis.openapi.from_url(f"{served.settings.audience}/openapi.json", config=CONFIG)
    schema.auth.set_from_requests(STT1Auth(security.read_credential(served.cred)))
    return schema


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
def test_the_example_modules_answer_as_their_spec_says(case: schemathesis.Case, served: Secured) -> None:
    case.call_and_validate(additional_checks=[signed_for(security.read_credential(served.cred))])


CONFORMANCE = [
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


def test_the_errors_generation_rarely_meets_are_answered_as_documented(tmp_path: Path) -> None:
    """A refused or replayed token, a missing second factor, a body over the limit (the server's
    and a function's own), a throttled address and a function's rate, a full concurrency limit, a
    timeout, a function that raises, a request head too large: each provoked on purpose (the e2e
    and limits fixtures have a function for each) and held to the spec and the signature check."""
    throttle = security.Throttle(per_address=3)
    with secured_server(FIXTURES / "e2e", tmp_path, throttle=throttle, max_body=256, concurrency=1) as served:
        url = served.settings.audience
        spec = schemathesis.openapi.from_url(f"{url}/openapi.json", config=CONFIG)
        acme = security.read_credential(served.cred)
        kid, k = served.keystore.add_tenant("guest")
        guest = security.Credential(stt=1, url=url, tid="guest", kid=kid, k=security.b64encode(k))

        def check(
            response: requests.Response, status: int, code: str, credential: security.Credential, as_path: str = ""
        ) -> None:
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
            case = spec[as_path or response.request.path_url]["POST"].Case()
            case.validate_response(response, checks=CONFORMANCE)
            signed_for(credential)(None, schemathesis.Response.from_any(response), case)

        def call(func: str, status: int, code: str, who: security.Credential | None = None, **kwargs: Any) -> None:
            credential = who or acme  # acme: that of the server running, as another starts below
            response = requests.post(f"{url}/rest/{func}/", auth=STT1Auth(credential), timeout=10, **kwargs)
            check(response, status, code, credential)

        call("add", 400, "bad_json", json=[1, 2])
        # acme's own function is not in the spec anyone may read: to a guest it is any missing one
        hidden = requests.post(f"{url}/rest/acme_only/", auth=STT1Auth(guest), json={}, timeout=10)
        check(hidden, 404, "not_found", guest, as_path="/rest/add/")
        assert "/rest/acme_only/" not in spec.raw_schema["paths"]
        call("guarded", 401, "unauthorized")  # signed: the token was good, the second factor is missing
        call("echo", 413, "too_large", json={"text": "x" * 300})
        call("echo", 415, "unsupported_media_type", data=b"{}", headers={"Content-Type": "text/plain"})
        call("echo", 422, "invalid_arguments", json={"text": 1})
        call("boom", 500, "internal_error")
        call("nap", 504, "timeout", json={"seconds": 5})

        gate = served.app.catalog.functions["wait_for_gate"].func.__globals__["GATE"]
        gate.clear()
        first: list[requests.Response] = []
        holder = threading.Thread(
            target=lambda: first.append(requests.post(f"{url}/rest/wait_for_gate/", auth=STT1Auth(acme), timeout=10))
        )
        holder.start()
        deadline = time.monotonic() + 5
        while served.app.dispatcher.inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            call("add", 503, "overloaded", json={"a": 1, "b": 2})
        finally:
            gate.set()
            holder.join(10)
        assert first[0].status_code == 200

        with requests.Session() as session:  # the same signed request twice: the second is a replay
            prepared = session.prepare_request(
                requests.Request("POST", f"{url}/rest/add/", json={"a": 1, "b": 2}, auth=STT1Auth(acme))
            )
            assert session.send(prepared, timeout=10).status_code == 200
            check(session.send(prepared, timeout=10), 401, "unauthorized", acme)  # signed, for that jti

        for _ in range(2):  # the replay counted as one failure; no token: two more unsigned 401s ...
            check(requests.post(f"{url}/rest/add/", json={"a": 1, "b": 2}, timeout=10), 401, "unauthorized", acme)
        throttled = requests.post(f"{url}/rest/add/", json={"a": 1, "b": 2}, timeout=10)
        check(throttled, 429, "throttled", acme)  # ... until its failures are throttled

        huge = requests.post(f"{url}/rest/echo/", json={"text": "x"}, headers={"X-Padding": "x" * 70_000}, timeout=10)
        assert huge.status_code == 431  # the HTTP protocol's own refusal: no request id, no token
        spec["/rest/echo/"]["POST"].Case().validate_response(huge, checks=CONFORMANCE)

    # A function's own limits come after the token check: signed.
    (tmp_path / "limits").mkdir()
    with secured_server(FIXTURES / "limits", tmp_path / "limits") as served:
        url = served.settings.audience
        spec = schemathesis.openapi.from_url(f"{url}/openapi.json", config=CONFIG)
        acme = security.read_credential(served.cred)
        call("tiny", 413, "too_large", json={"text": "more than sixteen bytes"})
        answers = [requests.post(f"{url}/rest/twice_a_second/", auth=STT1Auth(acme), timeout=10) for _ in range(3)]
        check(answers[-1], 429, "rate_limited", acme)
