"""The browser client in real headless Chromium (Debian's, driven by Playwright; never a downloaded
browser), against a real gateway on a loopback port: WebCrypto needs a secure context, and
http://127.0.0.1 is one."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright

import gateway_app as gateway
import security
from conftest import FIXTURES, ROOT, Secured, free_port, secured_server

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VECTORS = ROOT / "tests" / "vectors"
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots, kept by CI as test artifacts (gitignored)


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



# A tab with a KeyStore and a Client on its hooks, answered by a stand-in gateway (its fetch) that
# knows the keys of every kid and offers window.rk, if set, with each answer: the tabs share one
# IndexedDB slot, and the rotations happen when the test says, with no clock involved.
TAB = """async ([cred, secrets]) => {
    const m = await import("/static/stt1.js");
    const store = await m.KeyStore.open("two-tabs");
    if (!(await store.load())) await store.save(await m.importCredential(cred));
    window.signedWith = [];
    window.rk = null;
    const fetch = async (url, init) => {
        const token = init.headers.Authorization.slice(5);
        const kid = m.parse(token).footer.kid;
        const K = m.b64decode(secrets[kid]);
        const c2s = await m.DirectionKey.derive(K, "c2s", cred.tid, kid);
        const s2c = await m.DirectionKey.derive(K, "s2c", cred.tid, kid);
        const target = url.slice(cred.url.length);
        const implicit = await m.requestAssertion(cred.url, init.method, target, init.headers["Content-Type"],
            init.body);
        const request = await m.openToken(c2s, token, implicit);
        window.signedWith.push(kid);
        const body = new TextEncoder().encode(JSON.stringify({ results: 2, valid: true }));
        const claims = window.rk ? { jti: m.newJti(), rk: window.rk } : { jti: m.newJti() };
        const signed = await m.mint(s2c, request.footer.iat, claims,
            await m.responseAssertion(cred.url, request.claims.jti, 200, "application/json", body));
        const headers = { "Content-Type": "application/json", "STT1-Response": signed };
        return new Response(body, { status: 200, headers });
    };
    window.store = store;
    window.client = new m.Client(await store.load(), { fetch, ...store.hooks() });
}"""
CALL = """async (rk) => {
    window.rk = rk;
    await window.client.call("add", null, { a: 1, b: 1 });
    return window.signedWith.at(-1);
}"""
IN_SLOT = """async () => { const k = await window.store.load(); return [k.kid, k.next?.kid ?? null]; }"""


def test_a_tab_never_stores_an_older_key_over_another_tabs_newer_one(browser, serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off", reload=False))
    kids = ["AAAAAAAAAAAAAAAAAAAAAA", "EBESExQVFhcYGRobHB0eHw", "ICEiIyQlJicoKSorLC0uLw"]
    secrets = {kid: security.b64encode(bytes([n]) * 32) for n, kid in enumerate(kids)}
    kid0, kid1, kid2 = kids
    rk1, rk2 = ({"kid": kid, "k": secrets[kid]} for kid in (kid1, kid2))
    cred = {"stt": 1, "url": "http://127.0.0.1:8000", "tid": "acme", "kid": kid0, "k": secrets[kid0]}
    a, b = browser.new_page(), browser.new_page()
    for page in (a, b):
        page.goto(f"{gw.url}/healthz")  # one origin: the two tabs share its IndexedDB
    a.evaluate(TAB, [cred, secrets])
    assert a.evaluate(CALL, rk1) == kid0  # A stores kid1 as next
    b.evaluate(TAB, [cred, secrets])  # B opens now: it reads {kid0, next kid1}
    assert a.evaluate(CALL, rk2) == kid1  # A promotes kid1, and is given kid2
    assert a.evaluate(CALL, None) == kid2  # A promotes kid2: kid1 is retiring
    assert a.evaluate(IN_SLOT) == [kid2, None]
    assert b.evaluate(CALL, None) == kid1  # B, idle till now, signs with kid1 (still in its grace)
    assert b.evaluate(IN_SLOT) == [kid2, None]  # its older view was not written over kid2 ...
    assert b.evaluate(CALL, None) == kid2  # ... and B took kid2 from the slot
    for page in (a, b):
        page.evaluate("() => window.store.close()")
    a.evaluate("""() => new Promise((done) => { indexedDB.deleteDatabase("two-tabs").onsuccess = done; })""")
    a.close()
    b.close()


# #### The console, behind a proxy that can tamper with answers in transit ####################


class TamperingProxy:
    """A reverse proxy in front of the gateway, as nginx would be, that can alter the answers of
    function calls on their way back: "flip" changes one digit of the body, "drop" removes the
    STT1-Response header. Everything else passes unchanged."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.mode = "pass"

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"connection", b"content-length")]
        async with httpx.AsyncClient() as upstream:
            answer = await upstream.request(scope["method"], self.upstream + target.decode(), headers=headers,
                                            content=body)
        out, content = list(answer.headers.raw), answer.content
        if scope["path"].startswith("/rest/") and scope["path"] != "/rest/":
            if self.mode == "flip":
                at = next(i for i, byte in enumerate(content) if chr(byte).isdigit())
                content = content[:at] + str((int(chr(content[at])) + 1) % 10).encode() + content[at + 1:]
            elif self.mode == "drop":
                out = [(k, v) for k, v in out if k.lower() != b"stt1-response"]
        out = [(k, v) for k, v in out if k.lower() not in (b"content-length", b"connection", b"date", b"server")]
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": [*out, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


@dataclasses.dataclass
class Console:
    url: str  # the proxy's origin: the console's, and the credential's audience
    gateway: Secured
    proxy: TamperingProxy


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    """The example modules (a copy a test may add to) behind STT1 and a tampering proxy; tenant
    acme's credential names the proxy."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    modules = shutil.copytree(ROOT / "modules", tmp_path / "modules", ignore=shutil.ignore_patterns("__pycache__"))
    with secured_server(modules, tmp_path, public_url=url) as secured:
        proxy = TamperingProxy(f"http://127.0.0.1:{secured.settings.port}")
        server = uvicorn.Server(uvicorn.Config(proxy, log_level="warning", lifespan="off"))
        sock = gateway._listen("127.0.0.1", port)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        try:
            yield Console(url, secured, proxy)
        finally:
            server.should_exit = True
            thread.join(10)


@contextlib.contextmanager
def console_page(browser: Browser, console: Console) -> Iterator[Page]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Chromium logs each 4xx answer as "Failed to load resource"; those are the calls under test.
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.goto(f"{console.url}/console")
    page.wait_for_selector("body[data-ready=yes]")
    try:
        yield page
    finally:
        page.close()
    assert errors == []  # no script error, and no CSP violation (Chromium logs those as errors)


def load_credential(page: Page, credential: Path) -> None:
    page.set_input_files("#credential-file", str(credential))
    page.wait_for_selector("form[data-function=add]")


def click_call(page: Page, function: str, **fields: str) -> dict[str, str]:
    """Fill a function's form, press Call, and read the outcome as the user sees it."""
    form = page.locator(f"form[data-function={function}]")
    for name, value in fields.items():
        form.locator(f"#f-{function}-{name}").fill(value)
    form.locator(".outcome").evaluate("box => { delete box.dataset.state; }")
    form.get_by_role("button", name="Call").click()
    form.locator(".outcome[data-state]:not([data-state=calling])").wait_for()
    read = form.locator(".outcome").evaluate(
        """box => ({state: box.dataset.state, verdict: box.querySelector(".verdict").textContent,
                   message: box.querySelector(".message")?.textContent ?? "",
                   result: box.querySelector(".result").textContent,
                   target: box.closest("form").querySelector(".target").textContent})"""
    )
    return dict(read)


def test_the_console_is_served_with_a_strict_policy(console: Console) -> None:
    answer = httpx.get(f"{console.url}/console")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "http" not in policy  # no inline script, no other origin, no CDN
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "<script type=\"module\" src=\"/static/console.js\">" in answer.text


def test_a_call_through_the_console_by_click(browser: Browser, console: Console) -> None:
    with console_page(browser, console) as page:
        assert page.get_by_test_id("who").text_content() == "No credential loaded"
        load_credential(page, console.gateway.cred)
        shown = page.locator("#catalog form").evaluate_all("forms => forms.map(f => f.dataset.function)")
        with httpx.Client() as plain:
            everything = set(plain.get(f"{console.url}/openapi.json").json()["paths"])
        # acme may call every function: those of the public spec, and reserve, which is acme's alone
        # and so only in acme's own (signed) catalog
        assert "/rest/reserve/" not in everything
        assert sorted(shown) == sorted([*(p.split("/")[2] for p in everything), "reserve"])
        assert page.get_by_test_id("tenant").text_content() == "acme"

        outcome = click_call(page, "add", a="2", b="3")
        assert outcome["state"] == "verified" and outcome["result"] == "5"
        assert outcome["verdict"] == "Verified: signed by the gateway for this call"
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("form[data-function=add]").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)

        power = click_call(page, "power", base="3")  # var1 goes in the URL
        assert (power["state"], power["result"], power["target"]) == ("verified", "9", "/rest/power/3")
        stats = click_call(page, "describe", values="[1, 2, 6]")  # a list: in the body, not the URL
        assert (stats["target"], json.loads(stats["result"])["median"]) == ("/rest/describe/", 2)
        empty = click_call(page, "describe", values="[]")  # its hint wants one value at least: a signed 422
        assert empty["state"] == "verified-error"
        assert empty["message"] == (
            "The arguments do not fit this function: Expected `array` of length >= 1 - at `$.values`."
        )
        words = click_call(page, "add", a="1", b="")  # b left out: the gateway's 422, signed, in plain words
        assert words["state"] == "verified-error"
        assert words["message"] == "The arguments do not fit this function: Object missing required field `b`."
        typo = click_call(page, "is_prime", n="seven")  # refused before anything is sent
        assert (typo["state"], typo["message"]) == ("unsent", 'n must be a whole number; "seven" is not.')

        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        box = page.locator("form[data-function=add]").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        page.screenshot(path=str(ARTIFACTS / "console-phone.png"), full_page=True)

        # No example function fails on purpose: save one (live reload serves it), and call it.
        (console.gateway.app.modules / "failing.py").write_text(  # type: ignore[operator]
            '__all_exposed__ = ["fail"]\n\n\ndef fail() -> int:\n    raise RuntimeError("on purpose")\n'
        )
        deadline = time.monotonic() + 10
        while "fail" not in console.gateway.app.catalog.functions:
            assert time.monotonic() < deadline, "the saved module was not served"
            time.sleep(0.05)
        page.reload()
        page.wait_for_selector("form[data-function=fail]")  # the stored key lists the catalog again
        failed = click_call(page, "fail")  # the function raises: a signed 500, no traceback
        assert failed["state"] == "verified-error" and failed["message"].startswith("The function failed on the server")


def test_the_console_refuses_answers_tampered_in_transit(browser: Browser, console: Console) -> None:
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        console.proxy.mode = "flip"  # {"results":5,...} becomes {"results":6,...}: valid JSON, not signed
        flipped = click_call(page, "add", a="2", b="3")
        assert (flipped["state"], flipped["result"]) == ("forged", "")  # the 6 is never shown
        assert flipped["verdict"] == "Forged: not signed by the gateway for this call"
        assert "thrown away unread" in flipped["message"]
        console.proxy.mode = "drop"
        assert click_call(page, "add", a="2", b="3")["state"] == "forged"
        console.proxy.mode = "pass"
        assert click_call(page, "add", a="2", b="3")["result"] == "5"


def test_the_call_forms_come_from_the_signed_catalog_not_from_openapi(browser: Browser, console: Console) -> None:
    """The forms were built from /openapi.json, which nothing signs: whoever could alter it in
    transit chose the fields, choices and hints the user filled in."""
    forged = {"paths": {"/rest/add/": {"post": {"requestBody": {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"account": {"enum": ["attacker"]}}, "required": ["account"]}}}}}}}}
    with console_page(browser, console) as page:
        page.route("**/openapi.json", lambda route: route.fulfill(json=forged))
        load_credential(page, console.gateway.cred)
        fields = page.locator("form[data-function=add] .fields label").evaluate_all(
            "labels => labels.map(l => l.htmlFor)"
        )
        assert fields == ["f-add-a", "f-add-b"]
        assert click_call(page, "add", a="2", b="3")["result"] == "5"


def test_integers_past_2_53_keep_every_digit_both_ways(browser: Browser, console: Console) -> None:
    """A nanosecond timestamp or a 64-bit id: as JS numbers they lost digits, sent and shown
    (under "Verified"), and 10**400 was shown as null."""
    (console.gateway.app.modules / "big.py").write_text(  # type: ignore[operator]
        '__all_exposed__ = ["twice", "huge"]\n\n\ndef twice(n: int) -> int:\n    return n * 2\n\n\n'
        "def huge() -> int:\n    return 10**400\n"
    )
    deadline = time.monotonic() + 10
    while "huge" not in console.gateway.app.catalog.functions:
        assert time.monotonic() < deadline, "the saved module was not served"
        time.sleep(0.05)
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        page.wait_for_selector("form[data-function=huge]")
        doubled = click_call(page, "twice", n="9007199254740993")
        assert doubled["state"] == "verified" and doubled["result"] == "18014398509481986", doubled
        assert doubled["target"].endswith("/rest/twice/9007199254740993")
        assert click_call(page, "twice", n="21")["result"] == "42"
        shown = click_call(page, "huge")
        assert shown["state"] == "verified" and shown["result"] == "1" + "0" * 400


def test_no_answer_at_all_is_shown_as_not_delivered(browser: Browser, console: Console) -> None:
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        page.route("**/rest/add/**", lambda route: route.abort())  # as if the gateway were down
        lost = click_call(page, "add", a="2", b="3")
        assert (lost["state"], lost["verdict"]) == ("undelivered", "Not delivered: no answer from the gateway")
        assert lost["message"].startswith("No answer from the gateway (") and "TypeError" not in lost["message"]
        page.unroute("**/rest/add/**")
        assert click_call(page, "add", a="2", b="3")["result"] == "5"


def test_a_timeout_is_not_said_to_have_stopped_the_function(browser: Browser, console: Console) -> None:
    """The 504 was shown as "ran longer than it is allowed to and was stopped": a sync function's
    thread cannot be stopped and runs on (README, error table)."""
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        late = click_call(page, "slow_report", seconds="3")  # its entry allows 1 s
        assert late["state"] == "verified-error"
        assert late["message"] == (
            "The function ran past its time limit. A sync function may still be running on the server."
        )


def test_a_rotated_key_is_adopted_and_survives_a_reload(browser: Browser, console: Console) -> None:
    keystore = console.gateway.keystore
    old = security.read_credential(console.gateway.cred)
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        keystore.clock = lambda: time.time() - security.ROTATION_SETTLE  # made long enough ago that rk is offered
        [(_, _, new)] = keystore.rotate("acme")
        keystore.clock = time.time
        assert click_call(page, "add", a="1", b="1")["result"] == "2"  # the answer carries rk: stored first
        assert page.get_by_test_id("kid").text_content() == f"{old.kid} (rotating to {new})"
        assert "rotated this tenant's key" in page.get_by_test_id("notice").text_content()
        assert click_call(page, "add", a="1", b="2")["result"] == "3"  # signed with the new kid: promoted
        assert page.get_by_test_id("kid").text_content() == new

        page.reload()
        page.wait_for_selector("body[data-ready=yes]")
        page.wait_for_selector("form[data-function=add]")  # no file chosen: the stored key is in use
        assert page.get_by_test_id("kid").text_content() == new
        assert click_call(page, "add", a="2", b="2")["result"] == "4"
    states = {row["kid"]: row["state"] for row in keystore.rows()}
    assert states == {old.kid: "retiring", new: "active"}


STORED = """async (secret) => {
    const found = {records: 0, keys: 0, readable: [], copies: []};
    const walk = async (value, where) => {
        if (value instanceof CryptoKey) {
            found.keys++;
            if (value.extractable) found.readable.push(where);
            try { await crypto.subtle.exportKey("raw", value); found.readable.push(where); } catch {}
        } else if (typeof value === "string") {
            if (value.includes(secret)) found.copies.push(where);
        } else if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
            found.copies.push(where + " (bytes)");  // no raw bytes of any kind are stored
        } else if (value && typeof value === "object") {
            for (const [k, v] of Object.entries(value)) await walk(v, where + "." + k);
        }
    };
    for (const info of await indexedDB.databases()) {
        const done = (r) => new Promise((ok, no) => { r.onsuccess = () => ok(r.result); r.onerror = no; });
        const db = await done(indexedDB.open(info.name));
        for (const name of db.objectStoreNames) {
            const all = await done(db.transaction(name).objectStore(name).getAll());
            for (const record of all) { found.records++; await walk(record, info.name + "/" + name); }
        }
        db.close();
    }
    found.webStorage = localStorage.length + sessionStorage.length;
    return found;
}"""


def test_the_raw_secret_cannot_be_read_back_from_indexeddb(browser: Browser, console: Console) -> None:
    secret = security.read_credential(console.gateway.cred).k
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        console.gateway.keystore.clock = lambda: time.time() - security.ROTATION_SETTLE  # rk offered at once
        console.gateway.keystore.rotate("acme")
        console.gateway.keystore.clock = time.time
        click_call(page, "add", a="1", b="1")  # the stored record now holds the current and the next key
        found = page.evaluate(STORED, secret)
    assert (found["records"], found["keys"]) == (1, 2)
    assert found["readable"] == [] and found["copies"] == [] and found["webStorage"] == 0


def test_the_console_explains_a_bad_file_and_a_credential_for_another_gateway(browser: Browser,
                                                                               console: Console) -> None:
    with console_page(browser, console) as page:
        page.set_input_files("#credential-file", files=[{"name": "notes.json", "mimeType": "application/json",
                                                         "buffer": b'{"hello": "world"}'}])
        notice = page.get_by_test_id("notice")
        notice.wait_for()
        assert notice.text_content() == "notes.json is not a gateway credential (unknown field hello)."
        other = json.loads(console.gateway.cred.read_text()) | {"url": "https://api.example.com"}
        page.set_input_files("#credential-file", files=[{"name": "other.json", "mimeType": "application/json",
                                                         "buffer": json.dumps(other).encode()}])
        page.locator("#notice", has_text="api.example.com").wait_for()  # no wait_for_function: CSP forbids eval
        assert notice.text_content() == (f"This credential is for https://api.example.com, but this console belongs "
                                         f"to {console.url}. Open https://api.example.com/console to use it.")
        assert page.get_by_test_id("load").is_visible()  # nothing loaded, nothing stored


def serve_module(console: Console, filename: str, source: str, function: str) -> None:
    """Save a module in the served folder and wait until live reload serves `function`."""
    (console.gateway.app.modules / filename).write_text(source)  # type: ignore[operator]
    deadline = time.monotonic() + 10
    while function not in console.gateway.app.catalog.functions:
        assert time.monotonic() < deadline, "the saved module was not served"
        time.sleep(0.05)


def outcome_now(page: Page, function: str) -> dict[str, str]:
    """The outcome region of a form as it is at this moment (a call may be running)."""
    return dict(page.locator(f"form[data-function={function}]").evaluate(
        """form => ({state: form.querySelector(".outcome").dataset.state ?? "",
                    verdict: form.querySelector(".verdict").textContent,
                    result: form.querySelector(".result").textContent,
                    busy: form.getAttribute("aria-busy") ?? "",
                    focused: document.activeElement === form.querySelector("button[type=submit]")})"""
    ))


def test_a_running_call_shows_calling_not_the_last_result(browser: Browser, console: Console) -> None:
    """The last result stayed beside the new inputs for the whole call; only the button was dimmed."""
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        assert click_call(page, "slow_report", seconds="0.05")["result"] == '"report built in 0.05 s"'
        form = page.locator("form[data-function=slow_report]")
        form.locator("#f-slow_report-seconds").fill("0.8")
        form.get_by_role("button", name="Call").click()
        running = outcome_now(page, "slow_report")
        assert (running["state"], running["verdict"], running["result"]) == ("calling", "Calling…", "")
        form.locator(".outcome[data-state=verified]").wait_for()
        assert outcome_now(page, "slow_report")["result"] == '"report built in 0.8 s"'


def test_an_authenticator_code_is_asked_for_used_once_and_its_refusal_named(browser: Browser,
                                                                             console: Console) -> None:
    """A refused code (a signed 401) was worded as a token problem, an empty code was sent, and
    a used code stayed in its field."""
    import pyotp

    serve_module(console, "vault.py", '__all_exposed__ = [{"name": "vault", "otp": True}]\n\n\n'
                 'def vault() -> str:\n    return "open"\n', "vault")
    totp = pyotp.TOTP(console.gateway.keystore.otp_enroll("acme"))
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        code = page.locator("#f-vault-otp")
        empty = click_call(page, "vault")
        assert (empty["state"], empty["message"]) == (
            "unsent", "Enter the 6-digit code your authenticator app shows: this function asks for one.")
        now = time.time()
        valid = {totp.at(now + step) for step in (-60, -30, 0, 30, 60)}
        wrong = next(c for c in ("000000", "111111", "222222") if c not in valid)
        refused = click_call(page, "vault", otp=wrong)
        assert (refused["state"], refused["message"]) == ("verified-error", (
            "The gateway refused the authenticator code: it is wrong, expired or already used. "
            "Wait for the next code and call again."))
        assert code.input_value() == ""  # a code works once: not left for the next call
        good = totp.now()
        assert click_call(page, "vault", otp=good)["result"] == '"open"'
        assert code.input_value() == ""
        again = click_call(page, "vault", otp=good)
        assert again["state"] == "verified-error" and "already used" in again["message"]
        for _ in range(4):  # the fifth wrong or reused code in a row locks them
            click_call(page, "vault", otp=wrong)
        locked = click_call(page, "vault", otp=wrong)  # it said "Too many calls in a short time"
        assert (locked["state"], locked["message"]) == ("verified-error", (
            "Authenticator codes are locked after too many wrong ones "
            "(too many wrong authenticator codes; retry in 60 s)."))


def test_reload_catalog_clears_the_notice_of_its_last_failure(browser: Browser, console: Console) -> None:
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        notice = page.get_by_test_id("notice")
        page.route("**/rest/", lambda route: route.abort())
        page.get_by_test_id("refresh").click()
        page.locator("#notice.bad", has_text="No answer from the gateway").wait_for()
        page.unroute("**/rest/")
        page.get_by_test_id("refresh").click()
        notice.wait_for(state="hidden", timeout=5000)
        assert page.locator("form[data-function=add]").count() == 1


UNSIGNED_401 = "The gateway refused the request with an unsigned answer: try again. If it keeps failing, the key may " \
    "have been revoked, or this device's clock may be off."


def test_an_unsigned_401_means_retry_and_keeps_the_catalog(browser: Browser, console: Console) -> None:
    """An unsigned 401 (the gateway's first second, or anyone on the path) said "ask the operator
    for a new credential file" and emptied the catalog."""
    refuse = lambda route: route.fulfill(status=401, headers={"WWW-Authenticate": "STT1"}, body="")  # noqa: E731
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        page.route("**/rest/", refuse)
        page.get_by_test_id("refresh").click()
        page.locator("#notice.bad", has_text="unsigned").wait_for(timeout=5000)
        assert page.get_by_test_id("notice").text_content() == UNSIGNED_401
        assert page.locator("form[data-function=add]").count() == 1  # the verified catalog stays
        page.route("**/rest/add/**", refuse)
        refused = click_call(page, "add", a="1", b="2")
        assert (refused["state"], refused["message"]) == ("unverified", UNSIGNED_401)


def test_forgetting_the_key_in_one_tab_drops_it_in_the_others(browser: Browser, console: Console) -> None:
    with console_page(browser, console) as first, console_page(browser, console) as second:
        load_credential(first, console.gateway.cred)
        second.reload()  # the same browser profile: it opens with the stored key
        second.wait_for_selector("form[data-function=add]")
        first.get_by_test_id("forget").click()
        second.get_by_test_id("load").wait_for(state="visible", timeout=5000)
        assert second.locator("#catalog form").count() == 0
        assert second.get_by_test_id("who").text_content() == "No credential loaded"
        assert "forgotten in another tab" in (second.get_by_test_id("notice").text_content() or "")


def test_a_credential_url_that_is_not_a_bare_origin_is_called_malformed(browser: Browser,
                                                                        console: Console) -> None:
    """A trailing slash or "HTTP://" gave a looping instruction: "Open http://127.0.0.1:18400//console"."""
    original = json.loads(console.gateway.cred.read_text())
    with console_page(browser, console) as page:
        notice = page.get_by_test_id("notice")
        for url in (f"{console.url}/", console.url.replace("http://", "HTTP://"), f"{console.url}/console"):
            page.set_input_files("#credential-file", files=[{
                "name": "acme.json", "mimeType": "application/json",
                "buffer": json.dumps(original | {"url": url}).encode()}])
            page.locator("#notice", has_text=f"({url})").wait_for(timeout=5000)
            assert notice.text_content() == (
                f"This credential's url ({url}) is malformed: it must be an origin like {console.url}, with no "
                "path, not even a trailing slash. Ask the operator for a new credential file.")
            assert page.get_by_test_id("load").is_visible()


def test_the_call_forms_are_accessible(browser: Browser, console: Console) -> None:
    """Focus fell to <body> on Call (the button was disabled), every button was named just "Call",
    the forms had no name, and the live region was unhidden only as it was filled."""
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        form = page.get_by_role("form", name="slow_report")
        assert form.get_attribute("data-function") == "slow_report"
        button = page.get_by_role("button", name="Call slow_report", exact=True)
        assert button.count() == 1
        region = form.locator(".outcome[aria-live=polite]")
        assert region.evaluate("box => !box.hidden && box.getClientRects().length > 0")  # there, and empty
        assert (region.text_content() or "").strip() == ""
        form.locator("#f-slow_report-seconds").fill("0.8")
        button.click()
        running = outcome_now(page, "slow_report")
        assert running["busy"] == "true" and running["focused"], running
        form.locator(".outcome[data-state=verified]").wait_for()
        done = outcome_now(page, "slow_report")
        assert done["busy"] == "" and done["focused"], done


def test_a_refused_credential_is_not_kept(browser: Browser, console: Console) -> None:
    """A well-formed credential with the wrong key was stored at once, and came back after a reload."""
    wrong = json.loads(console.gateway.cred.read_text()) | {"k": security.b64encode(bytes(range(32)))}
    with console_page(browser, console) as page:
        page.set_input_files("#credential-file", files=[{"name": "acme.json", "mimeType": "application/json",
                                                         "buffer": json.dumps(wrong).encode()}])
        page.locator("#notice.bad").wait_for(timeout=5000)  # the gateway refused it
        page.reload()
        page.wait_for_selector("body[data-ready=yes]")
        assert page.get_by_test_id("load").is_visible() and not page.get_by_test_id("loaded").is_visible()
        load_credential(page, console.gateway.cred)  # the right one is kept
        page.reload()
        page.wait_for_selector("form[data-function=add]")


def test_numbers_are_read_as_written_and_a_verified_refusal_is_not_a_success(browser: Browser,
                                                                           console: Console) -> None:
    """ "0x10" was sent as 16 and "1e3" as 1000; a signed 422 was headed "Verified", in green."""
    with console_page(browser, console) as page:
        load_credential(page, console.gateway.cred)
        hex_base = click_call(page, "power", base="0x10")
        assert (hex_base["state"], hex_base["message"]) == ("unsent", 'base must be a number; "0x10" is not.')
        exp = click_call(page, "is_prime", n="1e3")
        assert (exp["state"], exp["message"]) == ("unsent", 'n must be a whole number; "1e3" is not.')
        assert click_call(page, "power", base="-1.5e1", exponent="+2")["result"] == "225"
        assert click_call(page, "is_prime", n="0007")["result"] == "true"
        refused = click_call(page, "describe", values="[]")
        assert refused["state"] == "verified-error"
        assert refused["verdict"] == "Refused: a verified answer, signed by the gateway for this call"
        tone = page.locator("form[data-function=describe] .verdict").get_attribute("class")
        assert tone is not None and "ok" not in tone.split()
