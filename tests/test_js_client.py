"""The browser client (static/stt1.js) in Node 20's WebCrypto, which is the browser's API.

Its conformance checks (static/vector_tests.js) run on the committed PASETO and STT1 vectors,
and the module itself calls a real gateway. Headless Chromium runs the same module in issue 6.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gateway_app as gateway
from conftest import FIXTURES, ROOT, secured_server


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
