"""The token envelope: PASETO v3.local and the STT1 layer on top (PROTOCOL.md sections 1-2).

Conformance first (official PASETO vectors, pyseto both ways, our own fixed-nonce STT1
vectors), then every way a token must be refused, then what must never leak.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
from pathlib import Path

import msgspec
import pyotp
import pyseto
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import security as s
from security import InvalidToken

VECTORS = Path(__file__).resolve().parent / "vectors"
PASETO = json.loads((VECTORS / "paseto" / "v3.json").read_text())["tests"]
STT1 = json.loads((VECTORS / "stt1.json").read_text())["vectors"]

E_VECTORS = [v for v in PASETO if v["name"].startswith("3-E-")]
F_VECTORS = [v for v in PASETO if v["name"].startswith("3-F-")]

K = bytes(range(32))
TID = "acme"
KID = s.b64encode(bytes(range(16, 32)))
AUD = "https://api.example.com"
IAT = 1_760_000_000


def request_implicit(
    aud: str = AUD,
    method: str = "POST",
    target: bytes = b"/rest/reserve/",
    content_type: bytes = b"application/json",
    body: bytes = b'{"sku":"A-100","qty":3}',
) -> bytes:
    return s.request_assertion(aud, method, target, content_type, body)


@pytest.fixture
def c2s() -> s.DirectionKey:
    return s.DirectionKey(K, "c2s", TID, KID)


@pytest.fixture
def s2c() -> s.DirectionKey:
    return s.DirectionKey(K, "s2c", TID, KID)


@pytest.fixture
def token(c2s: s.DirectionKey) -> str:
    return s.mint(c2s, IAT, s.RequestClaims(jti=s.new_jti()), request_implicit())


def forge(
    direction: str,
    tid: str,
    kid: str,
    iat: int,
    payload: bytes,
    implicit: bytes,
    footer: bytes | None = None,
    k: bytes = K,
) -> str:
    """A token made with the right step key but arbitrary footer and payload bytes: it gets
    past the MAC, so only the later checks can refuse it."""
    k_t = s.step_key(s.direction_key(k, direction, tid, kid), s.time_step(iat))
    if footer is None:
        footer = s.build_footer(direction, tid, kid, iat)
    return s.encrypt(k_t, payload, footer, implicit)


# -- PASETO v3.local conformance ----------------------------------------------------------


@pytest.mark.parametrize("v", E_VECTORS, ids=lambda v: v["name"])
def test_paseto_e_vector_encrypts_exactly(v: dict) -> None:
    token = s.encrypt(
        bytes.fromhex(v["key"]),
        v["payload"].encode(),
        v["footer"].encode(),
        v["implicit-assertion"].encode(),
        nonce=bytes.fromhex(v["nonce"]),
    )
    assert token == v["token"]


@pytest.mark.parametrize("v", E_VECTORS, ids=lambda v: v["name"])
def test_paseto_e_vector_decrypts(v: dict) -> None:
    key, implicit = bytes.fromhex(v["key"]), v["implicit-assertion"].encode()
    assert s.decrypt(key, v["token"], None, implicit) == v["payload"].encode()
    assert s.decrypt(key, v["token"], v["footer"].encode(), implicit) == v["payload"].encode()
    assert s.split(v["token"])[1] == v["footer"].encode()


@pytest.mark.parametrize("v", F_VECTORS, ids=lambda v: v["name"])
def test_paseto_f_vector_refused(v: dict) -> None:
    # 3-F-1 gives only a P-384 key pair (a public-key key used for local): try those bytes
    # and the local key of the other vectors.
    keys = [bytes.fromhex(v[name]) for name in ("key", "secret-key", "public-key") if name in v]
    keys.append(bytes.fromhex(E_VECTORS[0]["key"]))
    for key in keys:
        for footer in (None, v["footer"].encode()):
            with pytest.raises(InvalidToken):
                s.decrypt(key, v["token"], footer, v["implicit-assertion"].encode())


def test_decrypt_checks_expected_footer() -> None:
    key = os.urandom(32)
    token = s.encrypt(key, b"m", b"footer-a")
    assert s.decrypt(key, token, b"footer-a") == b"m"
    for wrong in (b"footer-b", b"", b"footer-a\x00"):
        with pytest.raises(InvalidToken):
            s.decrypt(key, token, wrong)
    with pytest.raises(InvalidToken):
        s.decrypt(key, s.encrypt(key, b"m"), b"footer-a")


def test_encrypt_refuses_bad_key_and_nonce_lengths() -> None:
    for key in (b"", bytes(31), bytes(33), bytes(48)):
        with pytest.raises(ValueError):
            s.encrypt(key, b"m")
    for nonce in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError):
            s.encrypt(bytes(32), b"m", nonce=nonce)


def test_hkdf_shortcut_matches_hkdf_class() -> None:
    for _ in range(20):
        k, n = os.urandom(32), os.urandom(32)
        local = s._LocalKey(k)

        def hkdf(info: bytes, k: bytes = k) -> bytes:
            return HKDF(algorithm=hashes.SHA384(), length=48, salt=None, info=info).derive(k)

        ek, n2 = local.encryption_key(n)
        assert ek + n2 == hkdf(b"paseto-encryption-key" + n)
        assert local.auth_key(n) == hkdf(b"paseto-auth-key-for-aead" + n)


def test_aes_shortcut_matches_the_cipher_class() -> None:
    for size in (0, 1, 15, 16, 17, 31, 512):
        key, counter, data = os.urandom(32), os.urandom(16), os.urandom(size)
        public = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        assert s._aes_ctr(key, counter, data) == public.update(data) + public.finalize()
    top = b"\xff" * 16  # the 128-bit counter wraps to zero, as Cipher's does
    public = Cipher(algorithms.AES(bytes(32)), modes.CTR(top)).encryptor()
    assert s._aes_ctr(bytes(32), top, bytes(64)) == public.update(bytes(64))
    for key, counter in ((bytes(31), bytes(16)), (bytes(32), bytes(15))):  # the same refusals
        with pytest.raises(ValueError):
            s._aes_ctr(key, counter, b"x")


@pytest.mark.parametrize("footer", [b"", b"a footer", b'{"kid":"x"}'])
@pytest.mark.parametrize("implicit", [b"", b"an implicit assertion"])
def test_pyseto_interop_both_ways(footer: bytes, implicit: bytes) -> None:
    key = os.urandom(32)
    pkey = pyseto.Key.new(3, "local", key)
    ours = s.encrypt(key, b"from us", footer, implicit)
    got = pyseto.decode(pkey, ours, implicit_assertion=implicit)
    assert (got.payload, got.footer) == (b"from us", footer)
    theirs = pyseto.encode(pkey, b"from pyseto", footer, implicit_assertion=implicit).decode()
    assert s.decrypt(key, theirs, footer, implicit) == b"from pyseto"


def test_pyseto_interop_stt1(c2s: s.DirectionKey) -> None:
    implicit = request_implicit()
    k_t = s.step_key(s.direction_key(K, "c2s", TID, KID), s.time_step(IAT))
    pkey = pyseto.Key.new(3, "local", k_t)
    claims = s.RequestClaims(jti=s.new_jti(), otp="123456")
    got = pyseto.decode(pkey, s.mint(c2s, IAT, claims, implicit), implicit_assertion=implicit)
    assert isinstance(got.payload, bytes)
    assert msgspec.json.decode(got.payload) == {"jti": claims.jti, "otp": "123456"}
    assert got.footer == f"c2s.{TID}.{KID}.{IAT}".encode()
    theirs = pyseto.encode(
        pkey, msgspec.json.encode(claims), s.build_footer("c2s", TID, KID, IAT), implicit_assertion=implicit
    ).decode()
    assert s.open_token(c2s, theirs, implicit) == (s.Footer("c2s", TID, KID, IAT), claims)


# -- PAE and base64url ---------------------------------------------------------------------


def test_pae_known_answers() -> None:
    assert s.pae() == b"\x00" * 8
    assert s.pae(b"") == b"\x01" + b"\x00" * 7 + b"\x00" * 8
    assert s.pae(b"test") == b"\x01" + b"\x00" * 7 + b"\x04" + b"\x00" * 7 + b"test"
    assert s.pae(b"a", b"bc") == (b"\x02" + b"\x00" * 7 + b"\x01" + b"\x00" * 7 + b"a" + b"\x02" + b"\x00" * 7 + b"bc")
    with pytest.raises(TypeError):
        s.pae("test")  # type: ignore[arg-type]


def test_pae_separates_pieces() -> None:
    assert s.pae(b"ab", b"c") != s.pae(b"a", b"bc")
    assert s.pae(b"a", b"") != s.pae(b"a")


def test_b64_round_trip_matches_rfc4648() -> None:
    for n in range(100):
        data = os.urandom(n)
        text = s.b64encode(data)
        assert text == base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        assert s.b64decode(text) == data


def test_b64_accepts_exactly_the_canonical_spelling() -> None:
    # Exhaustive over short strings: a string decodes iff re-encoding gives it back.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for a in alphabet:
        for b in alphabet:
            for text in (a + b, a + b + "A", "AA" + a + b):
                try:
                    ok = s.b64encode(s.b64decode(text)) == text
                except ValueError:
                    ok = False
                expected = (
                    base64.urlsafe_b64encode(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
                    .rstrip(b"=")
                    .decode()
                    == text
                )
                assert ok == expected, text


@pytest.mark.parametrize(
    "text",
    [
        "QQ==",
        "QQ=",
        "QUI=",
        "QUJD=",
        "=",
        "QUJD====",  # padding, any amount
        "QR",
        "QUJ",
        "_x",
        "__9",  # non-zero unused trailing bits
        "Q+",
        "Q/",
        "QU+D",
        "QU/D",
        "QU D",
        "QUJD\n",
        " QUJD",
        "QU.D",
        "QU\x00D",
        "QUé",
        "QU\u0661",
        "Q",
        "QUJDR",
        "QUJDRUZHS",  # length 1 mod 4
    ],
)
def test_b64_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        s.b64decode(text)


def test_b64_refuses_non_str() -> None:
    with pytest.raises(ValueError):
        s.b64decode(b"QUJD")  # type: ignore[arg-type]


# -- STT1 vectors ---------------------------------------------------------------------------


def _vector_inputs(v: dict) -> tuple[bytes, bytes, s.DirectionKey]:
    a = v["assertion"]
    content_type, body = bytes.fromhex(a["content_type"]["hex"]), bytes.fromhex(a["body"]["hex"])
    assert content_type == a["content_type"]["text"].encode() and body == a["body"]["text"].encode()
    assert hashlib.sha256(body).hexdigest() == a["body_sha256"]
    if v["dir"] == "c2s":
        target = bytes.fromhex(a["target"]["hex"])
        assert target == a["target"]["text"].encode()
        implicit = s.request_assertion(a["aud"], a["method"], target, content_type, body)
    else:
        implicit = s.response_assertion(a["aud"], a["request_jti"], a["status"], content_type, body)
    return implicit, body, s.DirectionKey(bytes.fromhex(v["K"]), v["dir"], v["tid"], v["kid"])


@pytest.mark.parametrize("v", STT1, ids=lambda v: v["name"])
def test_stt1_vector(v: dict) -> None:
    k = bytes.fromhex(v["K"])
    implicit, _, key = _vector_inputs(v)
    assert implicit.hex() == v["implicit"]
    dir_key = s.direction_key(k, v["dir"], v["tid"], v["kid"])
    assert dir_key.hex() == v["dir_key"]
    assert s.time_step(v["iat"]) == v["step"] == v["iat"] // 30
    assert s.step_key(dir_key, v["step"]).hex() == v["step_key"]
    assert s.build_footer(v["dir"], v["tid"], v["kid"], v["iat"]).decode() == v["footer"]

    claims: s.RequestClaims | s.ResponseClaims
    if v["dir"] == "c2s":
        claims = msgspec.json.decode(v["payload"], type=s.RequestClaims)
    else:
        claims = msgspec.json.decode(v["payload"], type=s.ResponseClaims)
    assert s.mint(key, v["iat"], claims, implicit, nonce=bytes.fromhex(v["nonce"])) == v["token"]

    opened = s.open_token(key, v["token"], implicit)
    assert opened.footer == s.Footer(v["dir"], v["tid"], v["kid"], v["iat"])
    assert msgspec.json.encode(opened.claims).decode() == v["payload"]
    # And the PASETO layer alone, with the step key, as any v3.local library would.
    assert s.decrypt(bytes.fromhex(v["step_key"]), v["token"], v["footer"].encode(), implicit) == v["payload"].encode()


@pytest.mark.parametrize("v", STT1, ids=lambda v: v["name"])
def test_stt1_vector_refused_when_any_assertion_input_changes(v: dict) -> None:
    a = v["assertion"]
    _, body, key = _vector_inputs(v)
    content_type = bytes.fromhex(a["content_type"]["hex"])
    if v["dir"] == "c2s":
        target = bytes.fromhex(a["target"]["hex"])
        variants = [
            s.request_assertion(a["aud"] + "/", a["method"], target, content_type, body),
            s.request_assertion("http://127.0.0.1:8000", a["method"], target, content_type, body),
            s.request_assertion(a["aud"], a["method"].lower(), target, content_type, body),
            s.request_assertion(a["aud"], a["method"], target + b"?", content_type, body),
            s.request_assertion(a["aud"], a["method"], target.replace(b"/rest", b"/REST"), content_type, body),
            s.request_assertion(a["aud"], a["method"], target, content_type + b" ", body),
            s.request_assertion(a["aud"], a["method"], target, content_type, body + b" "),
        ]
    else:
        variants = [
            s.response_assertion(a["aud"] + "/", a["request_jti"], a["status"], content_type, body),
            s.response_assertion(a["aud"], s.new_jti(), a["status"], content_type, body),
            s.response_assertion(a["aud"], a["request_jti"], 500, content_type, body),
            s.response_assertion(a["aud"], a["request_jti"], a["status"], b"text/plain", body),
            s.response_assertion(a["aud"], a["request_jti"], a["status"], content_type, body + b"\n"),
        ]
    for implicit in variants:
        with pytest.raises(InvalidToken):
            s.open_token(key, v["token"], implicit)


# -- STT1 keys -----------------------------------------------------------------------------


def test_direction_key_is_hkdf_sha384() -> None:
    info = b"stt1 dirkey\x00c2s\x00acme\x00" + KID.encode()
    expected = HKDF(algorithm=hashes.SHA384(), length=32, salt=None, info=info).derive(K)
    assert s.direction_key(K, "c2s", TID, KID) == expected


def test_keys_are_separated() -> None:
    c2s, s2c = s.direction_key(K, "c2s", TID, KID), s.direction_key(K, "s2c", TID, KID)
    other_kid = s.b64encode(bytes(16))
    assert (
        len(
            {
                c2s,
                s2c,
                s.direction_key(K, "c2s", "acme2", KID),
                s.direction_key(K, "c2s", TID, other_kid),
                s.direction_key(os.urandom(32), "c2s", TID, KID),
            }
        )
        == 5
    )
    t = s.time_step(IAT)
    assert len({s.step_key(c2s, t), s.step_key(c2s, t + 1), s.step_key(s2c, t), c2s}) == 4
    assert s.time_step(IAT - IAT % 30) == s.time_step(IAT - IAT % 30 + 29) != s.time_step(IAT - IAT % 30 + 30)


@pytest.mark.parametrize(
    "args",
    [
        (bytes(31), "c2s", TID, KID),
        (bytes(33), "c2s", TID, KID),
        (K, "C2S", TID, KID),
        (K, "sideways", TID, KID),
        (K, "c2s", "Acme", KID),
        (K, "c2s", "-acme", KID),
        (K, "c2s", "a" * 33, KID),
        (K, "c2s", "", KID),
        (K, "c2s", TID, KID[:-1]),
        (K, "c2s", TID, KID + "A"),
        (K, "c2s", TID, KID[:-1] + "B"),  # non-canonical: trailing bits set
    ],
)
def test_direction_key_refuses_bad_inputs(args: tuple) -> None:
    with pytest.raises(ValueError):
        s.direction_key(*args)
    with pytest.raises(ValueError):
        s.DirectionKey(*args)


def test_step_key_refuses_bad_inputs() -> None:
    for args in ((bytes(31), 1), (bytes(32), -1), (bytes(32), 1 << 64)):
        with pytest.raises(ValueError):
            s.step_key(*args)


# -- STT1 tokens: round trips and separation ----------------------------------------------


def test_request_round_trip(c2s: s.DirectionKey) -> None:
    for claims in (s.RequestClaims(jti=s.new_jti()), s.RequestClaims(jti=s.new_jti(), otp="000123")):
        token = s.mint(c2s, IAT, claims, request_implicit())
        parsed = s.parse(token)
        assert parsed.footer == s.Footer("c2s", TID, KID, IAT)
        assert s.open_token(c2s, parsed, request_implicit()) == (parsed.footer, claims)
        assert s.open_token(c2s, token, request_implicit()).claims == claims


def test_response_round_trip(s2c: s.DirectionKey) -> None:
    rk = s.RotatedKey(kid=s.new_jti(), k=s.b64encode(os.urandom(32)))
    implicit = s.response_assertion(AUD, s.new_jti(), 200, b"application/json", b"{}")
    for claims in (s.ResponseClaims(jti=s.new_jti()), s.ResponseClaims(jti=s.new_jti(), rk=rk)):
        assert s.open_token(s2c, s.mint(s2c, IAT, claims, implicit), implicit).claims == claims


def test_minted_with_s2c_key_refused_as_c2s(c2s: s.DirectionKey, s2c: s.DirectionKey) -> None:
    implicit = request_implicit()
    payload = msgspec.json.encode(s.RequestClaims(jti=s.new_jti()))
    # A c2s-shaped token (c2s footer, request claims) under the s2c step key.
    k_t = s.step_key(s.direction_key(K, "s2c", TID, KID), s.time_step(IAT))
    forged = s.encrypt(k_t, payload, s.build_footer("c2s", TID, KID, IAT), implicit)
    with pytest.raises(InvalidToken):
        s.open_token(c2s, forged, implicit)
    # A genuine s2c token offered as a request, and a c2s token offered as a response.
    response = s.mint(s2c, IAT, s.ResponseClaims(jti=s.new_jti()), implicit)
    with pytest.raises(InvalidToken):
        s.open_token(c2s, response, implicit)
    request = s.mint(c2s, IAT, s.RequestClaims(jti=s.new_jti()), implicit)
    with pytest.raises(InvalidToken):
        s.open_token(s2c, request, implicit)


def test_other_tenant_kid_or_step_refused(c2s: s.DirectionKey) -> None:
    implicit = request_implicit()
    payload = msgspec.json.encode(s.RequestClaims(jti=s.new_jti()))
    other_kid = s.b64encode(bytes(16))
    cases = [
        forge("c2s", "other", KID, IAT, payload, implicit),  # another tenant's key and footer
        forge("c2s", TID, KID, IAT, payload, implicit, k=os.urandom(32)),  # another K
        # Our own key and tid, footer rewritten to another tid, kid or iat.
        forge("c2s", TID, KID, IAT, payload, implicit, footer=s.build_footer("c2s", "other", KID, IAT)),
        forge("c2s", TID, KID, IAT, payload, implicit, footer=s.build_footer("c2s", TID, other_kid, IAT)),
        forge("c2s", TID, KID, IAT, payload, implicit, footer=s.build_footer("c2s", TID, KID, IAT + 30)),
    ]
    # A genuine token whose footer is re-encoded with another tid, kid or iat (same step).
    genuine = s.mint(c2s, IAT, s.RequestClaims(jti=s.new_jti()), implicit)
    body = genuine.split(".")[2]
    for footer in (
        s.build_footer("c2s", "other", KID, IAT),
        s.build_footer("c2s", TID, other_kid, IAT),
        s.build_footer("c2s", TID, KID, IAT + 1),
        s.build_footer("c2s", TID, KID, IAT - 1),
    ):
        cases.append(f"v3.local.{body}.{s.b64encode(footer)}")
    for token in cases:
        with pytest.raises(InvalidToken):
            s.open_token(c2s, token, implicit)
    # The step key is the footer iat's: a token under the next step's key is refused.
    k_next = s.step_key(s.direction_key(K, "c2s", TID, KID), s.time_step(IAT) + 1)
    with pytest.raises(InvalidToken):
        s.open_token(c2s, s.encrypt(k_next, payload, s.build_footer("c2s", TID, KID, IAT), implicit), implicit)


def test_direction_key_caches_steps_boundedly(c2s: s.DirectionKey) -> None:
    implicit = request_implicit()
    for i in range(40):
        token = s.mint(c2s, IAT + 30 * i, s.RequestClaims(jti=s.new_jti()), implicit)
        assert s.open_token(c2s, token, implicit).footer.iat == IAT + 30 * i
        assert len(c2s._steps) <= c2s._MAX_STEPS


# -- STT1 tokens: shape ----------------------------------------------------------------------


def test_every_single_character_change_refused(c2s: s.DirectionKey, token: str) -> None:
    implicit = request_implicit()
    replacements = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ V"
    for i, original in enumerate(token):
        for ch in replacements:
            if ch == original:
                continue
            with pytest.raises(InvalidToken):
                s.open_token(c2s, token[:i] + ch + token[i + 1 :], implicit)
        with pytest.raises(InvalidToken):
            s.open_token(c2s, token[:i] + token[i + 1 :], implicit)  # deleted
        with pytest.raises(InvalidToken):
            s.open_token(c2s, token[:i] + "A" + token[i:], implicit)  # inserted


def test_every_truncation_refused(c2s: s.DirectionKey, token: str) -> None:
    implicit = request_implicit()
    for i in range(len(token)):
        for cut in (token[:i], token[i + 1 :]):
            with pytest.raises(InvalidToken):
                s.open_token(c2s, cut, implicit)


def test_extra_parts_refused(c2s: s.DirectionKey, token: str) -> None:
    implicit = request_implicit()
    body, footer = token[len("v3.local.") :].split(".")
    for bad in (
        token + ".",
        token + ".AAAA",
        token + "." + footer,
        f"v3.local.{body}..{footer}",
        f"v3.local..{body}.{footer}",
        f"v3.local.{body}",  # footer missing
        f"v3.local.{body}.",
        token + "\n",
        " " + token,
    ):
        with pytest.raises(InvalidToken):
            s.open_token(c2s, bad, implicit)


@pytest.mark.parametrize(
    "prefix",
    [
        "v4.local.",
        "v3.public.",
        "V3.local.",
        "v3.LOCAL.",
        "v2.local.",
        "v3.local",
        "STT1 v3.local.",
        "v3.local.v3.local.",
    ],
)
def test_other_versions_and_purposes_refused(c2s: s.DirectionKey, token: str, prefix: str) -> None:
    with pytest.raises(InvalidToken):
        s.open_token(c2s, prefix + token[len("v3.local.") :], request_implicit())
    with pytest.raises(InvalidToken):
        s.split(prefix + token[len("v3.local.") :])


def test_padding_and_trailing_bits_refused(c2s: s.DirectionKey) -> None:
    implicit = request_implicit()
    # Find tokens whose base64 parts end in a partial group, then spell them non-canonically.
    seen = set()
    for _ in range(30):
        token = s.mint(c2s, IAT, s.RequestClaims(jti=s.new_jti()), implicit)
        body, footer = token[len("v3.local.") :].split(".")
        rem = len(body) % 4
        seen.add(rem)
        if rem:
            padded = f"v3.local.{body}{'=' * (4 - rem)}.{footer}"
            with pytest.raises(InvalidToken):
                s.open_token(c2s, padded, implicit)
            last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(body[-1])
            flipped = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last | 1]
            with pytest.raises(InvalidToken):
                s.open_token(c2s, f"v3.local.{body[:-1]}{flipped}.{footer}", implicit)
        if len(footer) % 4:
            with pytest.raises(InvalidToken):
                s.open_token(c2s, f"v3.local.{body}.{footer}{'=' * (4 - len(footer) % 4)}", implicit)
    assert seen - {0}


def test_oversized_and_non_str_tokens_refused(c2s: s.DirectionKey, token: str) -> None:
    implicit = request_implicit()
    for bad in (
        token + "A" * (s.MAX_TOKEN_CHARS - len(token) + 1),
        "",
        "v3.local.",
        token.encode(),
        None,
        42,
    ):
        with pytest.raises(InvalidToken):
            s.open_token(c2s, bad, implicit)  # type: ignore[arg-type]


# -- STT1 footer ------------------------------------------------------------------------------


def test_footer_round_trip() -> None:
    raw = s.build_footer("s2c", "north-wind-42", KID, 42)
    assert raw == f"s2c.north-wind-42.{KID}.0000000042".encode()
    assert s.parse_footer(raw) == s.Footer("s2c", "north-wind-42", KID, 42)


@pytest.mark.parametrize(
    "raw",
    [
        f"c2s.acme.{KID}.176000000",  # 9-digit iat
        f"c2s.acme.{KID}.17600000000",  # 11-digit iat
        f"c2s.acme.{KID}.-760000000",
        f"c2s.acme.{KID}.+760000000",
        f"c2s.acme.{KID}.17600000\u0661\u0662",  # non-ASCII digits
        f"c2s.acme.{KID}. 760000000",
        f"c2s.Acme.{KID}.1760000000",  # tid: upper case
        f"c2s.-acme.{KID}.1760000000",  # tid: leading hyphen
        f"c2s.ac_me.{KID}.1760000000",
        f"c2s.{'a' * 33}.{KID}.1760000000",  # tid: too long
        f"c2s..{KID}.1760000000",  # tid: empty
        f"c2s.acme.{KID[:-1]}.1760000000",  # kid: 21 chars
        f"c2s.acme.{KID}A.1760000000",  # kid: 23 chars
        f"c2s.acme.{KID[:-1]}B.1760000000",  # kid: trailing bits set
        f"c2s.acme.{KID[:-1]}+.1760000000",
        f"C2S.acme.{KID}.1760000000",  # dir
        f"s2s.acme.{KID}.1760000000",
        f"acme.{KID}.1760000000",
        f"c2s.acme.{KID}.1760000000.",
        f"c2s.acme.{KID}.1760000000.1",
        f"c2s.acme.{KID}.1760000000\n",
        f"c2s.acme.{KID}.1760000000\x00",
        f"c2s.acme.acme.{KID}.1760000000",
        f".c2s.acme.{KID}.1760000000",
        "",
    ],
)
def test_footer_parse_refuses(raw: str, c2s: s.DirectionKey) -> None:
    encoded = raw.encode()
    with pytest.raises(InvalidToken):
        s.parse_footer(encoded)
    # And inside a token that is otherwise perfectly authenticated.
    implicit = request_implicit()
    payload = msgspec.json.encode(s.RequestClaims(jti=s.new_jti()))
    if encoded:
        with pytest.raises(InvalidToken):
            s.open_token(c2s, forge("c2s", TID, KID, IAT, payload, implicit, footer=encoded), implicit)


def test_parse_remembers_only_footers_that_parsed_and_only_so_many(c2s: s.DirectionKey) -> None:
    implicit = request_implicit()
    token = s.mint(c2s, IAT, s.RequestClaims(jti=s.new_jti()), implicit)
    body, footer = token[len("v3.local.") :].split(".")
    s._FOOTERS.clear()
    for _ in range(2):  # the second parse answers from memory, and the same
        parsed = s.parse(token)
        assert parsed.footer == s.Footer("c2s", TID, KID, IAT)
        assert s.open_token(c2s, parsed, implicit).footer.iat == IAT
    bad = s.b64encode(f"c2s.Acme.{KID}.{IAT}".encode())
    for _ in range(2):
        with pytest.raises(InvalidToken):
            s.parse(f"v3.local.{body}.{bad}")
    assert list(s._FOOTERS) == [footer]
    for iat in range(IAT, IAT + s._MAX_FOOTERS + 10):  # a flood of distinct footers stays bounded
        s.parse(f"v3.local.{body}.{s.b64encode(s.build_footer('c2s', TID, KID, iat))}")
        assert len(s._FOOTERS) <= s._MAX_FOOTERS
    with pytest.raises(InvalidToken):  # a remembered footer does not make a token valid
        s.open_token(c2s, s.parse(f"v3.local.{body[:-2]}AA.{footer}"), implicit)


@pytest.mark.parametrize(
    "args",
    [
        ("c2s", TID, KID, -1),
        ("c2s", TID, KID, 10_000_000_000),
        ("c2s", TID, KID, True),
        ("c2s", TID, KID, 1.5e9),
        ("x2y", TID, KID, IAT),
        ("c2s", "Acme", KID, IAT),
        ("c2s", TID, KID[:-1], IAT),
    ],
)
def test_footer_build_refuses(args: tuple) -> None:
    with pytest.raises(ValueError):
        s.build_footer(*args)


def test_mint_refuses_bad_iat(c2s: s.DirectionKey) -> None:
    for iat in (-1, 10_000_000_000, True, 1.5e9):
        with pytest.raises(ValueError):
            s.mint(c2s, iat, s.RequestClaims(jti=s.new_jti()), b"")  # type: ignore[arg-type]


# -- STT1 payload ---------------------------------------------------------------------------

JTI = s.b64encode(bytes(range(16)))


@pytest.mark.parametrize(
    "payload",
    [
        b'{"jti":"%s","extra":1}' % JTI.encode(),  # unknown field
        b'{"jti":"%s","rk":{"kid":"%s","k":"%s"}}' % (JTI.encode(), KID.encode(), ("A" * 43).encode()),
        b'{"jti":42}',  # wrong types
        b'{"jti":null}',
        b'{"jti":["%s"]}' % JTI.encode(),
        b'{"jti":"%s","otp":123456}' % JTI.encode(),
        b'{"jti":"%s","otp":null}' % JTI.encode(),  # absent is omitted, never null
        b'{"jti":"%s","otp":"12345"}' % JTI.encode(),
        b'{"jti":"%s","otp":"1234567"}' % JTI.encode(),
        b'{"jti":"%s","otp":"12345a"}' % JTI.encode(),
        b'{"jti":"%s"}' % JTI[:-1].encode(),  # 21 chars
        b'{"jti":"%s"}' % (JTI + "A").encode(),  # 23 chars
        b'{"jti":"%s"}' % (JTI[:-1] + "B").encode(),  # trailing bits set
        b'{"jti":"%s\\n"}' % JTI[:-1].encode(),
        b'{"jti":"%s"}' % (JTI[:-1] + "=").encode(),
        b"{}",
        b"[]",
        b'"%s"' % JTI.encode(),
        b"",
        b"not json",
        b'{"jti":"%s"} trailing' % JTI.encode(),
        b'{"jti":"%s"' % JTI.encode() + b" " * 600 + b"}",  # valid JSON, over 512 bytes
    ],
)
def test_request_payload_strictness(payload: bytes, c2s: s.DirectionKey) -> None:
    implicit = request_implicit()
    with pytest.raises(InvalidToken):
        s.open_token(c2s, forge("c2s", TID, KID, IAT, payload, implicit), implicit)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"jti":"%s","otp":"123456"}' % JTI.encode(),  # otp is request-only
        b'{"jti":"%s","rk":null}' % JTI.encode(),
        b'{"jti":"%s","rk":{"kid":"%s"}}' % (JTI.encode(), KID.encode()),
        b'{"jti":"%s","rk":{"kid":"%s","k":"%s","x":1}}' % (JTI.encode(), KID.encode(), ("A" * 43).encode()),
        b'{"jti":"%s","rk":{"kid":"%s","k":"%s"}}' % (JTI.encode(), KID.encode(), ("A" * 42).encode()),
        b'{"jti":"%s","rk":{"kid":"%s","k":"%s"}}' % (JTI.encode(), KID.encode(), ("A" * 42 + "B").encode()),
        b'{"jti":"%s","rk":{"kid":"%s","k":"%s"}}' % (JTI.encode(), KID[:-1].encode(), ("A" * 43).encode()),
        b'{"jti":"%s","rk":"%s"}' % (JTI.encode(), KID.encode()),
    ],
)
def test_response_payload_strictness(payload: bytes, s2c: s.DirectionKey) -> None:
    implicit = s.response_assertion(AUD, JTI, 200, b"", b"")
    with pytest.raises(InvalidToken):
        s.open_token(s2c, forge("s2c", TID, KID, IAT, payload, implicit), implicit)


def test_payload_size_limit_is_512_bytes(c2s: s.DirectionKey) -> None:
    implicit = request_implicit()
    base = b'{"jti":"%s"' % JTI.encode()
    at_limit = base + b" " * (s.MAX_PAYLOAD_BYTES - len(base) - 1) + b"}"
    assert len(at_limit) == 512
    assert s.open_token(c2s, forge("c2s", TID, KID, IAT, at_limit, implicit), implicit).claims.jti == JTI
    over = base + b" " * (s.MAX_PAYLOAD_BYTES - len(base)) + b"}"
    with pytest.raises(InvalidToken):
        s.open_token(c2s, forge("c2s", TID, KID, IAT, over, implicit), implicit)


def test_mint_refuses_what_open_would_refuse(c2s: s.DirectionKey, s2c: s.DirectionKey) -> None:
    with pytest.raises(TypeError):
        s.mint(c2s, IAT, s.ResponseClaims(jti=JTI), b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        s.mint(s2c, IAT, s.RequestClaims(jti=JTI), b"")  # type: ignore[arg-type]
    for claims in (s.RequestClaims(jti="short"), s.RequestClaims(jti=JTI, otp="12")):
        with pytest.raises(ValueError):
            s.mint(c2s, IAT, claims, b"")
    with pytest.raises(ValueError):
        s.mint(s2c, IAT, s.ResponseClaims(jti=JTI, rk=s.RotatedKey(kid=KID, k="short")), b"")


def test_response_assertion_refuses_bad_status() -> None:
    for status in (99, 600, True, "200", 200.0):
        with pytest.raises(ValueError):
            s.response_assertion(AUD, JTI, status, b"", b"")  # type: ignore[arg-type]


def test_new_jti_is_canonical_and_fresh() -> None:
    jtis = {s.new_jti() for _ in range(1000)}
    assert len(jtis) == 1000
    for jti in jtis:
        assert len(jti) == 22 and len(s.b64decode(jti)) == 16


# -- Nothing leaks ----------------------------------------------------------------------------


def test_secrets_not_in_reprs(c2s: s.DirectionKey) -> None:
    k_dir = s.direction_key(K, "c2s", TID, KID)
    secret_k = s.b64encode(os.urandom(32))
    rk = s.RotatedKey(kid=KID, k=secret_k)
    texts = [
        repr(c2s),
        str(c2s),
        repr(s._LocalKey(K)),
        repr(rk),
        str(rk),
        repr(s.ResponseClaims(jti=JTI, rk=rk)),
        repr(s.parse(s.mint(c2s, IAT, s.RequestClaims(jti=JTI), b""))),
    ]
    for text in texts:
        for secret in (K.hex(), k_dir.hex(), secret_k, repr(K), repr(k_dir)):
            assert secret not in text
    assert KID in repr(c2s) and TID in repr(c2s)


def test_direction_key_cannot_be_pickled(c2s: s.DirectionKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(c2s)


def test_invalid_token_says_nothing(c2s: s.DirectionKey, token: str) -> None:
    failures = [
        lambda: s.open_token(c2s, token, b"wrong"),
        lambda: s.open_token(c2s, token[:-3], request_implicit()),
        lambda: s.open_token(c2s, "v4" + token[2:], request_implicit()),
        lambda: s.decrypt(K, token),
        lambda: s.decrypt(b"short", token),
        lambda: s.parse_footer(b"junk"),
    ]
    for fail in failures:
        with pytest.raises(InvalidToken) as info:
            fail()
        err = info.value
        assert str(err) == "" and err.args == () and repr(err) == "InvalidToken()"
        assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None)


def test_errors_from_bad_keys_do_not_echo_them() -> None:
    bad_k = b"\x01secret-key-material-31-bytes.."
    for fail in (
        lambda: s.direction_key(bad_k, "c2s", TID, KID),
        lambda: s.encrypt(bad_k, b"m"),
        lambda: s.step_key(bad_k, 1),
    ):
        with pytest.raises(ValueError) as info:
            fail()
        assert "secret" not in str(info.value) and bad_k.hex() not in str(info.value)


def test_unverified_token_cannot_be_opened_with_another_key(token: str) -> None:
    parsed = s.parse(token)
    other = s.DirectionKey(os.urandom(32), "c2s", TID, KID)
    with pytest.raises(InvalidToken):
        s.open_token(other, parsed, request_implicit())


def test_secrets_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Timing cannot be asserted on a shared machine; what can is that every comparison of a
    secret-derived value (a tag, a footer, an authenticator code) goes through hmac.compare_digest."""
    compared: list[tuple[bytes, bytes]] = []
    real = s.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(s.hmac, "compare_digest", recording)
    token = s.encrypt(K, b"payload", b"footer")
    body, _ = s.split(token)
    forged = body[:-1] + bytes([body[-1] ^ 1])  # the last byte of the tag flipped
    with pytest.raises(InvalidToken):
        s.decrypt(K, f"v3.local.{s.b64encode(forged)}.{s.b64encode(b'footer')}")
    assert len(compared) == 1 and compared[0][0] == forged[-48:] and len(compared[0][1]) == 48
    compared.clear()
    with pytest.raises(InvalidToken):
        s.decrypt(K, token, footer=b"another")
    assert compared == [(b"footer", b"another")]

    keystore = s.Keystore(tmp_path / "gw.db")
    keystore.add_tenant("acme")
    right = pyotp.TOTP(keystore.otp_enroll("acme")).at(IAT)
    compared.clear()
    assert not keystore.check_otp("acme", "000000" if right != "000000" else "111111", IAT)
    assert compared and all(len(a) == 6 for a, _ in compared)  # one per time step tried


@pytest.mark.parametrize(
    ("direction", "payload"),
    [
        ("c2s", b'{"jti":"\xc8"}'),  # bad UTF-8 inside a string
        ("c2s", b'{"\xff":1}'),
        ("s2c", b'{"jti":"%s","rk":{"kid":"\xc8\xdf"}}' % JTI.encode()),
    ],
)
def test_payload_with_bad_utf8_is_invalid_token(direction: str, payload: bytes) -> None:
    # msgspec raises UnicodeDecodeError here, not DecodeError: it escaped open_token, so a key
    # holder could make the server's middleware fail with a 500 (and a server, a client's check).
    implicit = request_implicit()
    key = s.DirectionKey(K, direction, TID, KID)
    with pytest.raises(InvalidToken):
        s.open_token(key, forge(direction, TID, KID, IAT, payload, implicit), implicit)
