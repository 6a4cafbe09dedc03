"""Generate tests/vectors/stt1.json: fixed-nonce STT1 vectors (PROTOCOL.md sections 1 and 2).

Run once and commit the output; the Python tests and the browser client check against the
committed file, so regenerating it is a protocol change. Before writing, every vector is
cross-checked against independent code: cryptography's HKDF class for K_dir and pyseto for
the PASETO v3.local token.

    python tests/vectors/make_stt1_vectors.py
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import pyseto  # noqa: E402 (after the sys.path line)
from cryptography.hazmat.primitives import hashes  # noqa: E402 (after the sys.path line)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402 (after the sys.path line)

import security  # noqa: E402 (after the sys.path line)

AUD = "https://api.example.com"

ACME = {
    "K": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    "tid": "acme",
    "kid": security.b64encode(bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")),
}
NORTH = {
    "K": "f0e1d2c3b4a5968778695a4b3c2d1e0f0123456789abcdeffedcba9876543210",
    "tid": "north-wind-42",
    "kid": security.b64encode(bytes.fromhex("5f5e5d5c5b5a59585756555453525150")),
}


def jti(hex16: str) -> str:
    return security.b64encode(bytes.fromhex(hex16))


JTI_1 = jti("00112233445566778899aabbccddeeff")
JTI_2 = jti("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
JTI_3 = jti("deadbeefdeadbeefdeadbeefdeadbeef")
JTI_4 = jti("0123456789abcdef0123456789abcdef")
JTI_5 = jti("fedcba9876543210fedcba9876543210")
JTI_6 = jti("a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5")
RK = {
    "kid": security.b64encode(bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf")),
    "k": security.b64encode(bytes(range(0x40, 0x60))),
}

# name, credential, dir, iat, nonce, assertion inputs, claims
CASES = [
    (
        "c2s-post-json-body",
        "A request with a JSON body.",
        ACME,
        "c2s",
        1760000000,
        "101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f",
        {
            "aud": AUD,
            "method": "POST",
            "target": b"/rest/reserve/",
            "content_type": b"application/json",
            "body": b'{"sku":"A-100","qty":3}',
        },
        security.RequestClaims(jti=JTI_1),
    ),
    (
        "c2s-get-query-empty-body",
        (
            "A request whose target has a query string (kept byte for byte, percent-encoding and "
            "all), with no Content-Type and no body: both are empty pieces. iat is the last second "
            "of its time step."
        ),
        ACME,
        "c2s",
        1759999999,
        "303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f",
        {
            "aud": AUD,
            "method": "GET",
            "target": b"/rest/stock_level/A-100?warehouse=north&note=a%2Fb+c",
            "content_type": b"",
            "body": b"",
        },
        security.RequestClaims(jti=JTI_2),
    ),
    (
        "s2c-200-response",
        "The server's answer to c2s-post-json-body: bound to that request's jti.",
        ACME,
        "s2c",
        1760000001,
        "505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f",
        {
            "aud": AUD,
            "request_jti": JTI_1,
            "status": 200,
            "content_type": b"application/json",
            "body": b'{"results":42,"valid":true}',
        },
        security.ResponseClaims(jti=JTI_3),
    ),
    (
        "s2c-200-rotation-rk",
        (
            "A 2xx answer during rotation: the payload carries the pending credential rk. iat is "
            "the first second of its time step."
        ),
        ACME,
        "s2c",
        1760000010,
        "707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f",
        {
            "aud": AUD,
            "request_jti": JTI_1,
            "status": 200,
            "content_type": b"application/json",
            "body": b'{"results":{"reserved":3},"valid":true}',
        },
        security.ResponseClaims(jti=JTI_4, rk=security.RotatedKey(kid=RK["kid"], k=RK["k"])),
    ),
    (
        "c2s-otp-utf8-body",
        (
            "A request to a second-factor function: otp in the payload; a tenant id with hyphens "
            "and digits; a body with non-ASCII UTF-8 (hash the bytes, never re-encode the text)."
        ),
        NORTH,
        "c2s",
        1760000042,
        "909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
        {
            "aud": AUD,
            "method": "POST",
            "target": b"/rest/approve_payment/",
            "content_type": b"application/json; charset=utf-8",
            "body": '{"memo":"caf\u00e9 \u2615 \u2013 5 \u20ac"}'.encode(),
        },
        security.RequestClaims(jti=JTI_5, otp="492039"),
    ),
    (
        "s2c-404-error",
        "Error answers after the token was accepted are signed too.",
        NORTH,
        "s2c",
        1760000043,
        "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf",
        {
            "aud": AUD,
            "request_jti": JTI_5,
            "status": 404,
            "content_type": b"application/json",
            "body": b'{"valid":false,"error":{"code":"not_found","message":"no such function"}}',
        },
        security.ResponseClaims(jti=JTI_6),
    ),
]


def _text_and_hex(value: bytes) -> dict[str, str]:
    return {"text": value.decode("utf-8"), "hex": value.hex()}


def build_vector(name, description, cred, direction, iat, nonce_hex, inputs, claims) -> dict:
    k = bytes.fromhex(cred["K"])
    tid, kid = cred["tid"], cred["kid"]
    if direction == "c2s":
        implicit = security.request_assertion(
            inputs["aud"], inputs["method"], inputs["target"], inputs["content_type"], inputs["body"]
        )
        assertion = {
            "aud": inputs["aud"],
            "method": inputs["method"],
            "target": _text_and_hex(inputs["target"]),
        }
    else:
        implicit = security.response_assertion(
            inputs["aud"], inputs["request_jti"], inputs["status"], inputs["content_type"], inputs["body"]
        )
        assertion = {
            "aud": inputs["aud"],
            "request_jti": inputs["request_jti"],
            "status": inputs["status"],
        }
    assertion["content_type"] = _text_and_hex(inputs["content_type"])
    assertion["body"] = _text_and_hex(inputs["body"])
    assertion["body_sha256"] = hashlib.sha256(inputs["body"]).hexdigest()

    dir_key = security.direction_key(k, direction, tid, kid)
    step = security.time_step(iat)
    step_key = security.step_key(dir_key, step)
    key = security.DirectionKey(k, direction, tid, kid)
    token = security.mint(key, iat, claims, implicit, nonce=bytes.fromhex(nonce_hex))
    footer = security.build_footer(direction, tid, kid, iat)
    payload = security._ENCODE(claims)

    # Independent cross-checks before anything is written.
    info = b"stt1 dirkey\x00" + b"\x00".join(x.encode() for x in (direction, tid, kid))
    assert dir_key == HKDF(algorithm=hashes.SHA384(), length=32, salt=None, info=info).derive(k)
    msg = b"stt1 step\x00" + step.to_bytes(8, "big")
    assert step_key == hmac.new(dir_key, msg, hashlib.sha384).digest()[:32]
    decoded = pyseto.decode(pyseto.Key.new(3, "local", step_key), token, implicit_assertion=implicit)
    assert decoded.payload == payload and decoded.footer == footer
    assert security.open_token(key, token, implicit).claims == claims

    return {
        "name": name,
        "description": description,
        "K": cred["K"],
        "tid": tid,
        "kid": kid,
        "dir": direction,
        "iat": iat,
        "step": step,
        "nonce": nonce_hex,
        "assertion": assertion,
        "implicit": implicit.hex(),
        "payload": payload.decode("ascii"),
        "footer": footer.decode("ascii"),
        "dir_key": dir_key.hex(),
        "step_key": step_key.hex(),
        "token": token,
    }


def main() -> None:
    doc = {
        "name": "STT1 fixed-nonce vectors",
        "protocol": "STT1, PROTOCOL.md sections 1 and 2",
        "how": [
            "dir_key = HKDF-SHA384(ikm=K, salt=empty, info='stt1 dirkey' 0x00 dir 0x00 tid 0x00 kid, L=32)",
            "step = floor(iat / 30); step_key = HMAC-SHA384(dir_key, 'stt1 step' 0x00 uint64_be(step))[:32]",
            "c2s implicit = PAE('stt1', 'c2s', aud, method, target, content_type, SHA256(body))",
            "s2c implicit = PAE('stt1', 's2c', aud, request_jti, ASCII decimal status, content_type, SHA256(body))",
            "footer = dir '.' tid '.' kid '.' iat as 10 digits",
            "token = PASETO v3.local Encrypt(key=step_key, message=payload, footer, implicit, nonce)",
        ],
        "encoding": (
            "K, nonce, implicit, dir_key, step_key and every *.hex are lowercase hex of the exact "
            "bytes; *.text is the same bytes as UTF-8. payload and footer are ASCII. SHA256 enters "
            "the PAE as the raw 32-byte digest, not hex."
        ),
        "vectors": [build_vector(*case) for case in CASES],
    }
    out = HERE / "stt1.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="ascii")
    print(f"wrote {out} ({len(doc['vectors'])} vectors)")


if __name__ == "__main__":
    main()
