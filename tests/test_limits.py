"""Limits declared next to the code: a function's ``max_body`` (413) and ``rate`` (429), and the
global defaults ``--max-body`` and ``--rate`` for entries that set none."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import msgspec
import pytest

import client as stt1_client
import gateway_app as gateway
import security
from conftest import FIXTURES, secured_server

LIMITS = FIXTURES / "limits"
MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body_of(text: str) -> int:
    return len(msgspec.json.encode({"text": text}))


def test_limits_are_read_from_the_entries() -> None:
    catalog = gateway.load_modules(LIMITS)
    functions = catalog.functions
    assert (functions["tiny"].max_body, functions["big"].max_body, functions["plain"].max_body) == (16, 3_000_000, None)
    assert (functions["twice_a_second"].rate, functions["unlimited"].rate, functions["plain"].rate) == (2, 0, None)
    assert catalog.max_body == 3_000_000  # what the gateway reads before it knows the function


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ('{"name": "f", "max_body": -1}', "Expected `int` >= 0"),
        ('{"name": "f", "rate": -0.5}', "Expected `float` >= 0.0"),
        ('{"name": "f", "rate": "fast"}', "Expected `float | null`, got `str`"),
    ],
)
def test_a_bad_limit_refuses_the_module(tmp_path: Path, entry: str, reason: str) -> None:
    (tmp_path / "bad.py").write_text(f"__all_exposed__ = [{entry}]\ndef f() -> int:\n    return 1\n")
    catalog = gateway.load_modules(tmp_path)
    assert catalog.functions == {}
    [refusal] = catalog.refused
    assert reason in refusal.reason


def test_a_function_that_takes_no_body_is_called_by_both_clients(tmp_path: Path) -> None:
    """max_body 0 means arguments only in the URL: a client must then send no body at all,
    not "{}" (which was a 413, from client.py and the console alike)."""
    with secured_server(LIMITS, tmp_path) as server, stt1_client.Client(server.cred) as api:
        assert api.call("url_only", "abc") == 3
        assert api.call("url_only") == 0
        with pytest.raises(stt1_client.TooLarge):
            api.call("url_only", text="abc")  # in the body: refused, signed
        script = tmp_path / "url_only.mjs"
        script.write_text(
            f"import * as stt1 from {(gateway.STATIC / 'stt1.js').as_uri()!r};\n"
            f"const keys = await stt1.importCredential(JSON.parse({server.cred.read_text()!r}));\n"
            "const client = new stt1.Client(keys);\n"
            'console.log(JSON.stringify([await client.call("url_only", "abcd"), await client.call("url_only")]));\n'
        )
        done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, "[4,0]"), done.stderr


def test_max_body_per_function_is_a_signed_413(tmp_path: Path) -> None:
    with secured_server(LIMITS, tmp_path) as server, stt1_client.Client(server.cred) as api:
        fits = "x" * (16 - body_of(""))
        assert api.call("tiny", text=fits) == len(fits)
        with pytest.raises(stt1_client.TooLarge) as refused:  # the client verified it: a signed answer
            api.call("tiny", text=fits + "x")
        assert (refused.value.code, refused.value.message) == ("too_large", "`tiny` accepts at most 16 bytes")

        two_mib = "x" * (2 * MiB)
        assert api.call("big", text=two_mib) == 2 * MiB  # over the global default, within its own
        by_name = msgspec.json.encode({"funcName": "big", "text": two_mib})  # POST /rest/: funcName alike
        token, _ = security.sign_request(
            security.read_credential(server.cred), "POST", b"/rest/", b"application/json", by_name, time.time()
        )
        answer = httpx.post(f"{server.settings.audience}/rest/", content=by_name,
                            headers={"Authorization": f"STT1 {token}", "Content-Type": "application/json"})
        assert answer.json() == {"results": 2 * MiB, "valid": True}
        with pytest.raises(stt1_client.TooLarge) as default:
            api.call("plain", text=two_mib)  # no max_body in its entry: --max-body
        assert default.value.message == f"`plain` accepts at most {MiB} bytes"


def test_before_the_token_is_checked_every_path_has_the_same_limit(tmp_path: Path) -> None:
    """A body between two functions' limits must not tell a stranger which functions exist."""
    with secured_server(LIMITS, tmp_path) as server, httpx.Client(base_url=server.settings.audience) as http:
        # A real token of acme's, signed for another request: its kid is known, so the body
        # limit is reached (PROTOCOL.md 3, step 5) before the signature fails.
        token, _ = security.sign_request(
            security.read_credential(server.cred), "POST", b"/rest/other/", b"application/json", b"{}", time.time()
        )
        headers = {"Authorization": f"STT1 {token}", "Content-Type": "application/json"}
        for path in ("/rest/big/", "/rest/plain/", "/rest/tiny/", "/rest/no_such_function/"):
            medium = http.post(path, content=b"x" * (2 * MiB), headers=headers)
            assert medium.status_code == 401, path  # read, then refused for the token alone
            huge = http.post(path, content=b"x" * (3_000_001), headers=headers)
            assert huge.status_code == 413 and "stt1-response" not in huge.headers, path


def test_rate_per_function_and_tenant_is_a_signed_429(tmp_path: Path) -> None:
    with secured_server(LIMITS, tmp_path) as server:
        clock = server.app.limits.clock = FakeClock()
        kid, k = server.keystore.add_tenant("globex")
        other = tmp_path / "globex.json"
        credential = security.Credential(stt=1, url=server.settings.audience, tid="globex", kid=kid,
                                         k=security.b64encode(k))
        security.write_credential(other, credential)
        with stt1_client.Client(server.cred) as acme, stt1_client.Client(other) as globex:
            assert [acme.call("twice_a_second"), acme.call("twice_a_second")] == ["ok", "ok"]  # a burst of 2
            with pytest.raises(stt1_client.RateLimited) as limited:
                acme.call("twice_a_second")
            assert limited.value.code == "rate_limited"
            assert limited.value.message == "`twice_a_second` allows 2 calls per second; retry in 0.5 s"
            assert globex.call("twice_a_second") == "ok"  # another tenant, another bucket
            assert acme.call("plain") == 0 and acme.call("unlimited") == "ok"  # other functions are not held
            clock.now += 0.5  # one call's worth refills
            assert acme.call("twice_a_second") == "ok"
            with pytest.raises(stt1_client.RateLimited):
                acme.call("twice_a_second")


def test_the_global_rate_applies_where_the_entry_sets_none(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(LIMITS, auth="off", reload=False, rate=1))
    gw.app.limits.clock = FakeClock()
    assert gw.post("/rest/plain/", {}).status_code == 200
    refused = gw.post("/rest/plain/", {})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "valid": False,
        "error": {"code": "rate_limited", "message": "`plain` allows 1 call per second; retry in 1 s"},
    }
    assert [gw.post("/rest/unlimited/", {}).status_code for _ in range(5)] == [200] * 5  # rate 0 in its entry
    assert [gw.post("/rest/twice_a_second/", {}).status_code for _ in range(3)] == [200, 200, 429]  # its own


def test_the_bucket_refills_at_the_rate_and_holds_at_most_one_second() -> None:
    clock = FakeClock()
    limits = gateway.RateLimits(clock)
    assert limits.wait("acme", "f", 0.5) == 0.0  # a slow rate still allows one call at once
    assert limits.wait("acme", "f", 0.5) == pytest.approx(2.0)
    clock.now += 2
    assert limits.wait("acme", "f", 0.5) == 0.0
    clock.now += 3600  # an idle hour does not save up an hour of calls
    assert [limits.wait("acme", "g", 10) for _ in range(10)] == [0.0] * 10
    assert limits.wait("acme", "g", 10) == pytest.approx(0.1)
