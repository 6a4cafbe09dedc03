"""Atheris harness: the gateway's request path, in-process, with STT1 on.

Each input is an HTTP request (``METHOD TARGET``, header lines, a blank line, the body; see
``common.parse_input``). ``Authorization: STT1 @`` is replaced by a token signed for exactly
that request (``@N`` and ``@N:TEXT`` by that token with one character deleted or replaced), so
the fuzzer reaches dispatch and binding as well as the token checks. Every request goes through
the real app (``gateway.create_app`` over ``tests/fixtures/fuzz``, a keystore in a temp dir)
as uvicorn would hand it over. A crash is any of:

- an exception out of the app, or a request that takes over 5 s;
- a 500 (the fixture functions cannot raise, so a 500 is the gateway's fault), or an error
  answer that is not ``{"valid": false, "error": {"code", "message"}}`` in application/json;
- under /rest: anything but an exact valid token answered other than the one unsigned 401 (or
  413, which PROTOCOL.md 3.5 puts before the MAC check), or the handler running for it;
- under /rest with a valid token: an answer whose STT1-Response token does not verify.

Run it with ``fuzz/run.py request --seconds N`` (see fuzz/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import atheris

with atheris.instrument_imports(include=["gateway", "security", "starlette"]):
    import common

    STACK = common.build_stack()  # imports starlette's routing, so inside: it is instrumented too

REFRESH_EVERY = 20_000  # inputs between replay-store resets (a fixed clock never expires a jti)

logging.disable(logging.CRITICAL)  # thousands of refused tokens a second: the oracle speaks instead
LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)
_count = 0


def check(data: bytes) -> None:
    """Run one input and raise AssertionError if the answer breaks a rule in the docstring."""
    global _count
    request = common.parse_input(data)
    if request is None:
        return  # no HTTP parser would hand this to the app
    _count += 1
    if _count % REFRESH_EVERY == 0:
        STACK.fresh_replay_store()
    request.chunks = 1 + len(data) % 3
    request, jti, exact = common.sign_placeholders(STACK, request)
    before = STACK.calls["n"]
    answer = LOOP.run_until_complete(common.run_request(STACK.app, request))
    problem = common.error_problem(answer.status, answer.headers, answer.body)
    assert problem is None, problem
    if not common.routed_to_rest(request):
        return
    if not exact:
        assert answer.status in (401, 413), f"a request without a valid token got {answer.status}"
        assert answer.status != 401 or answer.body == common.UNAUTHORIZED, answer.body
        assert answer.header(b"stt1-response") is None, "a refused token got a signed answer"
        assert STACK.calls["n"] == before, "the handler ran for a refused token"
    elif answer.status not in (401, 413) or answer.header(b"stt1-response") is not None:
        assert jti is not None
        common.verify_response(STACK, jti, answer)  # InvalidToken: an unsigned or badly signed answer


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
