"""End to end against a real uvicorn server: every row of DESIGN.md's error table and more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
from openapi_spec_validator import validate

import gateway_app as gateway
from conftest import FIXTURES, ROOT


class HeaderCaller:
    """What the security middleware puts in the scope, minus the cryptography."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.otp = None  # no authenticator code in its token

    def may_call(self, name: str) -> bool:
        return True


def tenant_from_header(app: gateway.ASGIApp) -> gateway.ASGIApp:
    """Stands in for the security middleware: it only fills the caller seam in the scope."""

    async def middleware(scope, receive, send):  # type: ignore[no-untyped-def]
        for key, value in scope["headers"]:
            if key == b"x-test-tenant":
                scope[gateway.CALLER_KEY] = HeaderCaller(value.decode())
                scope[gateway.TENANT_KEY] = value.decode()
        await app(scope, receive, send)

    return middleware


@pytest.fixture
def gw(serve):  # type: ignore[no-untyped-def]
    return serve(gateway.create_app(FIXTURES / "e2e", security=tenant_from_header, max_body=1000, auth="off"))


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["valid"] is False and set(body) == {"valid", "error"}
    assert response.headers["content-type"] == "application/json"
    assert len(response.headers["x-request-id"]) >= 8
    return response.status_code, body["error"]["code"]


# 200s: each URL form, each kind of function


@pytest.mark.parametrize("path", ["/rest/add", "/rest/add/"])
def test_call_by_url(gw, path: str) -> None:  # type: ignore[no-untyped-def]
    response = gw.post(path, {"a": 1, "b": 2})
    assert (response.status_code, response.json()) == (200, {"results": 3, "valid": True})


@pytest.mark.parametrize("path", ["/rest/add/40", "/rest/add/40/"])
def test_call_with_var1(gw, path: str) -> None:  # type: ignore[no-untyped-def]
    assert gw.post(path, {"b": 2}).json() == {"results": 42, "valid": True}


@pytest.mark.parametrize("path", ["/rest", "/rest/"])
def test_call_by_funcname(gw, path: str) -> None:  # type: ignore[no-untyped-def]
    assert gw.post(path, {"funcName": "add", "a": 1, "b": 2}).json()["results"] == 3


def test_var1_keeps_an_encoded_slash(gw) -> None:  # type: ignore[no-untyped-def]
    assert gw.post("/rest/echo/a%2Fb").json()["results"] == "a/b"


def test_a_percent_encoding_that_is_not_utf8_is_refused_not_replaced(gw) -> None:  # type: ignore[no-untyped-def]
    """The var1 "%FF%FE" reached echo as two U+FFFD characters, answered 200."""
    assert gw.post("/rest/echo/%C3%A9").json()["results"] == "\u00e9"
    for var1 in ["%FF%FE", "%C3", "a%80"]:
        assert error_of(gw.post(f"/rest/echo/{var1}")) == (422, "invalid_arguments")
    assert error_of(gw.post("/rest/%FFecho/x")) == (404, "not_found")


def test_an_encoded_rest_prefix_names_no_function(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Routing goes by the decoded path, the function by the raw one: "/%72est/x" decodes to
    "/rest/x", and its raw tail after six bytes is "t/x", which once called `t` with var1 "x"."""
    (tmp_path / "tiny.py").write_text("__all_exposed__ = ['t']\n\n\ndef t(x: str = '') -> str:\n    return x\n")
    gw = serve(gateway.create_app(tmp_path, auth="off", reload=False))
    assert gw.post("/rest/t/x").json()["results"] == "x"
    answer = gw.post("/%72est/x")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_async_function_is_awaited(gw) -> None:  # type: ignore[no-untyped-def]
    assert gw.post("/rest/scale/2", {"values": [1, 2], "offset": 1}).json()["results"] == [3.0, 5.0]


def test_sync_function_runs_in_the_thread_pool_and_inline_on_the_loop(gw) -> None:  # type: ignore[no-untyped-def]
    assert gw.post("/rest/thread_name").json()["results"].startswith("gateway-call")


def test_none_result_and_empty_body(gw) -> None:  # type: ignore[no-untyped-def]
    response = gw.client.post("/rest/nothing")
    assert response.json() == {"results": None, "valid": True}


def test_every_response_has_a_request_id_and_a_given_safe_one_is_kept(gw) -> None:  # type: ignore[no-untyped-def]
    assert gw.post("/rest/add", {"a": 1, "b": 2}, headers={"x-request-id": "lb-42.abc"}).headers["x-request-id"] == (
        "lb-42.abc"
    )
    unsafe = gw.post("/rest/add", {"a": 1, "b": 2}, headers={"x-request-id": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
    # /healthz (answered without Starlette) and the Starlette site's answers keep it too
    for method, path in [("GET", "/healthz"), ("HEAD", "/healthz"), ("POST", "/healthz"), ("GET", "/openapi.json")]:
        response = gw.client.request(method, path, headers={"x-request-id": "lb-43.def"})
        assert response.headers["x-request-id"] == "lb-43.def", (method, path)


def test_no_answer_names_the_server_software_and_every_one_is_dated(gw) -> None:  # type: ignore[no-untyped-def]
    for answer in (gw.post("/rest/add", {"a": 1, "b": 2}), gw.client.get("/healthz"), gw.client.get("/nowhere")):
        assert "server" not in answer.headers
        assert answer.headers["date"].endswith(" GMT")  # RFC 9110: an origin server with a clock sends Date


# The error table, row by row


@pytest.mark.parametrize(
    ("content", "path"),
    [
        (b"{not json", "/rest/add"),
        (b"[1, 2]", "/rest/add"),
        (b'{"funcName": "echo"}', "/rest/add"),
        (b'{"a": 1}', "/rest/"),
        (b'{"funcName": 3}', "/rest/"),
    ],
)
def test_400_bad_json(gw, content: bytes, path: str) -> None:  # type: ignore[no-untyped-def]
    response = gw.client.post(path, content=content, headers={"content-type": "application/json"})
    assert error_of(response) == (400, "bad_json")


@pytest.mark.parametrize("path", ["/rest/missing", "/rest/add/1/2", "/rest//add", "/rest/acme_only"])
def test_404_not_found(gw, path: str) -> None:  # type: ignore[no-untyped-def]
    response = gw.post(path, {})
    assert error_of(response) == (404, "not_found")
    assert response.json()["error"]["message"] == "no such function"


def test_a_function_of_another_tenant_looks_exactly_like_a_missing_one(gw) -> None:  # type: ignore[no-untyped-def]
    other = gw.post("/rest/acme_only", {}, headers={"x-test-tenant": "globex"})
    missing = gw.post("/rest/no_such_function", {}, headers={"x-test-tenant": "globex"})
    assert (other.status_code, other.content) == (missing.status_code, missing.content)
    allowed = gw.post("/rest/acme_only", {}, headers={"x-test-tenant": "acme"})
    assert allowed.json() == {"results": "for acme", "valid": True}


def test_404_outside_rest_is_json_too(gw) -> None:  # type: ignore[no-untyped-def]
    assert error_of(gw.client.get("/nowhere")) == (404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/rest/add", "POST"), ("PUT", "/rest/", "GET, HEAD, POST"), ("DELETE", "/rest/add/1", "POST")],
)
def test_405_method_not_allowed(gw, method: str, path: str, allow: str) -> None:  # type: ignore[no-untyped-def]
    response = gw.client.request(method, path)
    assert error_of(response) == (405, "method_not_allowed")
    assert response.headers["allow"] == allow


def test_405_outside_rest_is_json_too(gw) -> None:  # type: ignore[no-untyped-def]
    assert error_of(gw.client.post("/healthz")) == (405, "method_not_allowed")


def test_head_on_the_catalog_answers_as_get_does_without_the_body(gw) -> None:  # type: ignore[no-untyped-def]
    """It was a 405 with `Allow: GET, POST` (RFC 9110 9.3.2: HEAD wherever GET works)."""
    got, head = gw.client.get("/rest/"), gw.client.head("/rest/")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))


@pytest.mark.parametrize("path", ["/healthz/", "/console/", "/openapi.json/", "/static"])
def test_a_trailing_slash_outside_rest_is_a_json_404_not_a_redirect(gw, path: str) -> None:  # type: ignore[no-untyped-def]
    """They were bare 307s to an absolute http:// URL: the wrong scheme behind a TLS proxy."""
    assert error_of(gw.client.get(path)) == (404, "not_found")


@pytest.mark.parametrize("value", ["ttif", "bytes=999999999-", "bytes=5-2", "lines=0-1", "bytes=0-9"])
@pytest.mark.parametrize("path", ["/console", "/static/stt1.js"])
def test_the_files_ignore_range_so_no_error_leaves_the_json_model(gw, path: str, value: str) -> None:  # type: ignore[no-untyped-def]
    # Found by fuzz/fuzz_request.py (GET /console with "Range: ttif"): Starlette answered a
    # malformed or unsatisfiable Range with a text/plain 400 or 416. RFC 9110 lets a server
    # ignore Range, and these files are a few KB: every such request gets the whole file.
    whole = gw.client.get(path)
    response = gw.client.get(path, headers={"range": value, "if-range": whole.headers["etag"]})
    assert (response.status_code, response.content) == (200, whole.content)


def test_413_by_content_length_before_reading(gw) -> None:  # type: ignore[no-untyped-def]
    response = gw.client.post(
        "/rest/echo", content=b'{"text": "' + b"x" * 2000 + b'"}', headers={"content-type": "application/json"}
    )
    assert error_of(response) == (413, "too_large")


def test_413_for_a_chunked_body_without_length(gw) -> None:  # type: ignore[no-untyped-def]
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"text": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    response = gw.client.post("/rest/echo", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert error_of(response) == (413, "too_large")


def test_a_body_at_the_limit_is_accepted(gw) -> None:  # type: ignore[no-untyped-def]
    body = b'{"text": "' + b"x" * (1000 - 12) + b'"}'
    assert len(body) == 1000
    response = gw.client.post("/rest/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_415_unsupported_media_type(gw, content_type: str) -> None:  # type: ignore[no-untyped-def]
    response = gw.client.post("/rest/add", content=b'{"a": 1, "b": 2}', headers={"content-type": content_type})
    assert error_of(response) == (415, "unsupported_media_type")


def test_json_with_a_charset_is_fine(gw) -> None:  # type: ignore[no-untyped-def]
    response = gw.client.post(
        "/rest/add", content=b'{"a": 1, "b": 2}', headers={"content-type": "Application/JSON; charset=utf-8"}
    )
    assert response.json()["results"] == 3


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/rest/add", {"a": 1}, "Object missing required field `b`"),
        ("/rest/add", {"a": 1, "b": 2, "c": 3}, "Object contains unknown field `c`"),
        ("/rest/add", {"a": 1, "b": "2"}, "Expected `int`, got `str` - at `$.b`"),
        ("/rest/add/1", {"a": 1, "b": 2}, "`a` is given both in the URL and in the body"),
        ("/rest/add/one", {"b": 2}, "Expected `int`, got `str` - at `$.a` (from the URL)"),
    ],
)
def test_422_invalid_arguments_names_the_field(gw, path: str, body: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    response = gw.post(path, body)
    assert error_of(response) == (422, "invalid_arguments")
    assert response.json()["error"]["message"] == message


def test_500_hides_the_traceback_and_logs_it_with_the_request_id(gw, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.ERROR, logger="gateway"):
        response = gw.post("/rest/boom", {"secret_hint": "s3cr3t"})
    assert error_of(response) == (500, "internal_error")
    assert "s3cr3t" not in response.text and "Traceback" not in response.text and "RuntimeError" not in response.text
    [record] = [r for r in caplog.records if r.exc_info]
    assert response.headers["x-request-id"] in record.getMessage()
    assert "internal detail s3cr3t" in caplog.text and "Traceback" in caplog.text


def test_500_for_a_result_msgspec_cannot_encode(gw) -> None:  # type: ignore[no-untyped-def]
    assert error_of(gw.post("/rest/unencodable")) == (500, "internal_error")


@pytest.mark.parametrize("name", ["nap", "sync_nap"])
def test_504_timeout_and_the_server_stays_responsive(gw, name: str) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    response = gw.post(f"/rest/{name}", {"seconds": 2})
    assert error_of(response) == (504, "timeout")
    assert time.monotonic() - started < 1.5
    assert gw.post("/rest/add", {"a": 1, "b": 2}).json()["results"] == 3


def test_global_timeout_applies_when_the_entry_sets_none(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", timeout=0.2, auth="off"))
    fn = gw.app.catalog.functions["wait_for_gate"]
    assert fn.timeout is None
    assert error_of(gw.post("/rest/wait_for_gate")) == (504, "timeout")


def test_503_when_the_concurrency_limit_is_reached(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", concurrency=1, auth="off"))
    gate = gw.app.catalog.functions["wait_for_gate"].func.__globals__["GATE"]
    gate.clear()
    first: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: first.append(httpx.post(f"{gw.url}/rest/wait_for_gate", timeout=10)))
    worker.start()
    deadline = time.monotonic() + 5
    while gw.app.dispatcher.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert error_of(gw.post("/rest/add", {"a": 1, "b": 2})) == (503, "overloaded")
    finally:
        gate.set()
        worker.join(10)
    assert first[0].json() == {"results": "opened", "valid": True}
    assert gw.post("/rest/add", {"a": 1, "b": 2}).status_code == 200


def test_a_hung_thread_keeps_its_slot_until_it_returns(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", concurrency=1, auth="off"))
    assert error_of(gw.post("/rest/sync_nap", {"seconds": 1.0})) == (504, "timeout")  # after 0.3 s
    assert error_of(gw.post("/rest/add", {"a": 1, "b": 2})) == (503, "overloaded")  # the thread still sleeps
    deadline = time.monotonic() + 5
    while (answer := gw.post("/rest/add", {"a": 1, "b": 2})).status_code == 503:  # until the thread returns
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert answer.status_code == 200


@pytest.fixture
def dispatch(serve):  # type: ignore[no-untyped-def]
    """The dispatch fixtures on one pool thread, so a test can keep every thread busy."""
    return serve(gateway.create_app(FIXTURES / "dispatch", threads=1, auth="off", reload=False))


def test_a_call_that_times_out_before_a_thread_is_free_never_runs(dispatch) -> None:  # type: ignore[no-untyped-def]
    state = dispatch.app.catalog.functions["record"].func.__globals__
    first: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: first.append(httpx.post(f"{dispatch.url}/rest/hold_the_thread", timeout=10))
    )
    worker.start()
    try:
        assert state["HOLDING"].wait(5)  # the one thread is taken
        assert error_of(dispatch.post("/rest/record", {"text": "late"})) == (504, "timeout")  # queued, 0.2 s
    finally:
        state["RELEASE"].set()
        worker.join(10)
    assert first[0].json() == {"results": "released", "valid": True}
    # The pool runs its queue in order: a "late" call still queued would have run before this one.
    assert dispatch.post("/rest/record", {"text": "on time"}).json()["results"] == ["on time"]
    assert dispatch.app.dispatcher.inflight == 0  # the dropped call gave its slot back, once


CALLED_AS = ["fail", "fail_inline", "fail_async"]  # in the thread pool, on the event loop, awaited


@pytest.mark.parametrize("function", CALLED_AS)
@pytest.mark.parametrize("how", ["exit", "bad_command_line", "interrupt", "cancel"])
def test_a_base_exception_from_the_function_is_a_json_500_with_the_traceback_logged(  # type: ignore[no-untyped-def]
    dispatch, caplog, function: str, how: str
) -> None:
    """sys.exit(), argparse on bad input, KeyboardInterrupt or a CancelledError of its own are the
    function's failures like any other: not uvicorn's text/plain 500 without a request id."""
    with caplog.at_level(logging.ERROR, logger="gateway"):
        response = dispatch.post(f"/rest/{function}", {"how": how})
    assert error_of(response) == (500, "internal_error")
    [record] = [r for r in caplog.records if r.exc_info]
    assert response.headers["x-request-id"] in record.getMessage() and "Traceback" in caplog.text
    assert dispatch.post("/rest/wrapped", {"text": "still serving"}).json()["results"] == "STILL SERVING"


def test_a_function_that_swallows_its_timeout_still_gets_the_504(dispatch) -> None:  # type: ignore[no-untyped-def]
    """It caught the cancellation and returned: that answer was a 200, 0.1 s past its timeout."""
    response = dispatch.post("/rest/stubborn")
    assert error_of(response) == (504, "timeout")
    assert dispatch.app.dispatcher.inflight == 0


@pytest.mark.parametrize("function", ["fail", "fail_async"])
def test_a_timeout_error_the_function_raises_is_a_500_not_the_gateways_504(dispatch, caplog, function: str) -> None:  # type: ignore[no-untyped-def]
    """socket.timeout from an upstream is the function's failure: only the gateway's own timeout is a 504."""
    with caplog.at_level(logging.ERROR, logger="gateway"):
        response = dispatch.post(f"/rest/{function}", {"how": "upstream_timeout"})
    assert error_of(response) == (500, "internal_error")
    [record] = [r for r in caplog.records if r.exc_info]
    assert response.headers["x-request-id"] in record.getMessage()
    assert "the upstream did not answer" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize("path", ["nap", "sync_nap"])
def test_a_cancelled_request_task_is_answered_as_cut_off(path: str) -> None:
    """Cancelling the request's task is a server that stops, past its grace period. Let
    through, the cancellation became uvicorn's bare text 500; the call is answered instead, as
    what it is: cut off, and maybe run (a sync function's thread goes on)."""
    app = gateway.create_app(FIXTURES / "e2e", auth="off", reload=False)
    sent: list[dict] = []

    async def run() -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b'{"seconds": 0.1}', "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": f"/rest/{path}",
            "headers": [(b"content-type", b"application/json")],
        }
        task = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
        while app.dispatcher.inflight == 0:  # until the function runs
            await asyncio.sleep(0)
        task.cancel()
        await task  # answered, so it ends as any request does

    asyncio.run(run())
    assert sent[0]["status"] == 503 and msgspec.json.decode(sent[1]["body"])["error"] == {
        "code": "overloaded",
        "message": "the gateway is stopping: this call was cut off and may have run; check before retrying",
    }
    app.dispatcher.close()


@pytest.mark.parametrize(("function", "result"), [("wrapped", "ABC"), ("wrapped_inline", "abc")])
def test_an_async_function_behind_a_sync_decorator_is_awaited(dispatch, function: str, result: str) -> None:  # type: ignore[no-untyped-def]
    assert dispatch.post(f"/rest/{function}", {"text": "aBc"}).json() == {"results": result, "valid": True}
    assert dispatch.app.dispatcher.inflight == 0


def test_an_async_function_behind_a_sync_decorator_keeps_its_timeout(dispatch) -> None:  # type: ignore[no-untyped-def]
    assert error_of(dispatch.post("/rest/wrapped_forever")) == (504, "timeout")  # 0.2 s
    assert dispatch.app.dispatcher.inflight == 0


def test_a_client_that_disconnects_mid_body_does_not_hurt_the_server(gw) -> None:  # type: ignore[no-untyped-def]
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(
            b"POST /rest/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"text": '
        )
    assert gw.post("/rest/echo", {"text": "still here"}).json()["results"] == "still here"


# Catalog, health, OpenAPI


def test_catalog_lists_only_what_the_tenant_may_call(gw) -> None:  # type: ignore[no-untyped-def]
    anonymous = gw.client.get("/rest/").json()["results"]
    acme = gw.client.get("/rest/", headers={"x-test-tenant": "acme"}).json()["results"]
    assert "acme_only" not in anonymous and "acme_only" in acme
    assert set(acme) - set(anonymous) == {"acme_only", "guarded"}  # guarded needs a second factor
    add = anonymous["add"]
    assert add["var1"] == "a"
    assert add["arguments"]["$defs"]["add_args"]["required"] == ["a", "b"]


def test_the_url_is_offered_only_for_an_argument_a_string_can_be(tmp_path: Path) -> None:
    """A list, dict or struct cannot come from the URL's text (a try is a 422): the catalog and
    the OpenAPI description said `POST /rest/total/{xs}` binds it all the same."""
    (tmp_path / "shapes.py").write_text(
        "__all_exposed__ = ['total', 'scaled', 'nodoc']\n\n"
        'def total(xs: list[int]) -> int:\n    """Sum."""\n    return sum(xs)\n\n'
        'def scaled(x: float | None = None, by: list[int] | None = None) -> float:\n'
        '    """Scale."""\n    return 1.0\n\n'
        "def nodoc(n: int) -> int:\n    return n\n"
    )
    catalog = gateway.load_modules(tmp_path)
    assert {name: fn.url_var1 for name, fn in catalog.functions.items()} == {"total": None, "scaled": "x", "nodoc": "n"}
    described = gateway.Gateway(gateway.Settings(auth="off"), catalog).describe(None)
    assert (described["total"]["var1"], described["scaled"]["var1"]) == (None, "x")
    paths = gateway.openapi(catalog, secured=False)["paths"]
    assert paths["/rest/total/"]["post"]["description"] == "Sum."
    assert paths["/rest/scaled/"]["post"]["description"] == "Scale.\n\n`POST /rest/scaled/{x}` binds `x` from the URL."
    assert paths["/rest/nodoc/"]["post"]["description"] == "`POST /rest/nodoc/{n}` binds `n` from the URL."


def test_healthz_reports_functions_and_refused_modules(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "discovery", auth="off"))
    body = gw.client.get("/healthz").json()
    assert body["status"] == "ok" and body["functions"] == 5
    assert {
        "module": str(FIXTURES / "discovery" / "missing_name.py"),
        "reason": "`ghost` is listed but not defined",
    } in body["refused"]
    assert len(body["refused"]) == 17


@pytest.mark.parametrize("folder", [FIXTURES / "e2e", ROOT / "modules"])
def test_openapi_is_valid_and_has_one_operation_per_function(serve, folder) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(folder, auth="off"))
    document = gw.client.get("/openapi.json").json()
    validate(document)
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    # anyone may read it: a function only some tenants may call is for their catalog alone
    assert operations == {name for name, fn in gw.app.catalog.functions.items() if fn.tenants is None}
    if folder == ROOT / "modules":
        assert "reserve" in gw.app.catalog.functions and "reserve" not in operations  # acme's only
    add_args = document["components"]["schemas"]["add_args"]
    assert add_args["additionalProperties"] is False and add_args["required"] == ["a", "b"]


def test_openapi_is_built_once_per_catalog(serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Anyone may ask for it, and it was built on the event loop for every request: with 3,000
    modules a third of a second each, so a few clients asking for it held up every call."""
    builds = []
    real = gateway.openapi
    monkeypatch.setattr(gateway, "openapi", lambda *args, **kwargs: builds.append(1) or real(*args, **kwargs))
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off", reload=False))
    first, second = gw.client.get("/openapi.json"), gw.client.get("/openapi.json")
    assert first.content == second.content and len(builds) == 1
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    gw.app.catalog = gateway.load_modules(ROOT / "modules")  # what a reload does
    third = gw.client.get("/openapi.json")
    assert len(builds) == 2 and "/rest/power/" in third.json()["paths"] and "/rest/power/" not in first.json()["paths"]


def test_openapi_lists_every_status_with_its_body_and_headers() -> None:
    catalog = gateway.load_modules(FIXTURES / "e2e")
    secured, open_ = gateway.openapi(catalog, secured=True), gateway.openapi(catalog, secured=False)
    validate(secured)
    validate(open_)
    add = secured["paths"]["/rest/add/"]["post"]
    assert add["requestBody"]["required"] is True  # `{}` would miss a and b: a 422
    assert secured["paths"]["/rest/nothing/"]["post"]["requestBody"]["required"] is False
    assert sorted(add["responses"]) == [
        "200", "400", "401", "404", "408", "413", "415", "422", "429", "431", "500", "503", "504"
    ]  # fmt: skip
    open_responses = open_["paths"]["/rest/add/"]["post"]["responses"]
    assert sorted(open_responses) == sorted(set(add["responses"]) - {"401"})  # nothing checks tokens
    assert secured["security"] == [{"STT1": []}] and "security" not in open_
    scheme = secured["components"]["securitySchemes"]["STT1"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "STT1")
    ok = add["responses"]["200"]
    assert ok["headers"]["STT1-Response"]["required"] is True
    assert list(open_["paths"]["/rest/add/"]["post"]["responses"]["200"]["headers"]) == ["X-Request-Id"]
    result = ok["content"]["application/json"]["schema"]
    assert result["required"] == ["results", "valid"] and result["properties"]["valid"] == {"const": True}
    assert result["additionalProperties"] is False
    responses = secured["components"]["responses"]
    unauthorized, too_many = responses["Unauthorized"], responses["TooManyRequests"]
    assert unauthorized["headers"]["STT1-Response"]["required"] is False  # a replay is signed, a bad token not
    assert unauthorized["headers"]["WWW-Authenticate"] == {"required": True, "schema": {"const": "STT1"}}
    assert too_many["headers"]["Retry-After"]["required"] is True
    assert too_many["headers"]["STT1-Response"]["required"] is False  # a throttled address is not signed
    assert code_schema(secured, "TooManyRequests") == {"enum": ["throttled", "rate_limited"]}
    assert code_schema(open_, "TooManyRequests") == {"const": "rate_limited"}  # no tokens: only a function's rate
    assert "headers" not in responses["HeadTooLarge"]  # refused by the HTTP protocol: no request id, no token
    bad_request = responses["BadRequest"]["headers"]  # bad_json has both; bad_request (not HTTP) neither
    assert not bad_request["X-Request-Id"]["required"] and not bad_request["STT1-Response"]["required"]
    assert code_schema(secured, "BadRequest") == {"enum": ["bad_json", "bad_request"]}
    body = responses["Timeout"]["content"]["application/json"]["schema"]
    assert body["properties"] == {
        "valid": {"const": False},
        "error": {
            "type": "object",
            "properties": {"code": {"const": "timeout"}, "message": {"type": "string"}},
            "required": ["code", "message"],
            "additionalProperties": False,
        },
    }


SHOP = """\
import typing
import msgspec
__all_exposed__ = ["put_{m}"{more}]
T = typing.TypeVar("T")
class Item(msgspec.Struct):
    sku: str
class Page(msgspec.Struct, typing.Generic[T]):
    items: list[T]
def put_{m}(sku: str) -> Item:
    return Item(sku)
def page_{m}(sku: str) -> Page[Item]:
    return Page([Item(sku)])
"""


@pytest.mark.parametrize("generic", [False, True])
def test_openapi_answers_when_two_modules_return_types_of_the_same_name(serve, tmp_path: Path, generic: bool) -> None:  # type: ignore[no-untyped-def]
    """Two modules, each with its own Item (and Page[Item]): /openapi.json was a text/plain 500
    (msgspec named Result[Item] twice the same, and raised; the same for Page[Item])."""
    for m in "ab":
        (tmp_path / f"shop_{m}.py").write_text(SHOP.format(m=m, more=f', "page_{m}"' if generic else ""))
    gw = serve(gateway.create_app(tmp_path, auth="off"))
    response = gw.client.get("/openapi.json")
    assert (response.status_code, response.headers["content-type"]) == (200, "application/json")
    document = response.json()
    validate(document)
    schemas = document["components"]["schemas"]

    def resolve(schema: dict) -> dict:
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    items = set()
    for name in gw.app.catalog.functions:
        ok = document["paths"][f"/rest/{name}/"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["properties"]["valid"] == {"const": True}
        results = ok["properties"]["results"]
        item = results if name.startswith("put") else resolve(results)["properties"]["items"]["items"]
        assert resolve(item)["properties"] == {"sku": {"type": "string"}}
        items.add(item["$ref"])
    assert len(items) == 2  # each module's own Item, apart; shared by its two functions
    assert not any(name.startswith("_gw") for name in schemas)  # no generation: a reload keeps the names


def test_openapi_answers_when_msgspec_gives_two_types_one_name(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One generic Page, each module's Item in it: msgspec names both Page[Item] and raises, so
    each function gets components of its own."""
    (tmp_path / "_pages.py").write_text(
        "import typing\nimport msgspec\nT = typing.TypeVar('T')\n"
        "class Page(msgspec.Struct, typing.Generic[T]):\n    items: list[T]\n"
    )
    for m in "ab":
        (tmp_path / f"shop_{m}.py").write_text(
            f"import msgspec\nfrom . import _pages\n__all_exposed__ = ['page_{m}']\n"
            f"class Item(msgspec.Struct):\n    sku_{m}: str\n"
            f"def page_{m}(sku: str) -> _pages.Page[Item]:\n    return _pages.Page([Item(sku)])\n"
        )
    gw = serve(gateway.create_app(tmp_path, auth="off"))
    assert sorted(gw.app.catalog.functions) == ["page_a", "page_b"]
    response = gw.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    schemas = document["components"]["schemas"]
    for m in "ab":
        ok = document["paths"][f"/rest/page_{m}/"]["post"]["responses"]["200"]["content"]["application/json"]
        page = schemas[ok["schema"]["properties"]["results"]["$ref"].rsplit("/", 1)[1]]
        item = schemas[page["properties"]["items"]["items"]["$ref"].rsplit("/", 1)[1]]
        assert item["properties"] == {f"sku_{m}": {"type": "string"}}


def test_an_error_of_ours_outside_rest_is_json_with_a_request_id(serve, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off"))

    async def broken(request: object) -> None:
        raise RuntimeError("a bug of ours")

    gw.app.site.add_route("/broken", broken)  # the real Starlette site, with a route that fails
    response = gw.client.get("/broken")
    assert error_of(response) == (500, "internal_error")
    assert "a bug of ours" not in response.text


def code_schema(document: dict, response: str) -> dict:
    body = document["components"]["responses"][response]["content"]["application/json"]["schema"]
    return dict(body["properties"]["error"]["properties"]["code"])


def test_the_example_modules_answer_as_the_readme_says(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(ROOT / "modules", auth="off"))
    assert gw.post("/rest/add", {"a": 1, "b": 2}).json() == {"results": 3.0, "valid": True}
    assert gw.post("/rest/power/3").json()["results"] == 9.0
    assert gw.post("/rest/slugify/Hello%20World").json()["results"] == "hello-world"
    assert gw.post("/rest/describe", {"values": [1, 2, 3]}).json()["results"]["mean"] == 2.0
    assert gw.post("/rest/stock_level/apple").json()["results"]["level"] == 12
    assert gw.post("/rest/word_count", {"text": "a b a"}).json()["results"] == {"words": 3, "top": [["a", 2], ["b", 1]]}
    assert error_of(gw.post("/rest/reserve", {"sku": "apple", "qty": 1})) == (404, "not_found")
    assert error_of(gw.post("/rest/slow_report", {"seconds": 5})) == (504, "timeout")
    assert gw.post("/rest/is_prime/1000003").json()["results"] is True
    response = gw.post("/rest/is_prime", {"n": 2**89 - 1})
    assert error_of(response) == (422, "invalid_arguments")
    assert response.json()["error"]["message"] == "Expected `int` <= 1000000000000 - at `$.n`"


@pytest.mark.parametrize(
    ("function", "arguments", "message"),
    [  # each answered 500 (or `null` for a number) before its hints said what it takes
        ("describe", {"values": []}, "Expected `array` of length >= 1 - at `$.values`"),
        ("describe", {"values": [1.7e308, 1.7e308]}, "Expected `float` <= 1e+300 - at `$.values[0]`"),
        ("add", {"a": 1.7e308, "b": 1.7e308}, "Expected `float` <= 1e+300 - at `$.a`"),
        ("power", {"base": 2.5e183}, "Expected `float` <= 1000000.0 - at `$.base`"),
        ("power", {"base": 0, "exponent": -1}, "Expected `int` >= 0 - at `$.exponent`"),
        ("reserve", {"sku": "apple", "qty": 0}, "Expected `int` >= 1 - at `$.qty`"),
    ],
)
def test_the_example_modules_refuse_what_they_cannot_answer_with_a_422(  # type: ignore[no-untyped-def]
    serve, function: str, arguments: dict, message: str
) -> None:
    gw = serve(gateway.create_app(ROOT / "modules", security=tenant_from_header, auth="off"))
    response = gw.post(f"/rest/{function}", arguments, headers={"x-test-tenant": "acme"})
    assert error_of(response) == (422, "invalid_arguments")
    assert response.json()["error"]["message"] == message


def test_reserve_takes_all_or_nothing_and_says_which(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(ROOT / "modules", security=tenant_from_header, auth="off"))
    acme = {"x-test-tenant": "acme"}
    assert gw.post("/rest/reserve", {"sku": "apple", "qty": 5}, headers=acme).json()["results"] == {
        "sku": "apple",
        "reserved": 5,
        "left": 7,
    }
    short = gw.post("/rest/reserve", {"sku": "apple", "qty": 8}, headers=acme)  # a short stock is not a 500
    assert short.json()["results"] == {"sku": "apple", "reserved": 0, "left": 7}
    assert gw.post("/rest/stock_level/apple").json()["results"]["level"] == 7


def test_starlette_is_built_only_when_a_request_needs_it(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off"))
    assert gw.post("/rest/add", {"a": 1, "b": 2}).json()["results"] == 3
    health, head = gw.client.get("/healthz"), gw.client.head("/healthz")
    assert (health.status_code, health.headers["content-type"]) == (200, "application/json")
    assert health.json() == {"status": "ok", "functions": len(gw.app.catalog.functions), "refused": []}
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(health.content)))
    assert health.headers["x-request-id"] != head.headers["x-request-id"]
    assert gw.app._site is None  # the lifespan, /rest and /healthz ran without it
    assert error_of(gw.client.post("/healthz")) == (405, "method_not_allowed")
    assert gw.app._site is not None and gw.client.get("/openapi.json").status_code == 200


def test_the_lifespan_reports_start_and_stop_and_a_start_that_failed() -> None:
    async def run(app: gateway.Gateway, sent: list[dict[str, str]], *incoming: str) -> None:
        messages = iter([{"type": f"lifespan.{kind}"} for kind in incoming])

        async def receive() -> dict[str, str]:
            return next(messages)

        async def send(message: dict[str, str]) -> None:
            sent.append(message)

        await app({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]

    app = gateway.create_app(FIXTURES / "e2e", auth="off")
    sent: list[dict[str, str]] = []
    asyncio.run(run(app, sent, "startup", "shutdown"))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]

    @contextlib.asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise OSError("the watcher could not start")
        yield

    app._lifespan = broken  # type: ignore[method-assign]
    sent.clear()
    with pytest.raises(OSError):
        asyncio.run(run(app, sent, "startup"))
    assert sent == [{"type": "lifespan.startup.failed", "message": "OSError('the watcher could not start')"}]
