"""The browser client in real headless Chromium (Debian's, driven by Playwright; never a downloaded
browser), against a real gateway on a loopback port: WebCrypto needs a secure context, and
http://127.0.0.1 is one."""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

import gateway
from conftest import FIXTURES, ROOT, secured_server

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VECTORS = ROOT / "tests" / "vectors"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=FLAGS)
        yield context  # type: ignore[misc]
        context.close()


def test_the_vectors_pass_inside_chromium(browser, serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off", reload=False))
    page = browser.new_page()
    page.goto(f"{gw.url}/healthz")  # any page of the gateway's origin: a secure context for WebCrypto
    result = page.evaluate(
        """async ([paseto, stt1]) => {
            const m = await import("/static/vector_tests.js");
            return await m.runVectorTests(paseto, stt1);
        }""",
        [json.loads((VECTORS / "paseto" / "v3.json").read_text()), json.loads((VECTORS / "stt1.json").read_text())],
    )
    assert result["failed"] == 0, [line for line in result["lines"] if not line.startswith("ok")]
    assert result["passed"] >= 60
    page.close()


def test_an_imported_secret_cannot_be_read_back(browser, serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off", reload=False))
    page = browser.new_page()
    page.goto(f"{gw.url}/healthz")
    credential = json.dumps({"stt": 1, "url": gw.url, "tid": "acme", "kid": "AAAAAAAAAAAAAAAAAAAAAA",
                             "k": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"})
    outcome = page.evaluate(
        """async (text) => {
            const m = await import("/static/stt1.js");
            const keys = await m.importCredential(text);
            const found = JSON.stringify(keys, (k, v) => (v instanceof CryptoKey ? "<CryptoKey>" : v));
            try { await crypto.subtle.exportKey("raw", keys.key); return "exported"; }
            catch (e) { return [keys.key.extractable, found.includes("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")]; }
        }""",
        credential,
    )
    assert outcome == [False, False]  # not extractable, and no copy of the raw secret kept beside it
    page.close()


CALL = """async (credential) => {
    const m = await import("/static/stt1.js");
    const client = await m.Client.fromCredential(credential);
    try { return ["ok", await client.call("add", null, { a: 2, b: 3 })]; }
    catch (e) { return [e.constructor.name, e.status]; }
}"""


def test_a_real_call_verifies_and_a_tampered_answer_is_refused(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with secured_server(FIXTURES / "e2e", tmp_path) as server:
        page = browser.new_page()
        page.goto(f"{server.settings.audience}/healthz")
        credential = server.cred.read_text()
        assert page.evaluate(CALL, credential) == ["ok", 5]

        def flip_a_body_byte(route):  # type: ignore[no-untyped-def]
            response = route.fetch()
            body = bytearray(response.body())
            body[body.index(b"5")] = ord("6")  # {"results":6,...}: still valid JSON, no longer signed
            route.fulfill(response=response, body=bytes(body))

        page.route("**/rest/add/**", flip_a_body_byte)
        assert page.evaluate(CALL, credential) == ["ResponseForged", 200]
        page.unroute("**/rest/add/**")

        def drop_the_token(route):  # type: ignore[no-untyped-def]
            response = route.fetch()
            headers = {k: v for k, v in response.headers.items() if k.lower() != "stt1-response"}
            route.fulfill(response=response, headers=headers)

        page.route("**/rest/add/**", drop_the_token)
        assert page.evaluate(CALL, credential) == ["ResponseForged", 200]
        page.close()
