"""The committed STT1 vectors (tests/vectors/stt1.json) pass in the server and the client alike.

test_envelope.py checks the primitives byte for byte; here each c2s vector token is sent to a
real server whose clock and audience match the vector, and each s2c vector token is checked
by client.py's response verification. The browser client runs the same file (issue 6).
"""
from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

import client as stt1_client
import gateway_app as gateway
import security as s
from conftest import FIXTURES

VECTORS = json.loads((Path(__file__).parent / "vectors" / "stt1.json").read_text())["vectors"]
C2S = [v for v in VECTORS if v["dir"] == "c2s"]
S2C = [v for v in VECTORS if v["dir"] == "s2c"]


def enrol(keystore: s.Keystore, vector: dict) -> None:
    """Put the vector's fixed (tid, kid, K) in a real keystore, as one transaction would."""
    tid, kid = vector["tid"], vector["kid"]
    with keystore._transaction() as db:
        if not db.execute("SELECT 1 FROM tenants WHERE tid = ?", (tid,)).fetchone():
            db.execute("INSERT INTO tenants (tid, created) VALUES (?, 0)", (tid,))
        db.execute("INSERT INTO credentials (kid, tid, secret, state, created) VALUES (?, ?, ?, 'active', 0)",
                   (kid, tid, keystore._seal("key", f"{tid}\x00{kid}", bytes.fromhex(vector["K"]))))


@pytest.mark.parametrize("vector", C2S, ids=[v["name"] for v in C2S])
def test_the_server_accepts_each_c2s_vector(vector: dict, tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    iat = int(vector["iat"])
    keystore = s.Keystore(tmp_path / "gw.db", clock=lambda: iat)
    enrol(keystore, vector)
    assertion = vector["assertion"]
    security = s.Security(keystore, s.MemoryReplayStore(clock=lambda: iat), assertion["aud"], clock=lambda: iat,
                          boot_time=iat - 60)
    running = serve(gateway.create_app(FIXTURES / "e2e", security=security))
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
    conn.putrequest(assertion["method"], assertion["target"]["text"], skip_accept_encoding=True)
    conn.putheader("Authorization", f"STT1 {vector['token']}")
    if assertion["content_type"]["text"]:
        conn.putheader("Content-Type", assertion["content_type"]["text"])
    body = bytes.fromhex(assertion["body"]["hex"])
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    response.read()
    # The fixture module has none of these functions: a signed 404 or 405 (or a signed 401 for the
    # second factor) means the token itself was accepted; a refused token is an unsigned 401.
    assert response.getheader("STT1-Response") is not None, response.status
    assert response.status in (401, 404, 405)  # GET on a function is a 405


@pytest.mark.parametrize("vector", S2C, ids=[v["name"] for v in S2C])
def test_the_client_verifies_each_s2c_vector(vector: dict, tmp_path: Path) -> None:
    assertion = vector["assertion"]
    cred_path = tmp_path / "cred.json"
    s.write_credential(cred_path, s.Credential(stt=1, url=assertion["aud"], tid=vector["tid"], kid=vector["kid"],
                                               k=s.b64encode(bytes.fromhex(vector["K"]))))
    api = stt1_client.Client(cred_path, clock=lambda: int(vector["iat"]))
    prepared = stt1_client._Prepared(
        "POST", "/rest/x/", b"", {}, assertion["request_jti"], vector["kid"], "test", signed_at=int(vector["iat"])
    )
    headers = [("STT1-Response", vector["token"]), ("Content-Type", assertion["content_type"]["text"])]
    body = bytes.fromhex(assertion["body"]["hex"])
    status = assertion["status"]
    if status == 200:
        assert api._verify(prepared, status, headers, body) == json.loads(body)["results"]
    else:
        with pytest.raises(stt1_client.NotFound):  # a verified error, not ResponseForged
            api._verify(prepared, status, headers, body)
    claims = json.loads(vector["payload"])
    if "rk" in claims:
        assert s.read_credential(cred_path).next == s.RotatedKey(**claims["rk"])
    with pytest.raises(stt1_client.ResponseForged):
        api._verify(prepared, status, headers, body + b" ")
