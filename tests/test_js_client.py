"""The browser client (static/stt1.js) in Node 20's WebCrypto, which is the browser's API.

Its conformance checks (static/vector_tests.js) run on the committed PASETO and STT1 vectors,
and the module itself calls a real gateway. Headless Chromium runs the same module in issue 6.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import client
import gateway_app as gateway
import security
from conftest import FIXTURES, ROOT, secured_server


def run_node(tmp_path: Path, source: str, *, node_flags: tuple[str, ...] = (), **values: object) -> Any:
    """Run ``source`` in node, with ``%(module)s`` the URL of stt1.js and each of ``values`` as
    JSON in its own placeholder; return the JSON the script prints."""
    script = tmp_path / "script.mjs"
    fields = {"module": (ROOT / "static" / "stt1.js").as_uri(), **{k: json.dumps(v) for k, v in values.items()}}
    script.write_text(source % fields)
    done = subprocess.run(["node", *node_flags, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_vectors_pass_in_the_javascript_client() -> None:
    done = subprocess.run(["node", str(ROOT / "static" / "test_vectors.mjs")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.endswith(" passed, 0 failed") and int(last.split()[0]) >= 60


CALLS = """
import { readFile } from "node:fs/promises";
import * as stt1 from "%(module)s";
const client = await stt1.Client.fromCredential(await readFile(%(cred)s, "utf8"));
const out = { add: await client.call("add", null, { a: 2, b: 3 }), echo: await client.call("echo", "a/b c") };
try { await client.call("nope"); } catch (e) { out.missing = e.constructor.name + " " + e.status; }
try { await client.call("add", null, { a: 1 }); } catch (e) { out.invalid = e.constructor.name + " " + e.message; }
out.catalog = Object.keys(await client.catalog()).includes("add");
console.log(JSON.stringify(out));
"""


def test_the_javascript_client_calls_a_real_gateway(tmp_path: Path) -> None:
    with secured_server(FIXTURES / "e2e", tmp_path) as server:
        assert gateway.STATIC.joinpath("stt1.js").exists()
        script = tmp_path / "calls.mjs"
        module = (ROOT / "static" / "stt1.js").as_uri()
        script.write_text(CALLS % {"module": module, "cred": json.dumps(str(server.cred))})
        done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "add": 5, "echo": "a/b c", "missing": "NotFound 404",
        "invalid": "InvalidArguments Object missing required field `b`", "catalog": True,
    }


def test_the_gateway_serves_the_browser_module(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off", reload=False))
    response = gw.client.get("/static/stt1.js")
    assert response.status_code == 200 and "javascript" in response.headers["content-type"]
    assert "export class Client" in response.text
    assert gw.client.get("/static/../gateway.py").status_code == 404


def test_the_console_page_has_its_policy_wherever_it_is_served(serve) -> None:  # type: ignore[no-untyped-def]
    """/static/console.html is the console too: it was served with no Content-Security-Policy,
    so it could be framed by any site while holding the key stored for this origin."""
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off", reload=False))
    for path in ("/console", "/static/console.html", "/static/stt1.js", "/static/console.js"):
        answer = gw.client.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["content-security-policy"] == gateway.CONSOLE_HEADERS["Content-Security-Policy"], path
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff", path


# The credential of the tests below: they run no gateway, so the keys are fixed.
CRED = {"stt": 1, "url": "http://127.0.0.1:8000", "tid": "acme", "kid": "EBESExQVFhcYGRobHB0eHw",
        "k": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"}

# A stand-in gateway as the client's fetch, with a fake clock: it opens each request as the
# gateway does, records how far the request's iat is from its own clock (local + 20 s), signs
# its answer at once and lets `delay` seconds pass before the client gets it.
OFFSET = """
import * as stt1 from "%(module)s";
const cred = %(cred)s;
const K = stt1.b64decode(cred.k);
const c2s = await stt1.DirectionKey.derive(K, "c2s", cred.tid, cred.kid);
const s2c = await stt1.DirectionKey.derive(K, "s2c", cred.tid, cred.kid);
const NOW = 1760000000, SERVER_AHEAD = 20;
let now = NOW, delay = 0;
const skews = [], results = [];
async function fetch(url, init) {
  const target = url.slice(cred.url.length);
  const implicit = await stt1.requestAssertion(cred.url, init.method, target, init.headers["Content-Type"], init.body);
  const request = await stt1.openToken(c2s, init.headers.Authorization.slice(5), implicit);
  skews.push(request.footer.iat - (now + SERVER_AHEAD));
  const body = new TextEncoder().encode(JSON.stringify({ results: skews.length, valid: true }));
  const signed = await stt1.mint(s2c, Math.floor(now + SERVER_AHEAD), { jti: stt1.newJti() },
    await stt1.responseAssertion(cred.url, request.claims.jti, 200, "application/json", body));
  now += delay;
  return new Response(body, { status: 200, headers: { "Content-Type": "application/json", "STT1-Response": signed } });
}
const client = new stt1.Client(await stt1.importCredential(cred), { fetch, clock: () => now });
for (delay of %(delays)s) results.push(await client.call("add", null, { a: 1 }));
console.log(JSON.stringify({ skews, results }));
"""


def test_a_slow_answer_teaches_the_javascript_client_no_offset(tmp_path: Path) -> None:
    out = run_node(tmp_path, OFFSET, cred=CRED, delays=[0.5, 54, 0.5, 10, 0.5])
    assert out["results"] == [1, 2, 3, 4, 5]  # every answer verified and used, the slow one too
    # 1: no offset yet. 2: learned from a 0.5 s round trip. 3: after the answer that took 54 s
    # the offset stands (it was -54.5 before: refused by the gateway, and every call after it).
    # 4: learned again. 5: a 10 s round trip is still learned from, off by at most those 10 s.
    assert out["skews"] == [-20, -0.5, -0.5, -1, -10]


# A gateway that never answers, and timers that record their delay but fire at once.
SILENT = """
import * as stt1 from "%(module)s";
const delays = [];
const realSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = (fn, ms) => { delays.push(ms); return realSetTimeout(fn, 0); };
const fetch = (url, init) => new Promise((_, reject) => {
  const abort = () => reject(new DOMException("aborted", "AbortError"));
  if (init.signal.aborted) abort(); else init.signal.addEventListener("abort", abort);
});
const keys = await stt1.importCredential(%(cred)s);
const errors = [];
for (const options of [{ fetch }, { fetch, timeout: 90 }]) {
  try {
    await new stt1.Client(keys, options).call("nap", null, { seconds: 12 });
  } catch (e) {
    errors.push(e.constructor.name + " " + e.message);
  }
}
console.log(JSON.stringify({ delays, errors, defaultTimeout: stt1.DEFAULT_TIMEOUT }));
"""


def test_the_javascript_client_outwaits_the_gateway_and_warns_the_call_may_have_run(tmp_path: Path) -> None:
    out = run_node(tmp_path, SILENT, cred=CRED)
    assert out["delays"] == [40_000, 90_000]
    assert out["defaultTimeout"] == 40 > gateway.Settings.timeout  # the console's Client takes this default
    warning = "the call may still have run on the gateway, so check before retrying"
    assert out["errors"] == [
        f"Unreachable {CRED['url']}: no answer within 40 s; {warning}",
        f"Unreachable {CRED['url']}: no answer within 90 s; {warning}",
    ]


URLS = """
import * as stt1 from "%(module)s";
const out = [];
for (const url of %(urls)s) {
  try {
    new stt1.Client(await stt1.importCredential({ ...%(cred)s, url }), { fetch: () => null });
    out.push(true);
  } catch (e) {
    if (!(e instanceof TypeError)) throw e;
    out.push(false);
  }
}
console.log(JSON.stringify(out));
"""


def test_both_clients_accept_the_same_credential_urls(tmp_path: Path) -> None:
    urls = ["http://127.0.0.1:8000", "https://api.example.com", "http://[::1]:8000", "http://x:99999",
            "HTTP://127.0.0.1:8000", "http://127.0.0.1:8000?", "http://127.0.0.1:8000#", "http://127.0.0.1:8\t000",
            "http://127.0.0.1:8000\n", " http://x", "http://x\\y", "http://x\ufeff", "http://u@x", "http://x/"]
    in_js = run_node(tmp_path, URLS, cred=CRED, urls=urls)
    in_python = []
    for url in urls:
        path = tmp_path / "c.cred"
        security.write_credential(path, security.Credential(**{**CRED, "url": url}))
        try:
            client.Client(path)
            in_python.append(True)
        except ValueError:
            in_python.append(False)
    assert in_js[:3] == [True] * 3 and not any(in_js[3:])
    assert in_python == in_js


# Another tab (or process) promoted further while this client was idle: its onPromote hook finds
# newer keys in storage and returns them instead of writing over them (as KeyStore.swap does).
ADOPT = """
import * as stt1 from "%(module)s";
const cred = %(cred)s, secrets = %(secrets)s;
const signedWith = [], replaced = [];
async function fetch(url, init) {
  const token = init.headers.Authorization.slice(5);
  const kid = stt1.parse(token).footer.kid;
  const K = stt1.b64decode(secrets[kid]);
  const c2s = await stt1.DirectionKey.derive(K, "c2s", cred.tid, kid);
  const s2c = await stt1.DirectionKey.derive(K, "s2c", cred.tid, kid);
  const target = url.slice(cred.url.length);
  const implicit = await stt1.requestAssertion(cred.url, init.method, target, init.headers["Content-Type"], init.body);
  const request = await stt1.openToken(c2s, token, implicit);
  signedWith.push(kid);
  const body = new TextEncoder().encode(JSON.stringify({ results: 2, valid: true }));
  const signed = await stt1.mint(s2c, request.footer.iat, { jti: stt1.newJti() },
    await stt1.responseAssertion(cred.url, request.claims.jti, 200, "application/json", body));
  return new Response(body, { status: 200, headers: { "Content-Type": "application/json", "STT1-Response": signed } });
}
const { next, ...base } = cred;
const newer = await stt1.importCredential({ ...base, kid: %(kid2)s, k: secrets[%(kid2)s] });
const onPromote = async (updated, before) => {
  replaced.push([before.kid, before.next.kid, updated.kid]);
  return newer;
};
const client = new stt1.Client(await stt1.importCredential(cred), { fetch, onPromote });
await client.call("add", null, { a: 1, b: 1 });
await client.call("add", null, { a: 1, b: 1 });
console.log(JSON.stringify({ signedWith, replaced, kid: client.kid }));
"""


STALE = """
import * as stt1 from "%(module)s";
const cred = %(cred)s, newerCred = %(newer)s;
const signedWith = [];
async function fetch(url, init) {  // the gateway once the grace period is over: kid0 is retired
  signedWith.push(stt1.parse(init.headers.Authorization.slice(5)).footer.kid);
  return new Response("{}", { status: 401, headers: { "Content-Type": "application/json" } });
}
const newer = await stt1.importCredential(newerCred);
const client = new stt1.Client(await stt1.importCredential(cred), { fetch, onStale: async () => newer });
const errors = [];
for (let i = 0; i < 2; i++) {
  try { await client.call("add", null, { a: 1, b: 1 }); } catch (err) { errors.push(err.constructor.name); }
}
console.log(JSON.stringify({ signedWith, errors, kid: client.kid }));
"""


def test_the_javascript_client_left_behind_takes_the_stored_key_after_an_unsigned_401(tmp_path: Path) -> None:
    newer = {**CRED, "kid": "MDEyMzQ1Njc4OTo7PD0-Pw", "k": security.b64encode(bytes([7]) * 32)}
    out = run_node(tmp_path, STALE, cred=CRED, newer=newer)
    assert out["errors"] == ["Unauthorized", "Unauthorized"]  # never retried by the client itself
    assert out["signedWith"] == [CRED["kid"], newer["kid"]] and out["kid"] == newer["kid"]


def test_the_javascript_client_adopts_newer_keys_its_hook_found_stored(tmp_path: Path) -> None:
    kid0, kid1, kid2 = CRED["kid"], "ICEiIyQlJicoKSorLC0uLw", "MDEyMzQ1Njc4OTo7PD0-Pw"
    secrets = {kid0: CRED["k"], kid1: security.b64encode(bytes(32)), kid2: security.b64encode(bytes([7]) * 32)}
    cred = {**CRED, "next": {"kid": kid1, "k": secrets[kid1]}}
    out = run_node(tmp_path, ADOPT, cred=cred, secrets=secrets, kid2=kid2)
    assert out["replaced"] == [[kid0, kid1, kid1]]  # the hook is told what it replaces
    assert out["signedWith"] == [kid1, kid2] and out["kid"] == kid2  # then the stored keys sign


# The gateway's unsigned refusals: before the token is read (401, 413, 429, 503), and the HTTP
# layer's own (400, 408, 431). Each body plants a result that must never be used.
UNSIGNED = """
import * as stt1 from "%(module)s";
const client = new stt1.Client(await stt1.importCredential(%(cred)s), {
  fetch: async (url, init) => new Response(
    JSON.stringify({ valid: true, results: "planted", error: { code: "planted", message: "planted" } }),
    { status: Number(url.split("/").pop()), headers: { "Content-Type": "application/json" } },  // echo's var1
  ),
});
const out = {};
for (const status of %(statuses)s) {
  try {
    await client.call("echo", String(status));
    out[status] = "no error";
  } catch (e) {
    out[status] = [e.constructor.name, e.code, e.message.includes("planted")];
  }
}
console.log(JSON.stringify(out));
"""


def test_unsigned_refusals_are_hints_to_the_javascript_client_not_forgeries(tmp_path: Path) -> None:
    out = run_node(tmp_path, UNSIGNED, cred=CRED, statuses=[400, 401, 408, 413, 429, 431, 503, 502, 504, 500])
    assert out == {
        "400": ["BadRequest", "bad_request", False],
        "401": ["Unauthorized", "unauthorized", False],
        "408": ["GatewayError", "timeout", False],
        "413": ["TooLarge", "too_large", False],
        "429": ["RateLimited", "rate_limited", False],
        "431": ["TooLarge", "too_large", False],  # a URL over 64 KiB: it was reported as a forgery
        "503": ["Overloaded", "unavailable", False],  # the key store is down: it was reported as a forgery
        "502": ["Unreachable", "unreachable", False],  # a proxy's, the gateway down: it was called a forgery
        "504": ["Unreachable", "unreachable", False],  # a proxy's timeout: the gateway's own 504 is signed
        "500": ["ResponseForged", "response_forged", False],  # a 500 is always signed by the gateway
    }


# A fake gateway that signs nothing and whose bodies never end, and a signed answer that is too
# large: what the client reads of each, and timeouts setTimeout cannot honour.
BODIES = """
import * as stt1 from "%(module)s";
const keys = await stt1.importCredential(%(cred)s);
const out = { pulled: 0 };
const endless = () => new ReadableStream({
  pull(controller) { out.pulled += 1; controller.enqueue(new Uint8Array(1 << 20)); },
});
const unsigned = new stt1.Client(keys, {
  fetch: async () => new Response(endless(), { status: 401, headers: { "Content-Type": "application/json" } }),
});
try { await unsigned.call("add", null, {}); } catch (e) { out.unsigned = [e.constructor.name, e.verified]; }
const big = new stt1.Client(keys, {
  maxAnswer: 3 << 20,
  fetch: async () => new Response(endless(), { status: 200, headers: { "STT1-Response": "v3.local.x.y" } }),
});
try { await big.call("add", null, {}); } catch (e) { out.big = [e.constructor.name, e.message]; }
out.timeouts = [];
for (const timeout of [2147483, 2147484, Infinity, 0]) {
  try { new stt1.Client(keys, { timeout }); out.timeouts.push(true); } catch (e) { out.timeouts.push(false); }
}
console.log(JSON.stringify(out));
"""


def test_the_javascript_client_reads_no_unsigned_body_and_at_most_max_answer(tmp_path: Path) -> None:
    """Both bodies were read whole (an endless one: until memory ran out); a timeout past
    setTimeout's 24.8 days fired at once, so every call was "unreachable, may have run"."""
    out = run_node(tmp_path, BODIES, cred=CRED)
    assert out["unsigned"] == ["Unauthorized", False]
    assert out["big"] == ["BadResponse", "an answer over 3145728 bytes, not read (see the client's maxAnswer)"]
    assert 3 <= out["pulled"] <= 8  # the 3 MiB allowed and a little read-ahead, nothing of the unsigned one
    assert out["timeouts"] == [True, False, False, False]


# A BigInt argument, with and without JSON.rawJSON (Node 20 has it only behind a V8 flag; the
# script removes it to stand for every runtime without it, whatever node runs the tests).
BIGINT = """
import * as stt1 from "%(module)s";
if (%(without)s) delete JSON.rawJSON;
const out = { rawJSON: typeof JSON.rawJSON === "function", sent: [] };
const client = new stt1.Client(await stt1.importCredential(%(cred)s), {
  fetch: async (url, init) => {
    out.sent.push(new TextDecoder().decode(init.body));
    return new Response(null, { status: 401 });
  },
});
try {
  await client.call("echo", null, { x: 12345678901234567890n });
} catch (e) {
  out.error = [e.constructor.name, e.message];
}
console.log(JSON.stringify(out));
"""


def test_a_bigint_argument_is_sent_exactly_or_refused_before_sending(tmp_path: Path) -> None:
    """Without JSON.rawJSON the call failed inside JSON.stringify with its own words, "Do not know
    how to serialize a BigInt", which says nothing of why or where it works."""
    without = run_node(tmp_path, BIGINT, cred=CRED, without=True)
    assert (without["rawJSON"], without["sent"]) == (False, [])  # refused before anything was sent
    assert without["error"] == ["TypeError", (
        "cannot send a BigInt argument exactly: this runtime has no JSON.rawJSON (Chrome 114, Firefox 135,"
        " Safari 18.4, Node 21 have it), and a Number would round it"
    )]
    native = subprocess.run(["node", "-p", "typeof JSON.rawJSON"], capture_output=True, text=True, timeout=60)
    flags = () if native.stdout.strip() == "function" else ("--harmony-json-parse-with-source",)  # Node 20
    with_raw = run_node(tmp_path, BIGINT, node_flags=flags, cred=CRED, without=False)
    assert with_raw["rawJSON"] is True
    assert with_raw["sent"] == ['{"x":12345678901234567890}']  # every digit, as a JSON number
    assert with_raw["error"][0] == "Unauthorized"  # the stand-in's unsigned 401, nothing else
