"""STT1 security: the token envelope (PROTOCOL.md sections 1 and 2).

One flat module, read top to bottom, in banner sections: envelope, then (appended later)
keystore, replay stores, middleware, CLI helpers.

The envelope is an unmodified PASETO v3.local token (HKDF-SHA384, AES-256-CTR,
HMAC-SHA384) under a per-time-step key derived from the credential secret K. Every failure to
read a token is one opaque ``InvalidToken``: callers and peers never learn which check failed.
Nothing in this section reads the clock; time comes in as ``iat`` or ``step`` parameters.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, NamedTuple, NoReturn

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as _rust_openssl
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DIRECTIONS",
    "MAX_PAYLOAD_BYTES",
    "MAX_TOKEN_CHARS",
    "STEP_SECONDS",
    "DirectionKey",
    "Footer",
    "InvalidToken",
    "Opened",
    "RequestClaims",
    "ResponseClaims",
    "RotatedKey",
    "UnverifiedToken",
    "b64decode",
    "b64encode",
    "build_footer",
    "decrypt",
    "direction_key",
    "encrypt",
    "mint",
    "new_jti",
    "open_token",
    "pae",
    "parse",
    "parse_footer",
    "request_assertion",
    "response_assertion",
    "split",
    "step_key",
    "time_step",
]


#### Envelope


class InvalidToken(Exception):
    """Any token that cannot be accepted, for whatever reason.

    Deliberately carries no message and no cause: which check failed is an oracle for an
    attacker. Log the reason at the call site if it is needed, never in the response.
    """

    def __init__(self) -> None:
        super().__init__()


# -- Canonical base64url ------------------------------------------------------------------
# PASETO uses RFC 4648 base64url without padding. Python's own decoders are lenient
# (they skip junk, accept padding, ignore trailing bits), so a token would have several
# spellings that all verify. We accept exactly one spelling per byte string.

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_STD_TO_URL = bytes.maketrans(b"+/", b"-_")
_PADDING = (b"", b"", b"==", b"=")
# The last character of a 2- or 3-character final group carries 4 or 2 unused bits, which
# must be zero: only characters whose alphabet index is a multiple of 16 (resp. 4) qualify.
_LAST_CHAR_OK = (
    b"",
    b"",
    bytes(c for i, c in enumerate(_B64_ALPHABET) if i % 16 == 0),
    bytes(c for i, c in enumerate(_B64_ALPHABET) if i % 4 == 0),
)


def b64encode(data: bytes) -> str:
    """Encode as unpadded base64url, the only spelling ``b64decode`` accepts."""
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_STD_TO_URL).decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode canonical unpadded base64url; raise ValueError for any other spelling.

    Refuses padding, characters outside ``[A-Za-z0-9_-]``, a length of 1 mod 4 and non-zero
    unused trailing bits, so that no two strings decode to the same bytes.
    """
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not canonical base64url")
    raw = text.encode("ascii")
    rem = len(raw) % 4
    # translate(None, alphabet) deletes every valid character: anything left is invalid.
    if rem == 1 or raw.translate(None, _B64_ALPHABET) or (rem and raw[-1] not in _LAST_CHAR_OK[rem]):
        raise ValueError("not canonical base64url")
    try:
        return binascii.a2b_base64(raw.translate(_URL_TO_STD) + _PADDING[rem], strict_mode=True)
    except binascii.Error:
        raise ValueError("not canonical base64url") from None


# -- PAE -----------------------------------------------------------------------------------

# PASETO clears the top bit of each length for languages without uint64; a Python length
# never reaches 2**63, so that is a no-op here.
_LE64 = struct.Struct("<Q").pack


def pae(*pieces: bytes) -> bytes:
    """PASETO pre-authentication encoding: lengths first, so no two piece lists collide.

    Used for the PASETO MAC input and for STT1's implicit assertions; never concatenate
    authenticated fields by hand. Pieces must be bytes (str raises TypeError). The hot paths
    (_mac_input, the assertions) write it out with the pieces that never change encoded once;
    the official and STT1 vectors pin them to this.
    """
    encoded = [_LE64(len(pieces))]
    for piece in pieces:
        encoded += (_LE64(len(piece)), piece)
    return b"".join(encoded)


def _pae_head(count: int, *first: bytes) -> bytes:
    """The start of pae() over ``count`` pieces, up to the end of ``first``: for a hot path whose
    first pieces never change, so it appends only the rest."""
    return _LE64(count) + pae(*first)[8:]


# -- PASETO v3.local -----------------------------------------------------------------------

_HEADER = "v3.local."
_HEADER_BYTES = b"v3.local."
_KEY_LEN = 32
_NONCE_LEN = 32
_TAG_LEN = 48
# HKDF with an empty salt uses HashLen zero bytes (RFC 5869 2.2).
_ZERO_SALT = bytes(48)
_INFO_ENC = b"paseto-encryption-key"
_INFO_AUTH = b"paseto-auth-key-for-aead"
_create_encryption_ctx = _rust_openssl.ciphers.create_encryption_ctx


# RFC 2104 pads. Python's hmac module does the same; we keep the two keyed states ourselves
# because copying two hash objects is cheaper than copying an hmac.HMAC (see _LocalKey).
_TRANS_36 = bytes(x ^ 0x36 for x in range(256))
_TRANS_5C = bytes(x ^ 0x5C for x in range(256))
_SHA384_BLOCK = 128


class _LocalKey:
    """A v3.local key, kept as its HKDF pseudo-random key with HMAC already keyed.

    HKDF-SHA384 with an empty salt and L = 48 is one HMAC (Extract) that depends only on the
    key, then one HMAC block (Expand) per derivation. Extracting once per key and resuming
    from the pre-hashed HMAC pad blocks makes the two per-token derivations cheap; the
    official vectors and a cross-check against ``hmac`` pin the result to the standard.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != _KEY_LEN:
            raise ValueError("a v3.local key is exactly 32 bytes")
        block = hmac.digest(_ZERO_SALT, key, "sha384").ljust(_SHA384_BLOCK, b"\x00")
        self._inner = hashlib.sha384(block.translate(_TRANS_36))
        self._outer = hashlib.sha384(block.translate(_TRANS_5C))

    def __repr__(self) -> str:
        return "<v3.local key>"

    def _derive(self, info: bytes) -> bytes:
        # T(1) = HMAC(PRK, info || 0x01): 48 bytes is exactly one Expand block.
        inner = self._inner.copy()
        inner.update(info + b"\x01")
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def encryption_key(self, nonce: bytes) -> tuple[bytes, bytes]:
        tmp = self._derive(_INFO_ENC + nonce)
        return tmp[:32], tmp[32:]

    def auth_key(self, nonce: bytes) -> bytes:
        return self._derive(_INFO_AUTH + nonce)


def _hmac_sha384(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA384 for a key of at most one block, as RFC 2104 writes it.

    Same result as hmac.digest (the official vectors pin it), about 0.8 us cheaper: hmac.digest
    looks the hash up by name in OpenSSL on every call, which under load cost more still.
    """
    block = key.ljust(_SHA384_BLOCK, b"\x00")
    inner = hashlib.sha384(block.translate(_TRANS_36) + message).digest()
    return hashlib.sha384(block.translate(_TRANS_5C) + inner).digest()


def _aes_ctr(key: bytes, counter: bytes, data: bytes) -> bytes:
    """AES-256-CTR; CTR is its own inverse, so the same call encrypts and decrypts.

    ``Cipher(AES(key), CTR(counter)).encryptor()`` is cryptography's own call below after
    type checks that cost more than the AES itself (ten ABC isinstance checks, about 1.5 us
    of a 4.5 us call, twice per request). AES() still checks the key; the counter's length,
    which Cipher checks and the binding does not (it panics), is checked here. The pinned
    version, the official vectors and a cross-check against Cipher keep it honest.
    """
    if len(counter) != 16:
        raise ValueError("an AES-CTR counter block is 16 bytes")
    ctx = _create_encryption_ctx(algorithms.AES(key), modes.CTR(counter))
    return ctx.update(data) + ctx.finalize()


# PAE(h, n, c, f, i), the v3.local MAC input, up to n: the count, h and n's length never change.
_MAC_PREFIX = _LE64(5) + _LE64(len(_HEADER_BYTES)) + _HEADER_BYTES + _LE64(_NONCE_LEN)


def _mac_input(nonce: bytes, c: bytes, footer: bytes, implicit: bytes) -> bytes:
    return b"".join((_MAC_PREFIX, nonce, _LE64(len(c)), c, _LE64(len(footer)), footer, _LE64(len(implicit)), implicit))


def _seal(
    key: _LocalKey, payload: bytes, footer: bytes, implicit: bytes, nonce: bytes | None, footer_text: str = ""
) -> str:
    if nonce is None:
        nonce = os.urandom(_NONCE_LEN)
    elif not isinstance(nonce, bytes) or len(nonce) != _NONCE_LEN:
        raise ValueError("a v3.local nonce is exactly 32 bytes")
    ek, n2 = key.encryption_key(nonce)
    c = _aes_ctr(ek, n2, payload)
    tag = _hmac_sha384(key.auth_key(nonce), _mac_input(nonce, c, footer, implicit))
    token = _HEADER + b64encode(nonce + c + tag)
    if footer:
        token += "." + (footer_text or b64encode(footer))
    return token


def _unseal(key: _LocalKey, body: bytes, footer: bytes, implicit: bytes) -> bytes:
    nonce, c, tag = body[:_NONCE_LEN], body[_NONCE_LEN:-_TAG_LEN], body[-_TAG_LEN:]
    expected = _hmac_sha384(key.auth_key(nonce), _mac_input(nonce, c, footer, implicit))
    # Constant-time compare, and nothing is decrypted (or even key-split for encryption)
    # until the tag is good.
    if not hmac.compare_digest(tag, expected):
        raise InvalidToken()
    ek, n2 = key.encryption_key(nonce)
    return _aes_ctr(ek, n2, c)


def split(token: str) -> tuple[bytes, bytes]:
    """Check a v3.local token's shape and decode it, before any key is involved.

    Returns ``(nonce || ciphertext || tag, footer)``, footer ``b""`` when absent. The footer
    is NOT authenticated yet: use it only to choose a key. Accepts exactly ``v3.local.<b64>``
    or ``v3.local.<b64>.<b64>`` with a non-empty footer, in canonical base64url.
    """
    if not isinstance(token, str) or not token.startswith(_HEADER):
        raise InvalidToken()
    parts = token[len(_HEADER) :].split(".")
    try:
        if len(parts) == 1:
            body, footer = b64decode(parts[0]), b""
        elif len(parts) == 2 and parts[1]:
            # An empty footer is written without its dot, so "<b64>." is another spelling.
            body, footer = b64decode(parts[0]), b64decode(parts[1])
        else:
            raise InvalidToken()
    except ValueError:
        raise InvalidToken() from None
    if len(body) < _NONCE_LEN + _TAG_LEN:
        raise InvalidToken()
    return body, footer


def encrypt(key: bytes, payload: bytes, footer: bytes = b"", implicit: bytes = b"", nonce: bytes | None = None) -> str:
    """PASETO v3.local Encrypt.

    ``nonce`` exists for test vectors only. Reusing a nonce under one key reveals the XOR of
    the two plaintexts: in real use leave it None (32 bytes from the OS CSPRNG).
    Raises ValueError for a key or nonce of the wrong length (a programming error).
    """
    return _seal(_LocalKey(key), payload, footer, implicit, nonce)


def decrypt(key: bytes, token: str, footer: bytes | None = None, implicit: bytes = b"") -> bytes:
    """PASETO v3.local Decrypt: verify the tag in constant time, then decrypt.

    With ``footer`` given, the token's footer must equal it (constant-time); with None any
    footer is accepted, and authenticated by the tag. Every failure, including a key of the
    wrong length (a public key passed by mistake, say), is ``InvalidToken``.
    """
    body, got_footer = split(token)
    if footer is not None and not hmac.compare_digest(got_footer, footer):
        raise InvalidToken()
    try:
        local_key = _LocalKey(key)
    except ValueError:
        raise InvalidToken() from None
    return _unseal(local_key, body, got_footer, implicit)


# -- STT1 keys ---------------------------------------------------------------------------

DIRECTIONS = ("c2s", "s2c")
STEP_SECONDS = 30
MAX_PAYLOAD_BYTES = 512
# Same bound as the Authorization header check (PROTOCOL.md 3.1); a legal token is ~900.
MAX_TOKEN_CHARS = 1024

_MAX_IAT = 9_999_999_999
_TID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# 16 bytes in canonical base64url: 22 characters, the last one with 4 zero unused bits.
_B64_16 = "[A-Za-z0-9_-]{21}[AQgw]"
_KID_RE = re.compile(_B64_16)
_FOOTER_RE = re.compile(r"(c2s|s2c)\.([a-z0-9][a-z0-9-]{0,31})\.(" + _B64_16 + r")\.([0-9]{10})")


def _check_ids(direction: str, tid: str, kid: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError("direction must be 'c2s' or 's2c'")
    if not isinstance(tid, str) or not _TID_RE.fullmatch(tid):
        raise ValueError(f"bad tid {tid!r}")
    if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
        raise ValueError(f"bad kid {kid!r}")


def direction_key(k: bytes, direction: str, tid: str, kid: str) -> bytes:
    """K_dir = HKDF-SHA384(K, info="stt1 dirkey" 0 dir 0 tid 0 kid, L=32).

    Binding direction, tenant and key id into the key means a token can never be replayed
    the other way, for another tenant or under another kid, even if every other check failed.
    """
    if not isinstance(k, bytes) or len(k) != 32:
        raise ValueError("K is exactly 32 bytes")
    _check_ids(direction, tid, kid)
    info = b"stt1 dirkey\x00" + direction.encode() + b"\x00" + tid.encode() + b"\x00" + kid.encode()
    prk = hmac.digest(_ZERO_SALT, k, "sha384")
    return hmac.digest(prk, info + b"\x01", "sha384")[:32]


def time_step(iat: int) -> int:
    """The step T a token issued at ``iat`` (Unix seconds) is keyed by."""
    return iat // STEP_SECONDS


def step_key(k_dir: bytes, step: int) -> bytes:
    """K_T = HMAC-SHA384(K_dir, "stt1 step" 0 uint64_be(T))[:32], with T = ``time_step(iat)``.

    Takes the step T, not iat. A stolen K_T is only good for its own 30-second step.
    """
    if not isinstance(k_dir, bytes) or len(k_dir) != 32:
        raise ValueError("K_dir is exactly 32 bytes")
    if not 0 <= step < 1 << 64:
        raise ValueError("step out of range")
    return hmac.digest(k_dir, b"stt1 step\x00" + step.to_bytes(8, "big"), "sha384")[:32]


class DirectionKey:
    """K_dir for one (direction, tid, kid), with the step keys it recently used.

    Build one per credential and direction, and keep it with the credential: it costs two
    HMACs to build, and caching per step saves the step-key and HKDF-Extract HMACs on every
    later token of the same 30 s step. The secret never appears in its repr, and pickling
    (which would write it out) is refused.
    """

    __slots__ = ("_footer", "_footer_prefix", "_ids", "_k_dir", "_steps")

    # A +-45 s window touches at most 4 steps; a few more cover mint and open in one process.
    _MAX_STEPS = 8

    def __init__(self, k: bytes, direction: str, tid: str, kid: str) -> None:
        self._k_dir = direction_key(k, direction, tid, kid)
        # Read-only: the ids are what K_dir is bound to, so they must not drift from it.
        self._ids = (direction, tid, kid)
        self._footer_prefix = f"{direction}.{tid}.{kid}.".encode("ascii")
        self._footer = (-1, b"", "")  # (iat, footer, its base64url): the last one minted
        self._steps: dict[int, _LocalKey] = {}

    @property
    def direction(self) -> str:
        return self._ids[0]

    @property
    def tid(self) -> str:
        return self._ids[1]

    @property
    def kid(self) -> str:
        return self._ids[2]

    def __repr__(self) -> str:
        return f"DirectionKey({self.direction!r}, tid={self.tid!r}, kid={self.kid!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("DirectionKey holds a secret and cannot be pickled or copied")

    def _local_key(self, step: int) -> _LocalKey:
        local_key = self._steps.get(step)
        if local_key is None:
            if len(self._steps) >= self._MAX_STEPS:
                self._steps.clear()  # rare, and a racing thread at worst derives twice
            local_key = self._steps[step] = _LocalKey(step_key(self._k_dir, step))
        return local_key


# -- STT1 footer ---------------------------------------------------------------------------


class Footer(NamedTuple):
    """The readable, authenticated footer ``dir.tid.kid.iat``."""

    direction: str
    tid: str
    kid: str
    iat: int


def build_footer(direction: str, tid: str, kid: str, iat: int) -> bytes:
    """The footer bytes; ValueError for anything ``parse_footer`` would refuse."""
    _check_ids(direction, tid, kid)
    if not isinstance(iat, int) or isinstance(iat, bool) or not 0 <= iat <= _MAX_IAT:
        raise ValueError("iat must fit in 10 decimal digits")
    return f"{direction}.{tid}.{kid}.{iat:010d}".encode("ascii")


def parse_footer(raw: bytes) -> Footer:
    """Parse ``dir.tid.kid.iat`` strictly; anything else is InvalidToken."""
    # latin-1 never fails to decode, and the pattern only matches ASCII anyway.
    match = _FOOTER_RE.fullmatch(raw.decode("latin-1"))
    if match is None:
        raise InvalidToken()
    direction, tid, kid, iat = match.groups()
    return Footer(direction, tid, kid, int(iat))


# -- STT1 implicit assertions --------------------------------------------------------------


_DIGEST_LEN = _LE64(32)  # the SHA-256 piece's length


@functools.lru_cache(maxsize=64)
def _assertion_head(direction: bytes, aud: str) -> bytes:
    """PAE("stt1", dir, AUD, ...four more) up to its fourth piece: the same for every token."""
    return _pae_head(7, b"stt1", direction, aud.encode())


def request_assertion(aud: str, method: str, target: bytes, content_type: bytes, body: bytes) -> bytes:
    """Bind a request token to this gateway, method, raw target, content type and body.

    Never sent, so both sides must build it from the same bytes: ``aud`` is the configured
    public origin (never the Host header), ``target`` the raw path plus ``?query`` exactly as
    on the request line, ``content_type`` the raw header value or b"".
    PAE("stt1", "c2s", AUD, METHOD, TARGET, CONTENT_TYPE, SHA256(body)).
    """
    head, m, ct = _assertion_head(b"c2s", aud), method.encode(), content_type
    digest = hashlib.sha256(body).digest()
    return b"".join((head, _LE64(len(m)), m, _LE64(len(target)), target, _LE64(len(ct)), ct, _DIGEST_LEN, digest))


def response_assertion(aud: str, request_jti: str, status: int, content_type: bytes, body: bytes) -> bytes:
    """Bind a response token to the request it answers (its jti), status, type and body.

    PAE("stt1", "s2c", AUD, REQUEST_JTI, STATUS, CONTENT_TYPE, SHA256(body)).
    """
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    head, jti, code, ct = _assertion_head(b"s2c", aud), request_jti.encode(), b"%d" % status, content_type
    digest = hashlib.sha256(body).digest()
    return b"".join((head, _LE64(len(jti)), jti, _LE64(len(code)), code, _LE64(len(ct)), ct, _DIGEST_LEN, digest))


# -- STT1 payloads -------------------------------------------------------------------------
# Length bounds as well as anchored patterns: msgspec searches with re, where "$" also
# matches before a final newline.
_Id16 = Annotated[str, msgspec.Meta(min_length=22, max_length=22, pattern=f"^{_B64_16}$")]
_Key32 = Annotated[str, msgspec.Meta(min_length=43, max_length=43, pattern="^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$")]
_Otp = Annotated[str, msgspec.Meta(min_length=6, max_length=6, pattern="^[0-9]{6}$")]


class RotatedKey(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A new credential (kid', K') delivered inside an s2c payload during rotation."""

    kid: _Id16
    k: _Key32

    def __repr__(self) -> str:
        return f"RotatedKey(kid={self.kid!r}, k=<hidden>)"


class RequestClaims(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """c2s payload. ``otp`` is absent unless the function needs a second factor."""

    jti: _Id16
    otp: _Otp | msgspec.UnsetType = msgspec.UNSET


class ResponseClaims(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """s2c payload. ``rk`` is absent unless a rotation is pending."""

    jti: _Id16
    rk: RotatedKey | msgspec.UnsetType = msgspec.UNSET


_ENCODE = msgspec.json.Encoder().encode
# Strict: no str-to-number coercion, unknown fields refused; null is not "absent".
_DECODE_REQUEST = msgspec.json.Decoder(RequestClaims, strict=True).decode
_DECODE_RESPONSE = msgspec.json.Decoder(ResponseClaims, strict=True).decode


def new_jti() -> str:
    """A fresh token id: 16 bytes from the OS CSPRNG, 22 base64url characters."""
    return b64encode(os.urandom(16))


def new_kid() -> str:
    """A fresh key id, as a jti but never starting with "-": a kid is typed on command lines
    (`tenant revoke KID`), where argparse took one such kid in 64 for an option."""
    while (kid := new_jti()).startswith("-"):
        pass
    return kid


# -- STT1 tokens ---------------------------------------------------------------------------


class UnverifiedToken:
    """A token whose shape and footer are valid and whose tag is NOT yet checked.

    Only ``parse`` makes one. Its footer may be used to find the key and check the time,
    nothing else, until ``open_token`` has verified it.
    """

    __slots__ = ("_body", "_raw_footer", "footer")

    def __init__(self, footer: Footer, body: bytes, raw_footer: bytes) -> None:
        self.footer = footer
        self._body = body
        self._raw_footer = raw_footer

    def __repr__(self) -> str:
        return f"UnverifiedToken({self.footer!r})"


class Opened(NamedTuple):
    """A verified token: its authenticated footer and its decoded claims."""

    footer: Footer
    claims: RequestClaims | ResponseClaims


# Footers already parsed, by their base64url text: every token of a client in the same second
# carries the same one. Only footers that parsed go in; the dict is emptied when full.
_FOOTERS: dict[str, tuple[Footer, bytes]] = {}
_MAX_FOOTERS = 4096


def parse(token: str) -> UnverifiedToken:
    """Check a token's shape and footer without any key: the cheap first step on a server.

    Refuses anything over MAX_TOKEN_CHARS, any other version or purpose, a missing footer
    and any footer that is not exactly ``dir.tid.kid.<10 digits>``. The same checks as
    ``split`` and ``parse_footer``, with the footer's result remembered.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.startswith(_HEADER):
        raise InvalidToken()
    parts = token[len(_HEADER) :].split(".")
    if len(parts) != 2:
        raise InvalidToken()
    known = _FOOTERS.get(parts[1])
    try:
        if known is None:
            raw_footer = b64decode(parts[1])
            known = (parse_footer(raw_footer), raw_footer)
            if len(_FOOTERS) >= _MAX_FOOTERS:
                _FOOTERS.clear()
            _FOOTERS[parts[1]] = known
        body = b64decode(parts[0])
    except ValueError:
        raise InvalidToken() from None
    if len(body) < _NONCE_LEN + _TAG_LEN:
        raise InvalidToken()
    return UnverifiedToken(known[0], body, known[1])


def mint(
    key: DirectionKey,
    iat: int,
    claims: RequestClaims | ResponseClaims,
    implicit: bytes,
    nonce: bytes | None = None,
) -> str:
    """Make a token in ``key``'s direction, issued at ``iat``, bound to ``implicit``.

    The claims type must match the direction. The payload is checked against the same strict
    decoder the peer uses, so we never mint a token we would refuse. ``nonce`` is for test
    vectors only: never reuse one.
    """
    request = key.direction == "c2s"
    if type(claims) is not (RequestClaims if request else ResponseClaims):
        raise TypeError(f"a {key.direction} token carries {'Request' if request else 'Response'}Claims")
    payload = _ENCODE(claims)
    try:
        (_DECODE_REQUEST if request else _DECODE_RESPONSE)(payload)
    except msgspec.ValidationError as err:
        raise ValueError(f"claims refused: {err}") from None  # msgspec names the field, not the value
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError("payload over MAX_PAYLOAD_BYTES")
    if not isinstance(iat, int) or isinstance(iat, bool) or not 0 <= iat <= _MAX_IAT:
        raise ValueError("iat must fit in 10 decimal digits")
    footer = key._footer
    if footer[0] != iat:  # a new second: every token of the last one shared its footer
        raw = key._footer_prefix + b"%010d" % iat  # the ids were checked when key was built
        footer = key._footer = (iat, raw, b64encode(raw))
    return _seal(key._local_key(time_step(iat)), payload, footer[1], implicit, nonce, footer[2])


def open_token(key: DirectionKey, token: str | UnverifiedToken, implicit: bytes) -> Opened:
    """Verify and decrypt a token made with ``key``, bound to ``implicit``; decode its claims.

    Accepts the ``UnverifiedToken`` a server already parsed (no second parse) or a raw
    string. The footer must name exactly ``key``'s direction, tid and kid. Checking iat
    against the clock is the caller's job, and must happen before (PROTOCOL.md 3.3).
    """
    parsed = token if isinstance(token, UnverifiedToken) else parse(token)
    footer = parsed.footer
    if footer[:3] != key._ids:
        raise InvalidToken()
    payload = _unseal(key._local_key(time_step(footer.iat)), parsed._body, parsed._raw_footer, implicit)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidToken()
    decode = _DECODE_REQUEST if key.direction == "c2s" else _DECODE_RESPONSE
    try:
        claims = decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        # msgspec reports bad UTF-8 inside a JSON string as UnicodeDecodeError, not DecodeError.
        raise InvalidToken() from None
    return Opened(footer, claims)


#### Credential files


class Credential(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """A client's credential file (PROTOCOL.md 1): who it is, where, and its secret.

    ``next`` holds a rotated key between receiving it and the first verified response under
    it (PROTOCOL.md 5.3); both keys must survive a crash in between, hence the file.
    """

    stt: Annotated[int, msgspec.Meta(ge=1, le=1)]
    url: str
    tid: Annotated[str, msgspec.Meta(pattern="^[a-z0-9][a-z0-9-]{0,31}$")]
    kid: _Id16
    k: _Key32
    next: RotatedKey | msgspec.UnsetType = msgspec.UNSET

    def __repr__(self) -> str:
        return f"Credential(url={self.url!r}, tid={self.tid!r}, kid={self.kid!r}, k=<hidden>)"

    @property
    def secret(self) -> bytes:
        return b64decode(self.k)


def read_credential(path: str | os.PathLike[str]) -> Credential:
    """Load and strictly validate a credential file; ValueError says what is wrong with it."""
    with open(path, "rb") as file:
        raw = file.read()
    try:
        return msgspec.json.decode(raw, type=Credential)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"{os.fspath(path)} is not an STT1 credential file: {exc}") from None


def write_credential(path: str | os.PathLike[str], credential: Credential) -> None:
    """Write atomically with mode 0600: a crash leaves the old file or the new one, never half.

    The temporary file is created 0600 from the start (never world-readable for a moment),
    fsynced, renamed over the old file, and the directory fsynced so the rename is durable.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.{new_jti()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(msgspec.json.format(msgspec.json.encode(credential)) + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


#### Keystore
# SQLite (WAL) holds tenants and their credentials; every change is one transaction. K is
# stored encrypted (AES-GCM under a master key, bound to its tid and kid as associated data),
# so a copied database file alone does not give away a single key. The request path never
# touches the file: it reads a KeyCache, rebuilt when PRAGMA data_version says another
# connection (the CLI, another worker) committed a change, checked at most once a second.
#
# Rotation across workers and hosts: a pending successor is offered as ``rk`` only from
# ROTATION_SETTLE seconds after it was made. The client switches to the new kid at its very next
# call, which may reach another worker or host; by then every cache still in use holds the new
# kid (a SQLite cache is at most CHECK_SECONDS old, a Redis one at most MAX_STALE), so that call
# is never a 401 for an unknown kid.

GRACE_SECONDS = 600  # how long the old kid keeps working after its successor's first use
CHECK_SECONDS = 1.0  # how often a cache asks its store whether anything changed
# A Redis keystore's cache is refreshed in the background; past this age without a successful
# check the request path refuses (503) instead of trusting it: a revoked key stops working
# within MAX_STALE seconds even while Redis hangs.
MAX_STALE = 5.0
# MAX_STALE, plus 1 s because `created` is a whole second, plus a few seconds of clock difference
# between hosts: after this long every serving cache knows a successor made at `created`.
ROTATION_SETTLE = 10
ADMIN_WAIT = 5.0  # seconds an admin change waits for another connection's write lock
REQUEST_WAIT = 0.1  # ... and a change made on the request path (promotion, OTP), which holds up the worker

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    tid TEXT PRIMARY KEY,
    created INTEGER NOT NULL,
    functions TEXT,                      -- JSON list of names, NULL: every function
    otp_secret BLOB,                     -- encrypted pyotp base32 secret, NULL: not enrolled
    otp_last INTEGER NOT NULL DEFAULT -1 -- last accepted TOTP timecode (RFC 6238 5.2)
);
CREATE TABLE IF NOT EXISTS credentials (
    kid TEXT PRIMARY KEY,
    tid TEXT NOT NULL REFERENCES tenants(tid) ON DELETE CASCADE,
    secret BLOB NOT NULL,                -- AES-GCM nonce || ciphertext of K
    state TEXT NOT NULL CHECK (state IN ('active', 'pending', 'retiring', 'retired')),
    created INTEGER NOT NULL,
    parent TEXT,                         -- for a pending credential: the kid it replaces
    retire_at INTEGER                    -- for a retiring credential: end of its grace period
);
CREATE UNIQUE INDEX IF NOT EXISTS one_pending_per_credential ON credentials(parent) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS otp_failures (  -- only tenants with wrong codes in a row (see OtpLocked)
    tid TEXT PRIMARY KEY REFERENCES tenants(tid) ON DELETE CASCADE,
    failures INTEGER NOT NULL,
    locked_until REAL NOT NULL           -- no code is checked before this time
);
"""

# RFC 6238 leaves guessing to RFC 4226 7.3: the server must detect and stop it. Six digits with one
# step of drift either way give a guess 3 chances in 10^6: unthrottled, whoever steals K could
# find a code in under a minute at this gateway's request rate, and the second factor would be
# worth nothing. So the OTP_LOCK_AFTER-th wrong code in a row locks the tenant's authenticator
# for OTP_LOCK_SECONDS, each further one for twice as long as the last, up to a day; while it is
# locked no code is checked at all, and a right code clears the count. That leaves a thief
# about 15 guesses in the first day and one a day after. The count lives in the keystore, so
# every worker and host shares it and a restart does not reset it. Only a caller holding the
# tenant's K can send a code at all, so no one else can lock a tenant out.
OTP_LOCK_AFTER = 5
OTP_LOCK_SECONDS = 60
OTP_MAX_LOCK_SECONDS = 86400


class OtpLocked(Exception):
    """Too many wrong authenticator codes in a row: no code is checked for ``retry_after`` s."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"authenticator locked for {retry_after:.0f} s after too many wrong codes")
        self.retry_after = retry_after


def _otp_locked_until(tid: str, failures: int, now: float) -> float:
    """When the authenticator may be tried again after ``failures`` wrong codes in a row.

    Each lock is logged once, when it starts: the attempts it refuses are not, so a caller
    hammering a locked authenticator cannot flood the log.
    """
    over = failures - OTP_LOCK_AFTER
    if over < 0:
        return 0.0
    seconds = min(OTP_MAX_LOCK_SECONDS, OTP_LOCK_SECONDS << min(over, 16))
    log.warning("ALERT tenant %s: %d wrong authenticator codes in a row; locked for %d s", tid, failures, seconds)
    return now + seconds


def _otp_timecode(secret: str, code: str, now: float) -> int | None:
    """The TOTP timecode ``code`` belongs to, with one step of drift either way, or None.

    Every candidate is compared, in constant time, so the time taken says nothing either.
    """
    import pyotp

    totp = pyotp.TOTP(secret)
    current = totp.timecode(now)
    matched = None
    for timecode in (current - 1, current, current + 1):
        if hmac.compare_digest(totp.generate_otp(timecode).encode(), code.encode()) and matched is None:
            matched = timecode
    return matched


def load_master_key(db_path: str | os.PathLike[str], may_create: bool = True) -> bytes:
    """The key that encrypts credentials at rest.

    From GATEWAY_MASTER_KEY (base64url of 32 bytes) when set, so it can live in a secret
    manager; otherwise from ``<db>.key``, created with mode 0600 only when ``may_create`` (the
    keystore holds no credential yet). Losing it makes every stored credential unreadable:
    back it up apart from the database. A new key beside credentials sealed under the old one
    would make that silent and permanent, so then this refuses instead.
    """
    from_env = _master_key_from_env()
    if from_env is not None:
        return from_env
    path = f"{os.fspath(db_path)}.key"
    existing = _read_master_key(path)
    if existing is not None:
        return existing
    if not may_create:
        raise ValueError(
            f"no master key: {path} is missing and GATEWAY_MASTER_KEY is not set, but the keystore "
            "holds credentials (or cannot be read to tell): restore the key file or set the variable. "
            "A new key would leave every stored credential unreadable"
        )
    # Whole or not at all: a crash or a full disk between creating the file and writing it
    # would leave an empty key file that every later start refuses. So the key is written to a
    # temporary file, synced, and linked into place, which fails if another process won.
    key = os.urandom(32)
    tmp = f"{path}.{os.getpid()}.{new_jti()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(b64encode(key).encode("ascii") + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return _read_master_key(path) or key  # another process made it first: that one counts
    finally:
        os.unlink(tmp)
    return key


def _master_key_from_env() -> bytes | None:
    """GATEWAY_MASTER_KEY decoded, None when unset; ValueError when it is not 32 bytes."""
    from_env = os.environ.get("GATEWAY_MASTER_KEY")
    if not from_env:
        return None
    try:
        key = b64decode(from_env.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError("GATEWAY_MASTER_KEY must be the base64url of 32 random bytes")
    return key


def _read_master_key(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            text = file.read()
    except FileNotFoundError:
        return None
    try:
        key = b64decode(text.decode("ascii").strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a 32-byte master key")
    return key


class CachedKey:
    """One credential as the request path needs it: both direction keys, ready to use."""

    __slots__ = ("c2s", "kid", "retire_at", "rk", "rk_from", "s2c", "state", "tid")

    def __init__(self, tid: str, kid: str, k: bytes, state: str, retire_at: int | None) -> None:
        self.tid, self.kid, self.state, self.retire_at = tid, kid, state, retire_at
        self.c2s = DirectionKey(k, "c2s", tid, kid)
        self.s2c = DirectionKey(k, "s2c", tid, kid)
        self.rk: RotatedKey | None = None  # set on an active key whose successor is pending
        # When rk may first be sent: its `created` + ROTATION_SETTLE, so that every worker's and
        # host's cache knows the new kid before a client can switch to it (see ROTATION_SETTLE).
        self.rk_from = 0.0

    def offered_rk(self, now: float) -> RotatedKey | None:
        """The successor to send in an answer at ``now`` (server clock), once it has settled."""
        return self.rk if self.rk is not None and now >= self.rk_from else None

    def __repr__(self) -> str:
        return f"CachedKey(tid={self.tid!r}, kid={self.kid!r}, state={self.state!r})"

    def usable(self, now: float) -> bool:
        if self.state == "retiring":
            return self.retire_at is not None and now < self.retire_at
        return self.state in ("active", "pending")


class KeyCache:
    """An immutable snapshot of the keystore: swapped whole, never edited in place."""

    def __init__(
        self,
        keys: dict[tuple[str, str], CachedKey],
        functions: dict[str, frozenset[str] | None],
        retired: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self.keys = keys
        self.functions = functions
        self.retired = retired  # (tid, kid): only to tell an ALERT from an unknown kid, never a key


class Keystore:
    """Tenants and credentials in SQLite; admin changes are one transaction each."""

    def __init__(
        self, path: str | os.PathLike[str], master_key: bytes | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = os.fspath(path)
        self.clock = clock
        if master_key is None:
            # A bad GATEWAY_MASTER_KEY is refused before anything is created: a command that
            # failed on it left an empty keystore file, which the next one took for a keystore.
            master_key = _master_key_from_env()
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite's -wal/-shm follow its mode
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=ADMIN_WAIT)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # keys are few and precious: every commit durable
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        sealed = self._db.execute("SELECT tid, kid, secret FROM credentials LIMIT 1").fetchone()
        self._aead = AESGCM(master_key if master_key is not None else load_master_key(self.path, sealed is None))
        self._check_master_key(sealed)
        self._init_cache()
        self._cache: KeyCache | None = None  # the request path's view (see snapshot)
        self._checked = 0.0  # when data_version was last read

    def _check_master_key(self, sealed: tuple[str, str, bytes] | None) -> None:
        """Open one stored credential now: a wrong master key is refused at start, in words,
        not found later as a failure of every call."""
        if sealed is None:
            return
        tid, kid, secret = sealed
        try:
            self._open("key", f"{tid}\x00{kid}", secret)
        except InvalidTag:
            raise ValueError(
                f"the master key does not open the credentials in {self.path}: "
                "a wrong GATEWAY_MASTER_KEY, or the key file of another keystore?"
            ) from None

    def _init_cache(self) -> None:
        """What both backends' caches need; each keeps its cache its own way (see snapshot)."""
        self._lock = threading.RLock()
        self._version: object = None  # the store's change counter the cache was built at

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self, wait: float = ADMIN_WAIT) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if wait != ADMIN_WAIT:
                self._db.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            finally:
                if wait != ADMIN_WAIT:
                    self._db.execute(f"PRAGMA busy_timeout = {int(ADMIN_WAIT * 1000)}")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) may leave it open
                    self._db.execute("ROLLBACK")
                raise
            self._cache = None  # our own commits do not move data_version: drop the cache now

    # -- secrets at rest

    def _seal(self, purpose: str, ids: str, secret: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, secret, f"stt1 {purpose}\x00{ids}".encode())

    def _open(self, purpose: str, ids: str, sealed: bytes) -> bytes:
        return self._aead.decrypt(sealed[:12], sealed[12:], f"stt1 {purpose}\x00{ids}".encode())

    # -- administration

    def add_tenant(self, tid: str, functions: list[str] | None = None) -> tuple[str, bytes]:
        """Create a tenant with its first credential; returns (kid, K)."""
        if not _TID_RE.fullmatch(tid):
            raise ValueError(f"tenant name {tid!r}: use 1-32 of a-z 0-9 -, starting with a letter or digit")
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM tenants WHERE tid = ?", (tid,)).fetchone():
                raise ValueError(f"tenant {tid!r} exists already")
            db.execute(
                "INSERT INTO tenants (tid, created, functions) VALUES (?, ?, ?)",
                (tid, int(self.clock()), None if functions is None else json.dumps(sorted(functions))),
            )
            return self._new_credential(db, tid, "active")

    def add_credential(self, tid: str) -> tuple[str, bytes]:
        """Another active credential for an existing tenant (one per client installation)."""
        with self._transaction() as db:
            self._require_tenant(db, tid)
            return self._new_credential(db, tid, "active")

    def _new_credential(
        self, db: sqlite3.Connection, tid: str, state: str, parent: str | None = None
    ) -> tuple[str, bytes]:
        kid, k = new_kid(), os.urandom(32)
        db.execute(
            "INSERT INTO credentials (kid, tid, secret, state, created, parent) VALUES (?, ?, ?, ?, ?, ?)",
            (kid, tid, self._seal("key", f"{tid}\x00{kid}", k), state, int(self.clock()), parent),
        )
        return kid, k

    @staticmethod
    def _require_tenant(db: sqlite3.Connection, tid: str) -> None:
        if not db.execute("SELECT 1 FROM tenants WHERE tid = ?", (tid,)).fetchone():
            raise ValueError(f"no tenant {tid!r}")

    def set_functions(self, tid: str, functions: list[str] | None) -> None:
        with self._transaction() as db:
            self._require_tenant(db, tid)
            db.execute(
                "UPDATE tenants SET functions = ? WHERE tid = ?",
                (None if functions is None else json.dumps(sorted(functions)), tid),
            )

    def rotate(self, tid: str | None = None, older_than_days: float | None = None) -> list[tuple[str, str, str]]:
        """Make a pending successor for each active credential (of ``tid``, or older than N days).

        Returns (tid, old kid, new kid) for each one made. A credential that already has a
        pending successor keeps it: the same rk is delivered until it is used (PROTOCOL 5.2).
        """
        made = []
        with self._transaction() as db:
            if tid is not None:
                self._require_tenant(db, tid)
            rows = db.execute(
                "SELECT tid, kid, created FROM credentials c WHERE state = 'active' AND (? IS NULL OR tid = ?) "
                "AND NOT EXISTS (SELECT 1 FROM credentials p WHERE p.parent = c.kid AND p.state = 'pending')",
                (tid, tid),
            ).fetchall()
            cutoff = None if older_than_days is None else self.clock() - older_than_days * 86400
            for row_tid, kid, created in rows:
                if cutoff is None or created <= cutoff:
                    new_kid, _ = self._new_credential(db, row_tid, "pending", parent=kid)
                    made.append((row_tid, kid, new_kid))
        return made

    def promote(self, kid: str) -> bool:
        """First valid use of a pending kid: it becomes active, its parent retiring (PROTOCOL 5.4).

        Idempotent across workers: only the first caller finds it still pending. It runs on the
        request path, so it waits at most REQUEST_WAIT for another connection's write lock, then
        raises; the middleware serves the call anyway and a later call under the kid retries.
        """
        now = int(self.clock())
        with self._transaction(REQUEST_WAIT) as db:
            row = db.execute("SELECT parent FROM credentials WHERE kid = ? AND state = 'pending'", (kid,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE credentials SET state = 'active', parent = NULL WHERE kid = ?", (kid,))
            db.execute(
                "UPDATE credentials SET state = 'retiring', retire_at = ? WHERE kid = ? AND state = 'active'",
                (now + GRACE_SECONDS, row[0]),
            )
        return True

    def revoke(self, tid_or_kid: str) -> int:
        """Retire at once every credential of a tenant, or one kid; returns how many.

        A kid goes with its pending successor: K' was sent as ``rk`` to whoever called with K
        (PROTOCOL.md 5.3), so revoking a stolen K alone would leave the thief K'.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE credentials SET state = 'retired', retire_at = ? "
                "WHERE (tid = ? OR kid = ? OR (state = 'pending' AND parent = ?)) AND state != 'retired'",
                (int(self.clock()), tid_or_kid, tid_or_kid, tid_or_kid),
            )
            if (
                cursor.rowcount == 0
                and not db.execute(
                    "SELECT 1 FROM credentials WHERE tid = ? OR kid = ?", (tid_or_kid, tid_or_kid)
                ).fetchone()
            ):
                raise ValueError(f"no tenant or kid {tid_or_kid!r}")
            return cursor.rowcount

    def otp_enroll(self, tid: str) -> str:
        """A new authenticator secret for a tenant; returns the base32 secret (shown once)."""
        import pyotp

        secret = pyotp.random_base32()
        with self._transaction() as db:
            self._require_tenant(db, tid)
            db.execute(
                "UPDATE tenants SET otp_secret = ?, otp_last = -1 WHERE tid = ?",
                (self._seal("otp", tid, secret.encode()), tid),
            )
            db.execute("DELETE FROM otp_failures WHERE tid = ?", (tid,))  # a new authenticator starts unlocked
        return secret

    def check_otp(self, tid: str, code: str, now: float) -> bool:
        """RFC 6238 with one step of drift either way; a timecode at or below the last accepted
        one is refused (5.2), and wrong codes lock the authenticator (OtpLocked). One
        transaction, so two workers can neither both accept one code nor both miss a failure."""
        read = "SELECT otp_secret, failures, locked_until FROM tenants LEFT JOIN otp_failures USING (tid) WHERE tid = ?"
        with self._lock:
            row = self._db.execute(read, (tid,)).fetchone()
        if row is None or row[0] is None:
            return False  # not enrolled: there is no code to guess
        if row[2] is not None and now < row[2]:  # locked: refused without taking the write lock
            raise OtpLocked(row[2] - now)
        secret = self._open("otp", tid, row[0]).decode()
        try:
            with self._transaction(REQUEST_WAIT) as db:
                _, failures, locked_until = db.execute(read, (tid,)).fetchone()  # again, now nobody else writes
                failures, locked_until = failures or 0, locked_until or 0.0
                if now < locked_until:
                    raise OtpLocked(locked_until - now)  # nothing written: the transaction rolls back
                timecode = _otp_timecode(secret, code, now)
                if (
                    timecode is not None
                    and db.execute(
                        "UPDATE tenants SET otp_last = ? WHERE tid = ? AND otp_last < ?", (timecode, tid, timecode)
                    ).rowcount
                ):
                    db.execute("DELETE FROM otp_failures WHERE tid = ?", (tid,))
                    return True
                db.execute(  # wrong, or a code used already: both count
                    "INSERT OR REPLACE INTO otp_failures (tid, failures, locked_until) VALUES (?, ?, ?)",
                    (tid, failures + 1, _otp_locked_until(tid, failures + 1, now)),
                )
                return False
        except sqlite3.Error as exc:  # a used code or a failure left unrecorded: fail closed
            raise KeystoreUnavailable(f"keystore: cannot record the authenticator code: {exc}") from None

    def rows(self) -> list[dict[str, Any]]:
        """Credentials for ``tenant list``: ids, states and dates, never secrets."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT c.tid, c.kid, c.state, c.created, c.retire_at, t.functions, t.otp_secret IS NOT NULL "
                "FROM credentials c JOIN tenants t USING (tid) ORDER BY c.tid, c.created"
            )
            return [
                dict(zip(("tid", "kid", "state", "created", "retire_at", "functions", "otp"), row, strict=True))
                for row in cursor
            ]

    # -- the request path's view

    def snapshot(self) -> KeyCache:
        """The current KeyCache; rebuilt only when the database changed (checked <= 1/s).

        Synchronous: PRAGMA data_version reads a local file's shared memory, no network.
        """
        now = self.clock()
        cache = self._cache
        if cache is not None and now - self._checked < CHECK_SECONDS:
            return cache
        with self._lock:
            version = self._data_version()
            self._checked = now
            if self._cache is None or version != self._version:
                self._cache, self._version = self._build_cache(*self._cache_rows()), version
            return self._cache

    def _data_version(self) -> object:
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def _cache_rows(self) -> tuple[list[Any], list[Any]]:
        """(tid, functions JSON) per tenant; (tid, kid, sealed K, state, retire_at, parent, created) per key."""
        db = self._db
        db.execute("BEGIN")
        try:
            tenants = db.execute("SELECT tid, functions FROM tenants").fetchall()
            rows = db.execute("SELECT tid, kid, secret, state, retire_at, parent, created FROM credentials").fetchall()
        finally:
            db.execute("COMMIT")
        return tenants, rows

    def _build_cache(self, tenants: list[Any], rows: list[Any]) -> KeyCache:
        keys: dict[tuple[str, str], CachedKey] = {}
        successors: dict[str, tuple[RotatedKey, int]] = {}
        retired = set()
        for tid, kid, sealed, state, retire_at, parent, created in rows:
            if state == "retired":  # its K is never decrypted again
                retired.add((tid, kid))
                continue
            try:
                k = self._open("key", f"{tid}\x00{kid}", sealed)
            except InvalidTag:  # sealed under another master key: refuse this one, not every call
                log.error("ALERT keystore: kid %s of tenant %s does not open with this master key", kid, tid)
                continue
            keys[(tid, kid)] = CachedKey(tid, kid, k, state, retire_at)
            if state == "pending" and parent:
                successors[parent] = (RotatedKey(kid=kid, k=b64encode(k)), created)
        for key in keys.values():
            successor = successors.get(key.kid) if key.state == "active" else None
            if successor is not None:
                key.rk, key.rk_from = successor[0], successor[1] + ROTATION_SETTLE
        functions = {tid: None if names is None else frozenset(json.loads(names)) for tid, names in tenants}
        return KeyCache(keys, functions, frozenset(retired))

    def is_retired(self, tid: str, kid: str) -> bool:
        """Was this kid ever ours and is now retired? From the key cache, as the request path reads it."""
        return (tid, kid) in self.snapshot().retired


def redacted_url(url: str) -> str:
    """``url`` without a user or password, for logs and messages (a Redis URL may carry both)."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        if parts.username is None and parts.password is None and "password" not in parts.query:
            return url
        host = parts.hostname or ""
        netloc = "***@" + (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))
    except ValueError:  # a port that is not a number: say nothing of the rest
        return url.split("://", 1)[0] + "://***"


class KeystoreUnavailable(OSError):
    """The keystore cannot be read (Redis did not answer) or a check cannot be recorded (SQLite
    locked): nothing that depends on it is served, a 503 instead."""


class RedisKeystore(Keystore):
    """The same keystore for every host: one JSON document in Redis, changed optimistically.

    Each change reads the document under WATCH, edits it and writes it back with a version
    counter in one MULTI/EXEC, retrying if another host changed it in between: the same
    one-transaction-per-change rule as SQLite. Secrets are sealed exactly as in SQLite (the
    hosts must share GATEWAY_MASTER_KEY). Hosts notice changes through the version counter,
    read about once a second in a background thread (snapshot), so a rotation or revocation made
    anywhere applies everywhere within a second or two; a host that cannot read it for MAX_STALE
    seconds refuses calls (503). Documents stay small: tenants and keys, not traffic.
    """

    KEY = b"stt1:keystore"
    VERSION = b"stt1:keystore:version"

    def __init__(
        self,
        url: str,
        master_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis

        # Shared by design, so it never makes (or reads) a key file of its own: the file would be
        # relative to each process's folder, and a gateway and a `tenant add` started in two
        # folders would each make one, sealing credentials the other cannot open. The key must
        # come from outside, the same everywhere: GATEWAY_MASTER_KEY, or the caller's.
        master_key = master_key if master_key is not None else _master_key_from_env()
        if master_key is None:
            raise ValueError(
                f"redis keystore {redacted_url(url)}: set GATEWAY_MASTER_KEY (the base64url of 32 random bytes)"
                " to the same value on every host and wherever `tenant` commands run; a shared keystore makes no"
                " key file"
            )
        self.path = redacted_url(url)  # what messages name: never the password
        self.clock = clock
        # health_check_interval: a pooled connection idle for a second is PINGed before it is
        # used, so one that a Redis restart closed is replaced instead of failing a call.
        self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=1)
        self._init_cache()
        # The request path's view: (last good KeyCache, clock time its check started). One
        # attribute, so snapshot never pairs a cache with another cache's age.
        self._current: tuple[KeyCache | None, float] = (None, 0.0)
        self._due = False  # a change made through this handle: check again at the next request
        self._error = f"redis keystore {self.path}: not read yet"
        self._refreshing = threading.Lock()  # held by the one background refresh in flight
        self._serial = threading.Lock()  # one refresh at a time, background or direct
        self._closed = threading.Event()
        self._ticking = False  # the thread that keeps the cache fresh between calls (_keep_fresh)
        self._aead = AESGCM(master_key)
        try:
            doc: dict[str, Any] | None = self._reading()
        except KeystoreUnavailable:
            doc = None  # down for now: start, and answer 503 until it is back
        first = None if doc is None else next(iter(doc["credentials"].items()), None)
        if first is not None:
            kid, credential = first
            self._check_master_key((credential["tid"], kid, b64decode(credential["secret"])))
        if doc is not None:  # at start waiting is fine: the first calls need not be 503s
            with contextlib.suppress(KeystoreUnavailable):
                self.refresh()

    def close(self) -> None:
        self._closed.set()
        self._redis.close()

    def snapshot(self) -> KeyCache:
        """The last KeyCache read from Redis, without ever waiting for Redis.

        This runs on the event loop for every request, where a Redis that hangs (stopped, a
        network partition) would hold up every call of the worker for the socket timeout. So a
        daemon thread refreshes the cache when it is CHECK_SECONDS old or after a change made
        here, at most one at a time, while the last good cache serves. Once the last successful
        check is over MAX_STALE old, this fails closed at once (KeystoreUnavailable, a 503), so
        a revoked key stays usable for at most MAX_STALE seconds wherever Redis is unreachable.
        """
        if not self._ticking:
            self._keep_fresh_from_now()
        now = self.clock()
        cache, checked = self._current
        if cache is None or self._due or now - checked >= CHECK_SECONDS:
            self._refresh_in_background()
        if cache is None or now - checked > MAX_STALE:
            raise KeystoreUnavailable(f"{self._error} (no good read for {now - checked:.0f} s)")
        return cache

    def refresh(self) -> KeyCache:
        """Check the version counter now, rebuild the cache if it moved; blocking (up to the
        socket timeouts), so only the background thread, a start or a test calls it. Raises
        KeystoreUnavailable. The check's age counts from before it was sent: the cache holds
        everything committed before that time."""
        with self._serial:
            started = self.clock()
            due, self._due = self._due, False  # cleared first: a change made meanwhile sets it again
            try:
                version = self._data_version()
                cache = self._current[0]
                if cache is None or version != self._version:
                    cache = self._build_cache(*self._cache_rows())
                    self._version = version
            except BaseException:
                self._due = self._due or due
                raise
            self._current = (cache, started)
            return cache

    def _keep_fresh_from_now(self) -> None:
        """Read Redis every CHECK_SECONDS, calls or not, from the first one (or /healthz) on.

        Reads started only by calls left a quiet host's cache older than MAX_STALE, so the first
        call after a few idle seconds was refused (503) while Redis was fine. Started by the
        first snapshot, so a `tenant` command, which never takes one, starts no thread.
        """
        self._ticking = True

        def tick() -> None:
            while not self._closed.wait(CHECK_SECONDS):
                if self._refreshing.acquire(blocking=False):  # else a refresh is in flight already
                    self._refresh_then_release()

        threading.Thread(target=tick, name="keystore-keep-fresh", daemon=True).start()

    def _refresh_in_background(self) -> None:
        if not self._refreshing.acquire(blocking=False):
            return  # one is in flight already
        try:
            threading.Thread(target=self._refresh_then_release, name="keystore-refresh", daemon=True).start()
        except RuntimeError:  # no thread to be had: the next request tries again
            self._refreshing.release()

    def _refresh_then_release(self) -> None:
        try:
            self.refresh()
        except KeystoreUnavailable as exc:
            self._error = str(exc)  # reported by the 503s once the cache is too old
        except Exception as exc:  # a document we cannot read: fail closed the same way, and say so
            self._error = f"redis keystore {self.path}: unreadable: {exc!r}"
            log.error("%s", self._error)
        finally:
            self._refreshing.release()

    def _read(self, client: Any = None) -> dict[str, Any]:
        raw = (client or self._redis).get(self.KEY)
        return json.loads(raw) if raw else {"tenants": {}, "credentials": {}}

    def _change(self, edit: Callable[[dict[str, Any]], Any]) -> Any:
        """One change, retried while another host changes the document first. Never called on the
        event loop (admin commands; promotion and OTP checks run in a thread), so it then also
        refreshes this handle's cache: its own change applies here at once, as in SQLite."""
        import redis

        try:
            with self._lock, self._redis.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(self.KEY)
                        doc = self._read(pipe)
                        result = edit(doc)  # may raise ValueError: then nothing is written
                        pipe.multi()
                        pipe.set(self.KEY, json.dumps(doc, sort_keys=True))
                        pipe.incr(self.VERSION)
                        pipe.execute()
                        break
                    except redis.WatchError:
                        continue  # another host changed it first: read again
        except redis.RedisError as exc:
            raise KeystoreUnavailable(f"redis keystore {self.path}: {exc}") from None
        self._due = True  # if the refresh below fails, the next request's snapshot tries again
        with contextlib.suppress(KeystoreUnavailable):
            self.refresh()
        return result

    def _reading(self) -> dict[str, Any]:
        import redis

        try:
            return self._read()
        except redis.RedisError as exc:
            raise KeystoreUnavailable(f"redis keystore {self.path}: {exc}") from None

    def _add(self, doc: dict[str, Any], tid: str, state: str, parent: str | None = None) -> tuple[str, bytes]:
        kid, k = new_kid(), os.urandom(32)
        doc["credentials"][kid] = {
            "tid": tid,
            "secret": b64encode(self._seal("key", f"{tid}\x00{kid}", k)),
            "state": state,
            "created": int(self.clock()),
            "parent": parent,
            "retire_at": None,
        }
        return kid, k

    @staticmethod
    def _tenant(doc: dict[str, Any], tid: str) -> dict[str, Any]:
        if tid not in doc["tenants"]:
            raise ValueError(f"no tenant {tid!r}")
        return doc["tenants"][tid]  # type: ignore[no-any-return]

    def add_tenant(self, tid: str, functions: list[str] | None = None) -> tuple[str, bytes]:
        if not _TID_RE.fullmatch(tid):
            raise ValueError(f"tenant name {tid!r}: use 1-32 of a-z 0-9 -, starting with a letter or digit")

        def edit(doc: dict[str, Any]) -> tuple[str, bytes]:
            if tid in doc["tenants"]:
                raise ValueError(f"tenant {tid!r} exists already")
            doc["tenants"][tid] = {
                "created": int(self.clock()),
                "otp": None,
                "otp_last": -1,
                "functions": None if functions is None else sorted(functions),
            }
            return self._add(doc, tid, "active")

        return self._change(edit)  # type: ignore[no-any-return]

    def add_credential(self, tid: str) -> tuple[str, bytes]:
        return self._change(lambda doc: (self._tenant(doc, tid), self._add(doc, tid, "active"))[1])  # type: ignore[no-any-return]

    def set_functions(self, tid: str, functions: list[str] | None) -> None:
        def edit(doc: dict[str, Any]) -> None:
            self._tenant(doc, tid)["functions"] = None if functions is None else sorted(functions)

        self._change(edit)

    def rotate(self, tid: str | None = None, older_than_days: float | None = None) -> list[tuple[str, str, str]]:
        def edit(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
            if tid is not None:
                self._tenant(doc, tid)
            creds = doc["credentials"]
            pending_for = {c["parent"] for c in creds.values() if c["state"] == "pending"}
            cutoff = None if older_than_days is None else self.clock() - older_than_days * 86400
            made = []
            for kid, c in sorted(creds.items(), key=lambda item: (item[1]["tid"], item[1]["created"])):
                if c["state"] == "active" and (tid is None or c["tid"] == tid) and kid not in pending_for:
                    if cutoff is None or c["created"] <= cutoff:
                        made.append((c["tid"], kid, self._add(doc, c["tid"], "pending", parent=kid)[0]))
            return made

        return self._change(edit)  # type: ignore[no-any-return]

    def promote(self, kid: str) -> bool:
        now = int(self.clock())

        def edit(doc: dict[str, Any]) -> bool:
            creds = doc["credentials"]
            c = creds.get(kid)
            if c is None or c["state"] != "pending":
                return False
            parent = creds.get(c["parent"])
            c.update(state="active", parent=None)
            if parent is not None and parent["state"] == "active":
                parent.update(state="retiring", retire_at=now + GRACE_SECONDS)
            return True

        return self._change(edit)  # type: ignore[no-any-return]

    def revoke(self, tid_or_kid: str) -> int:
        now = int(self.clock())

        def edit(doc: dict[str, Any]) -> int:
            matching = [c for kid, c in doc["credentials"].items() if tid_or_kid in (kid, c["tid"])]
            if not matching:
                raise ValueError(f"no tenant or kid {tid_or_kid!r}")
            creds = doc["credentials"].values()
            successors = [c for c in creds if c["state"] == "pending" and c["parent"] == tid_or_kid]
            retired = [c for c in matching + successors if c["state"] != "retired"]
            for c in retired:
                c.update(state="retired", retire_at=now)
            return len(retired)

        return self._change(edit)  # type: ignore[no-any-return]

    def otp_enroll(self, tid: str) -> str:
        import pyotp

        secret = pyotp.random_base32()

        def edit(doc: dict[str, Any]) -> None:
            tenant = self._tenant(doc, tid)
            tenant.update(otp=b64encode(self._seal("otp", tid, secret.encode())), otp_last=-1)
            tenant.pop("otp_failures", None)  # a new authenticator starts unlocked
            tenant.pop("otp_locked_until", None)

        self._change(edit)
        return secret

    def check_otp(self, tid: str, code: str, now: float) -> bool:
        tenant = self._reading()["tenants"].get(tid)
        if tenant is None or tenant["otp"] is None:
            return False  # not enrolled: there is no code to guess
        if now < tenant.get("otp_locked_until", 0.0):  # locked: refused without a write
            raise OtpLocked(tenant["otp_locked_until"] - now)
        timecode = _otp_timecode(self._open("otp", tid, b64decode(tenant["otp"])).decode(), code, now)

        def edit(doc: dict[str, Any]) -> bool:
            entry = self._tenant(doc, tid)
            locked_until = entry.get("otp_locked_until", 0.0)
            if now < locked_until:
                raise OtpLocked(locked_until - now)  # nothing written
            if timecode is not None and entry["otp_last"] < timecode:  # else used already, maybe on another host
                entry.update(otp_last=timecode, otp_failures=0, otp_locked_until=0.0)
                return True
            failures = entry.get("otp_failures", 0) + 1
            entry.update(otp_failures=failures, otp_locked_until=_otp_locked_until(tid, failures, now))
            return False

        return self._change(edit)  # type: ignore[no-any-return]

    def rows(self) -> list[dict[str, Any]]:
        doc = self._reading()
        tenants = doc["tenants"]
        return [
            {
                "tid": c["tid"],
                "kid": kid,
                "state": c["state"],
                "created": c["created"],
                "retire_at": c["retire_at"],
                "functions": None
                if tenants[c["tid"]]["functions"] is None
                else json.dumps(tenants[c["tid"]]["functions"]),
                "otp": tenants[c["tid"]]["otp"] is not None,
            }
            for kid, c in sorted(doc["credentials"].items(), key=lambda item: (item[1]["tid"], item[1]["created"]))
        ]

    def _data_version(self) -> object:
        import redis

        try:
            return self._redis.get(self.VERSION)
        except redis.RedisError as exc:
            raise KeystoreUnavailable(f"redis keystore {self.path}: {exc}") from None

    def _cache_rows(self) -> tuple[list[Any], list[Any]]:
        doc = self._reading()
        tenants = [
            (tid, None if t["functions"] is None else json.dumps(t["functions"])) for tid, t in doc["tenants"].items()
        ]
        rows = [
            (c["tid"], kid, b64decode(c["secret"]), c["state"], c["retire_at"], c["parent"], c["created"])
            for kid, c in doc["credentials"].items()
        ]
        return tenants, rows


#### Replay stores
# One contract (PROTOCOL.md 7): check_and_insert(key, expires_at) is an atomic insert-if-absent,
# True the first time. Entries are never dropped before expires_at, so a full store refuses
# (ReplayStoreError, answered 503) instead of forgetting: fail closed.


class ReplayStoreError(Exception):
    """The store could not answer (full, down, locked): the request must not go through."""


class _NeverBack:
    """time.time that never goes back, for the clock check and the replay stores together.

    A store forgets a jti once the clock passes its expiry, and the clock check takes a token
    while the clock says it is fresh. A clock stepped forward (NTP, a resumed VM), then back, made
    the store forget ids the check took again: a used token ran twice. With one clock that never
    goes back, what is forgotten stays too old. The price, after a step back: tokens from
    clocks that are right are refused (401) until the real clock catches up, or 45 s less.
    """

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._latest = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        now = self._wall()
        with self._lock:  # two threads must not write back an earlier time
            if now > self._latest:
                self._latest = now
            return self._latest


# The default clock of Security and the replay stores: one for the process, so that they agree.
server_clock: Callable[[], float] = _NeverBack()


class MemoryReplayStore:
    """One process. Keys are bucketed by expiry second so purging is amortised O(1).

    Keys are SHA-256 digests (replay_key), so it keeps their first 16 bytes: 128 bits leave a
    collision (a fresh token refused) at odds of about 2**-88 with millions of entries, and
    halve the memory per entry. Expired keys go at most a second after their expiry.

    Under steady load the set's table (16 MB at half a million keys) is rebuilt every twenty
    seconds or so, as purged keys leave dummy slots. glibc serves big blocks from mmap and
    returns them on free, but its threshold for that rises to the largest block freed, so the
    next table came from the heap and the freed one stayed in the RSS: one 16 MB step a soak
    read as growth. Once the store is big, the threshold is pinned (_return_big_blocks).
    """

    shared = False  # another process cannot see it: the gateway refuses it with --workers > 1

    def __init__(self, max_entries: int = 2_000_000, clock: Callable[[], float] = server_clock) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._seen: set[bytes] = set()
        self._buckets: dict[int, list[bytes]] = {}
        self._next_purge = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_insert(self, key: bytes, expires_at: int) -> bool:
        key = key[:16]
        with self._lock:
            if key in self._seen:
                return False
            now = int(self.clock())
            if now >= self._next_purge or len(self._seen) >= self.max_entries:
                self._purge(now)  # at most once a second, and when full: time bounds the store
                self._next_purge = now + 1
                if len(self._seen) >= self.max_entries:
                    raise ReplayStoreError("memory replay store is full")
                if len(self._seen) >= _BIG_STORE:
                    _return_big_blocks()
            self._seen.add(key)
            bucket = self._buckets.get(expires_at)
            if bucket is None:
                self._buckets[expires_at] = [key]
            else:
                bucket.append(key)
            return True

    def _purge(self, now: int) -> None:
        for expires_at in [t for t in self._buckets if t < now]:
            self._seen.difference_update(self._buckets.pop(expires_at))


_BIG_STORE = 1 << 16  # keys: from here the set's table is megabytes (see MemoryReplayStore)


@functools.cache
def _return_big_blocks() -> None:
    """Pin glibc's mmap threshold at its default, 128 KiB, once per process.

    Set explicitly, it no longer rises to the size of the largest block freed, so every big
    block (a set's table) is mmapped and goes back to the OS when freed. Elsewhere than glibc
    (musl, macOS) there is no mallopt: nothing to do. Imported here, not at start: ctypes
    costs a few milliseconds that a start without a big store need not pay.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


class _Busy(Exception):
    """Another connection holds the SQLite write lock."""


class SqliteReplayStore:
    """Several worker processes on one host share one WAL database file.

    Called on the event loop, it never waits there for a lock another connection holds (a
    backup, a long transaction, another worker): a busy database is retried in a thread for up
    to ``timeout`` seconds, so a locked store delays (then fails) its own calls, not the worker.
    A file SQLite could only open read-only stays read-only for that connection, even once the
    file can be written again: a write refused as read-only drops the connection (that call
    still fails closed), so the next call opens a new one and the store recovers by itself.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        clock: Callable[[], float] = server_clock,
        purge_every: int = 1000,
        timeout: float = 2.0,
    ) -> None:
        self.path = os.fspath(path)
        self.clock = clock
        self.purge_every = purge_every
        self.timeout = timeout
        self._inserts = 0
        self._db = self._connect(0)  # the event loop's: fails at once when busy
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (k BLOB PRIMARY KEY, exp INTEGER NOT NULL) WITHOUT ROWID")
        self._stale: set[sqlite3.Connection] = set()  # opened read-only: replace before the next use
        self._lock = threading.Lock()
        self._waiting_db: sqlite3.Connection | None = None  # a thread's, that waits: made when first needed
        self._waiting_lock = threading.Lock()

    def _connect(self, timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout)
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a process crash loses no commit
        return db

    def check_and_insert(self, key: bytes, expires_at: int) -> bool | Awaitable[bool]:
        """True the first time; an awaitable of it when called on an event loop and the database is busy."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a plain caller may wait
            return self._insert_waiting(key, expires_at, time.monotonic() + self.timeout)
        if self._lock.acquire(blocking=False):
            try:
                if self._db in self._stale:
                    self._db = self._reconnect(self._db, 0)
                return self._insert(self._db, key, expires_at)
            except _Busy:
                pass
            finally:
                self._lock.release()
        return asyncio.to_thread(self._insert_waiting, key, expires_at, time.monotonic() + self.timeout)

    def _insert(self, db: sqlite3.Connection, key: bytes, expires_at: int) -> bool:
        try:
            new = db.execute("INSERT OR IGNORE INTO seen (k, exp) VALUES (?, ?)", (key, expires_at)).rowcount == 1
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _Busy() from None
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_READONLY:
                self._stale.add(db)  # see the class docstring
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL:
                self._make_room(db)  # this call fails closed all the same; the next may fit
            raise ReplayStoreError(f"sqlite replay store: {exc}") from None
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY:
                self._stale.add(db)  # see the class docstring
            raise ReplayStoreError(f"sqlite replay store: {exc}") from None
        self._inserts += 1
        if self._inserts % self.purge_every == 0:
            # Best effort: the insert above is committed, so a busy purge must not make it retried
            # (which would find the key and call a fresh token a replay). The next purge catches up.
            with contextlib.suppress(sqlite3.Error):
                # MAX_SKEW late: each worker's clock never goes back, but one that saw a step
                # forward would purge ids that another, which did not, would take again.
                db.execute("DELETE FROM seen WHERE exp < ?", (int(self.clock()) - MAX_SKEW,))
        return new

    def _make_room(self, db: sqlite3.Connection) -> None:
        """Full (disk or max_page_count): drop the expired ids now. Purged only after successful
        inserts, a full store stayed full once every id in it had expired, until someone freed
        space. Best effort: the WAL is checkpointed first, which can free the space a delete needs.
        """
        for statement, args in (
            ("PRAGMA wal_checkpoint(TRUNCATE)", ()),
            ("DELETE FROM seen WHERE exp < ?", (int(self.clock()) - MAX_SKEW,)),
            ("PRAGMA wal_checkpoint(TRUNCATE)", ()),
        ):
            with contextlib.suppress(sqlite3.Error):
                db.execute(statement, args).fetchall()

    def _insert_waiting(self, key: bytes, expires_at: int, deadline: float) -> bool:
        if not self._waiting_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ReplayStoreError(f"sqlite replay store: still locked after {self.timeout:g} s")
        try:
            if self._waiting_db is None:
                self._waiting_db = self._connect(self.timeout)
            elif self._waiting_db in self._stale:
                self._waiting_db = self._reconnect(self._waiting_db, self.timeout)
            remaining = max(0.0, deadline - time.monotonic())
            self._waiting_db.execute(f"PRAGMA busy_timeout = {int(remaining * 1000)}")
            return self._insert(self._waiting_db, key, expires_at)
        except _Busy:
            raise ReplayStoreError(f"sqlite replay store: still locked after {self.timeout:g} s") from None
        except sqlite3.Error as exc:
            raise ReplayStoreError(f"sqlite replay store: {exc}") from None
        finally:
            self._waiting_lock.release()

    def _reconnect(self, db: sqlite3.Connection, timeout: float) -> sqlite3.Connection:
        """A new connection for one that SQLite opened read-only; ReplayStoreError (and the old
        one kept, to be replaced at the next call) if the file still cannot be opened."""
        try:
            new = self._connect(timeout)
        except sqlite3.Error as exc:
            raise ReplayStoreError(f"sqlite replay store: {exc}") from None
        self._stale.discard(db)
        db.close()
        return new

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])


class RedisReplayStore:
    """Several hosts share one Redis: ``SET stt1:seen:<key> 1 NX EX <seconds left>``.

    Asynchronous, so a network round trip never stalls the event loop. Redis must not evict
    keys before they expire (maxmemory-policy noeviction): a full Redis then refuses the SET,
    which is a 503 here, never a forgotten jti. redis-py reconnects by itself once Redis is back.

    The expiry counts from the gateway's clock (``clock``), not Redis's: with EXAT, a Redis
    clock a few seconds ahead would drop each key as soon as it was set. And it is MAX_SKEW
    later than expires_at: another host whose clock runs behind takes the token for longer.

    A Redis that restarts empty (no persistence) or is flushed forgets every jti, so a token
    used just before could run again. The store therefore keeps ``stt1:replay:since``, the
    first second Redis's memory covers, and reads it in the transaction of every insert: a
    token issued before it counts as seen, as one from before boot does with the memory store
    (PROTOCOL.md 3.3). A missing marker means Redis is new or lost its data: the same
    transaction sets it to the second after now (that second counts as "before"), and a
    WARNING is logged once. Not covered, because the marker survives them: a failover to a
    replica that had not yet received the latest keys, and a restart that reloads a snapshot
    (RDB, or an AOF that is not fsynced on every write) older than those keys. A token used in
    the last seconds before either can then be replayed once, within its 50 s.
    """

    shared = True
    MARKER = b"stt1:replay:since"

    def __init__(self, url: str, timeout: float = 0.5, clock: Callable[[], float] = server_clock) -> None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.clock = clock
        # No retries, said outright: redis-py 8's Redis() retries a command, or a transaction, 10
        # times after a connection error or a timeout (from_url does not, today), and a retried
        # insert that had reached Redis finds its own key.
        self._redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        self._used = 0.0  # time.monotonic() of the last command
        self._since: int | None = None  # the marker as this process last saw it
        self._mark_at_start(url, timeout)

    def _mark_at_start(self, url: str, timeout: float) -> None:
        """Set stt1:replay:since now if it is missing, as the first insert would.

        Set by the first insert instead, a brand-new Redis refused the first call made after
        start (its token was issued before the marker the same insert set), seconds later. Now
        only tokens issued by the start's second are refused, as with the memory store. Redis
        down at start: said here, and the first insert that reaches it sets the marker.
        """
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            now = math.floor(self.clock())
            if client.set(self.MARKER, now + 1, nx=True):
                log.warning(
                    "redis replay store: stt1:replay:since set at start (a new or emptied Redis); "
                    "tokens issued before %s are refused",
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1)),
                )
            self._since = int(client.get(self.MARKER) or 0) or None
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("redis replay store %s: %s; calls are refused (503) until it answers", redacted_url(url), exc)
        finally:
            client.close()

    async def ping(self) -> None:
        """For /healthz: ReplayStoreError unless Redis answers."""
        import redis

        try:
            await self._redis.ping()
        except (redis.RedisError, OSError) as exc:
            raise ReplayStoreError(f"redis replay store: {exc}") from None

    async def check_and_insert(self, key: bytes, expires_at: int) -> bool:
        """One MULTI/EXEC, never retried: a retried insert that had reached Redis would find its
        own key and refuse a fresh token as a replay.

        After a Redis restart the pooled connection is dead, and a command sent on it fails (a
        503). So after a second idle a PING goes first, and its failure is ignored: redis-py drops
        the dead connection, and the insert gets a new one. (health_check_interval does the same
        PING, but redis-py 8 raises its failure unless commands are retried too, which the insert
        must not be.) Under load no PING is sent at all."""
        import redis

        if time.monotonic() - self._used > 1.0:
            with contextlib.suppress(redis.RedisError, OSError):
                await self._redis.ping()
        now = math.floor(self.clock())  # after the PING, which may have waited
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                # MAX_SKEW longer than expires_at by this host's clock: a host whose clock runs
                # behind takes the token for that much longer (hosts up to 50 s apart).
                pipe.set(b"stt1:seen:" + key, b"1", nx=True, ex=max(1, expires_at - now) + MAX_SKEW)
                pipe.set(self.MARKER, now + 1, nx=True)  # only when missing: Redis is new or lost its data
                pipe.get(self.MARKER)
                fresh, created, marker = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise ReplayStoreError(f"redis replay store: {exc}") from None
        finally:
            self._used = time.monotonic()
        try:
            since = int(marker)
        except (TypeError, ValueError):
            raise ReplayStoreError("redis replay store: stt1:replay:since is not a Unix second") from None
        if since != self._since:
            if created or self._since is not None:
                log.warning(
                    "redis replay store: %s; tokens issued before %s are refused as possible replays",
                    "stt1:replay:since was missing: this Redis is new or lost its data (a restart without "
                    "persistence, a flush)"
                    if created
                    else f"stt1:replay:since moved from {self._since} to {since}: Redis lost its data",
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
                )
            self._since = since
        return bool(fresh) and expires_at - REPLAY_TTL >= since


def open_replay_store(url: str, db_path: str) -> MemoryReplayStore | SqliteReplayStore | RedisReplayStore:
    """``memory``, ``sqlite`` (a file beside the keystore), ``sqlite:///path`` or ``redis://host:port/db``."""
    if url == "memory":
        return MemoryReplayStore()
    if url == "sqlite":
        return SqliteReplayStore(f"{db_path}.replay")
    if url.startswith("sqlite:///"):
        return SqliteReplayStore(url[len("sqlite:///") - 1 :])
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisReplayStore(url)
    raise ValueError(f"unknown replay store {url!r}: use memory, sqlite, sqlite:///path or redis://host:port/db")


def replay_key(tid: str, kid: str, jti: str) -> bytes:
    """PROTOCOL.md 3.8's SHA256(tid, kid, "c2s", jti), with PAE so no two tuples collide."""
    encoded = jti.encode()
    return hashlib.sha256(_replay_prefix(tid, kid) + _LE64(len(encoded)) + encoded).digest()


@functools.lru_cache(maxsize=1024)
def _replay_prefix(tid: str, kid: str) -> bytes:
    """pae(tid, kid, "c2s", jti) up to jti's piece: the same for every token of a credential."""
    return _pae_head(4, tid.encode(), kid.encode(), b"c2s")


#### Middleware
# PROTOCOL.md 3, in its order. Everything before the token is verified is answered without a
# response token (401, 413, 429, 503); everything after is signed, errors included.

MAX_SKEW = 45  # seconds either side of the server's clock (3.3)
REPLAY_TTL = 50  # a jti is remembered until iat + 50 (3.8): past every accepted iat + 45
CALLER_KEY = "gateway.caller"  # what the dispatcher reads: the verified Caller
TENANT_KEY = "gateway.tenant"
BODY_KEY = "gateway.body"
REFUSED_KEY = "gateway.refused"  # the status this layer answered with itself: for the access log
STORE_FAILURE_SHOWN = 10.0  # seconds /healthz reports a local replay store's last failure
MAX_BODY_KEY = "gateway.max_body"  # set by the gateway: the most it reads, the same for every path
DEFAULT_MAX_BODY = 1 << 20  # when no gateway sets MAX_BODY_KEY
REQUEST_ID_KEY = "gateway.request_id"

# Security._log's kinds of line: (level, format with the request id and the reason, the line
# that says more were dropped this second).
_LOG_KINDS = {
    "refused": (logging.WARNING, "request %s: 401: %s", "more refused tokens this second; not logging them"),
    "alert": (logging.WARNING, "request %s: 401: %s", "more ALERTs this second; not logging them"),
    "store": (logging.ERROR, "request %s: %s", "more store failures this second; not logging them"),
}

_UNAUTHORIZED = b'{"valid":false,"error":{"code":"unauthorized","message":"missing, invalid or expired token"}}'

log = logging.getLogger("gateway.security")

_Scope = Any
_Receive = Callable[[], Awaitable[Any]]
_Send = Callable[[Any], Awaitable[None]]


class Caller:
    """The verified tenant of one request, as the dispatcher sees it (steps 9 and 6 of OTP)."""

    __slots__ = ("_security", "functions", "otp", "tenant")

    def __init__(self, security: Security, tenant: str, functions: frozenset[str] | None, otp: str | None):
        self._security, self.tenant, self.functions, self.otp = security, tenant, functions, otp

    def may_call(self, name: str) -> bool:
        return self.functions is None or name in self.functions

    def check_otp(self) -> bool:
        """The second factor for a function flagged ``otp`` (PROTOCOL.md 6)."""
        if self.otp is None:
            return False
        return self._security.keystore.check_otp(self.tenant, self.otp, self._security.clock())


class _Refused(Exception):
    """A request that gets the one 401. The reason (one of FAILURE_REASONS) is counted in the
    metrics and the detail logged; neither is ever told to the client."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# Why a request was refused before its call, as counted by ``Security.on_failure``: a fixed
# set, so a metric labelled with it stays small whatever clients send.
FAILURE_REASONS = (
    "missing",  # no Authorization header
    "malformed",  # not one well-formed STT1 token, or a bad Content-Length
    "direction",  # a response token sent as a request
    "clock",  # iat outside the 45 s window
    "before_boot",  # iat before this process started (memory replay store)
    "unknown_kid",  # unknown, retired or expired key
    "signature",  # the tag does not verify: tampered, another audience, another request
    "replayed",  # a jti seen before
    "throttled",  # too many failures from this address or for this tenant
    "disconnected",  # the client went away before sending its body
    "keystore_unavailable",  # fail closed: 503
    "replay_store_unavailable",  # fail closed: 503
)


class Throttle:
    """Counts failures per client address and per claimed tenant in fixed windows.

    Over a limit, failures are answered 429 instead of 401 (PROTOCOL.md 3 throttles "repeated
    failures"); valid calls are still verified and go through. Refusing them too would let
    anyone lock out a tenant, whose name is in every token's footer, or every client behind a
    shared address (a NAT, or a load balancer that is not on this host) with a few bad tokens a
    minute, while it would not slow down guessing K (256 bits) in any way that matters.
    """

    def __init__(
        self, per_address: int = 30, per_tenant: int = 300, window: int = 60, max_entries: int = 100_000
    ) -> None:
        self.limits = {"addr": per_address, "tid": per_tenant}
        self.window = window
        self.max_entries = max_entries
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}

    def blocked(self, kind: str, who: str, now: float) -> bool:
        entry = self._counts.get((kind, who))
        return entry is not None and entry[0] == int(now) // self.window and entry[1] >= self.limits[kind]

    def fail(self, kind: str, who: str, now: float) -> None:
        window = int(now) // self.window
        if len(self._counts) >= self.max_entries:
            # Bounded: forget old windows, and if this one alone is over half the limit (many
            # addresses, or made-up tenants), the entries first seen earliest. Keeping at most
            # half means the O(n) rebuild happens once per max_entries / 2 new entries, never
            # on every failure, which a flood of made-up tenants could otherwise force.
            current = [(k, v) for k, v in self._counts.items() if v[0] == window]
            self._counts = dict(current[-(self.max_entries // 2) :])
        entry = self._counts.get((kind, who))
        count = entry[1] + 1 if entry is not None and entry[0] == window else 1
        self._counts[(kind, who)] = (window, count)


class Security:
    """The STT1 check for one gateway: a keystore, a replay store, the audience, a clock.

    ``wrap(app)`` gives the pure-ASGI middleware to put in front of ``/rest``.
    """

    async def unavailable(self) -> str | None:
        """Why every call is refused (503) now, or None: what /healthz tells a load balancer.

        Asks the keystore as a call does (a Redis one fails once its last good read is
        MAX_STALE old), and a Redis replay store for a PING. A local store (a full disk, a lock
        held) is only known by its calls: the last one failed, under STORE_FAILURE_SHOWN seconds
        ago, and none succeeded since. Not for ever: a load balancer that took the host out
        sends no call that could show it is back.
        """
        try:
            self.keystore.snapshot()
        except KeystoreUnavailable as exc:
            return str(exc)
        failed = self._replay_failed
        if failed is not None and time.monotonic() - failed[0] < STORE_FAILURE_SHOWN:
            return failed[1]
        ping = getattr(self.replay, "ping", None)
        if ping is not None:
            try:
                await ping()
            except ReplayStoreError as exc:
                return str(exc)
        return None

    def __init__(
        self,
        keystore: Keystore,
        replay: MemoryReplayStore | SqliteReplayStore | Any,
        audience: str,
        *,
        clock: Callable[[], float] = server_clock,
        boot_time: float | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.keystore, self.replay, self.audience, self.clock = keystore, replay, audience.rstrip("/"), clock
        # A memory store forgets everything on restart: tokens minted before this process
        # started might have been used against the previous one, so they are refused (3.3).
        # The boot second itself counts as "before": the safer reading of "iat >= boot time".
        boot = clock() if boot_time is None else boot_time
        self.min_iat = math.ceil(boot) if not getattr(replay, "shared", False) else 0
        self.throttle = throttle or Throttle()
        self.on_failure: Callable[[str], None] | None = None  # called with a FAILURE_REASONS entry
        self._log_budgets: dict[str, tuple[int, int]] = {}  # per kind of line (_LOG_KINDS): (second, lines in it)
        # The last replay store failure (time.monotonic(), why) until an insert succeeds: /healthz
        # reports it for STORE_FAILURE_SHOWN seconds (see unavailable).
        self._replay_failed: tuple[float, str] | None = None

    def wrap(
        self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]]
    ) -> Callable[[_Scope, _Receive, _Send], Awaitable[None]]:
        return functools.partial(self._handle, app)  # no coroutine of its own per request

    # -- the checks

    async def _handle(self, app: Any, scope: _Scope, receive: _Receive, send: _Send) -> None:
        now = self.clock()
        request_id = scope.get(REQUEST_ID_KEY, b"-")
        client = scope.get("client")
        address = client[0] if client else "-"
        tid = None
        invalid = "malformed"  # what an InvalidToken means: until the shape is checked, a malformed token
        try:
            authorization, content_length, content_type = _read_headers(scope)
            parsed = parse(authorization)  # 2: shape and footer
            invalid = "signature"
            footer = parsed.footer
            tid = footer.tid
            if footer.direction != "c2s":
                raise _Refused("direction", "s2c token sent as a request")
            if abs(int(now) - footer.iat) > MAX_SKEW:  # 3: whole seconds, as iat is, so ±45 s is exact (PROTOCOL.md 8)
                raise _Refused("clock", f"iat {footer.iat} is {footer.iat - int(now):+d} s from now")
            if footer.iat < self.min_iat:
                raise _Refused("before_boot", "iat before this process started (memory replay store)")
            try:
                cache = self.keystore.snapshot()
            except KeystoreUnavailable as exc:  # no key can be trusted: fail closed
                self._log("store", request_id, str(exc))
                self._failed("keystore_unavailable")
                return await _reply(scope, send, 503, _error(b"overloaded", b"key store unavailable"), request_id)
            key = cache.keys.get((tid, footer.kid))  # 4
            if key is None or not key.usable(now):
                if key is not None or (tid, footer.kid) in cache.retired:
                    # Logged within the 401 budget: the token cannot be verified (its key is
                    # retired), so anyone who has seen the kid can send these.
                    raise _Refused("unknown_kid", f"ALERT: a token names retired kid {footer.kid}")
                raise _Refused("unknown_kid", "unknown, retired or expired kid")
            max_body = scope.get(MAX_BODY_KEY, DEFAULT_MAX_BODY)
            if content_length is not None and content_length > max_body:  # 5
                return await _reply(scope, send, 413, _error(b"too_large", b"the body is over the limit"), request_id)
            body = await _read_body(receive, max_body)
            if body is None:
                return await _reply(scope, send, 413, _error(b"too_large", b"the body is over the limit"), request_id)
            # The body may have been held back for as long as the client liked: steps 3 and 4
            # again, at the time of the replay check. Otherwise a used token could arrive in
            # time, send its body once its jti (kept until iat + 50) is forgotten, and run twice.
            now = self.clock()
            if abs(int(now) - footer.iat) > MAX_SKEW:
                raise _Refused("clock", f"iat {footer.iat} is {footer.iat - int(now):+d} s from now, after the body")
            if not key.usable(now):
                raise _Refused("unknown_kid", "kid retired or expired while the body was read")
            target = scope.get("raw_path") or scope["path"].encode()
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            implicit = request_assertion(self.audience, scope["method"], target, content_type, body)
            claims = open_token(key.c2s, parsed, implicit).claims  # 6, 7
        except _Refused as exc:
            return await self._unauthorized(scope, send, request_id, address, tid, now, exc.reason, str(exc))
        except InvalidToken:
            detail = "token does not verify" if invalid == "signature" else "malformed token"
            return await self._unauthorized(scope, send, request_id, address, tid, now, invalid, detail)
        assert isinstance(claims, RequestClaims)

        # From here on every answer is signed, bound to this request's jti.
        signed_send = self._signing_send(send, key, claims.jti)
        try:
            fresh = self.replay.check_and_insert(replay_key(tid, key.kid, claims.jti), footer.iat + REPLAY_TTL)  # 8
            if not isinstance(fresh, bool):  # a networked store (Redis) answers with an awaitable
                fresh = await fresh
            if self._replay_failed is not None:
                self._replay_failed = None
        except Exception as exc:  # any store failure: fail closed
            self._replay_failed = (time.monotonic(), f"replay store failed: {exc}")
            self._log("store", request_id, f"replay store failed: {exc}")
            self._failed("replay_store_unavailable")
            return await _reply(
                scope, signed_send, 503, _error(b"overloaded", b"replay protection unavailable"), request_id
            )
        if not fresh:  # a failure like any other for the throttle; the answer is signed, as after step 7
            return await self._unauthorized(
                scope, signed_send, request_id, address, tid, now, "replayed", "replayed jti"
            )
        if key.state == "pending":  # 10
            try:
                # A write (SQLite waits up to REQUEST_WAIT for its lock, Redis a round trip): in a
                # thread, so it holds up this call only, never the worker's event loop.
                promoted = await asyncio.to_thread(self.keystore.promote, key.kid)
            except (sqlite3.Error, OSError) as exc:
                # Locked, read-only or full. The call is still good: a pending kid is as valid as an
                # active one, and only the old kid's retirement waits. The next call under it retries.
                self._log("store", request_id, f"kid {key.kid} not promoted yet: {exc}")
                promoted = False
            if promoted:
                log.info(
                    "request %s: tenant %s now signs with kid %s; the old kid retires in %d s",
                    request_id.decode(),
                    tid,
                    key.kid,
                    GRACE_SECONDS,
                )
        scope[BODY_KEY] = body
        scope[TENANT_KEY] = tid
        scope[CALLER_KEY] = Caller(self, tid, cache.functions.get(tid), getattr(claims, "otp", None) or None)
        await app(scope, receive, signed_send)  # 9 happens in the dispatcher, 11 in signed_send

    def _failed(self, reason: str) -> None:
        if self.on_failure is not None:
            self.on_failure(reason)

    async def _throttled(self, scope: _Scope, send: _Send, request_id: bytes) -> None:
        self._failed("throttled")
        retry_after = ((b"retry-after", str(self.throttle.window).encode()),)
        body = _error(b"throttled", b"too many failed requests; retry later")
        await _reply(scope, send, 429, body, request_id, retry_after)

    async def _unauthorized(
        self,
        scope: _Scope,
        send: _Send,
        request_id: bytes,
        address: str,
        tid: str | None,
        now: float,
        reason: str,
        detail: str,
    ) -> None:
        blocked = self.throttle.blocked("addr", address, now) or (
            tid is not None and self.throttle.blocked("tid", tid, now)
        )
        # Logged first, whatever the answer: a throttled address must not be a place to use a
        # revoked key unseen (its ALERT), after a few junk tokens have earned it the 429s.
        answered = " (answered 429: throttled)" if blocked else ""
        kind = "alert" if detail.startswith("ALERT") else "refused"
        self._log(kind, request_id, f"{detail} (tenant {tid or '-'}, address {address}){answered}")
        if blocked:
            return await self._throttled(scope, send, request_id)
        self.throttle.fail("addr", address, now)
        if tid is not None:
            self.throttle.fail("tid", tid, now)
        self._failed(reason)
        await _reply(scope, send, 401, _UNAUTHORIZED, request_id, ((b"www-authenticate", b"STT1"),))

    def _log(self, kind: str, request_id: bytes, reason: str) -> None:
        """A line of one of _LOG_KINDS, at most 10 a second of each kind.

        A flood of bad tokens, or an outage in which every call fails, must not become a flood
        of log lines that buries the rest (and fills the disk) while saying nothing the first
        ten did not. Each kind has its own budget, so none hides another: junk tokens cannot use
        up the lines a revoked key's ALERT needs (forging that ALERT takes the kid, and then
        every forgery is an ALERT line itself), nor an outage those of the refusals.
        """
        level, form, more = _LOG_KINDS[kind]
        second = int(self.clock())
        last, logged = self._log_budgets.get(kind, (0, 0))
        logged = logged + 1 if last == second else 1
        self._log_budgets[kind] = (second, logged)
        if logged <= 10:
            log.log(level, form, request_id.decode(), reason)
        elif logged == 11:
            log.log(level, more)

    def _signing_send(self, send: _Send, key: CachedKey, request_jti: str) -> _Send:
        start: Any = None
        chunks: list[bytes] = []

        async def signed_send(message: Any) -> None:
            nonlocal start
            kind = message["type"]
            if kind == "http.response.start":
                start = message
                return
            if kind != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            body = b"".join(chunks)
            status = start["status"]
            headers = list(start.get("headers", ()))
            content_type = b""
            for name, value in headers:
                if name.lower() == b"content-type":
                    content_type = value
                    break
            now = self.clock()
            offered = key.offered_rk(now) if 200 <= status < 300 else None
            rk = msgspec.UNSET if offered is None else offered
            token = mint(
                key.s2c,
                int(now),
                ResponseClaims(jti=new_jti(), rk=rk),
                response_assertion(self.audience, request_jti, status, content_type, body),
            )
            headers.append((b"stt1-response", token.encode("ascii")))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return signed_send


def _read_headers(scope: _Scope) -> tuple[str, int | None, bytes]:
    """Step 1: exactly one ``Authorization: STT1 <token>`` of at most 1024 characters.

    Also returns the Content-Length (for step 5) and the raw Content-Type (for the assertion).
    """
    authorization = None
    content_length = None
    content_type = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is not None:
                raise _Refused("malformed", "more than one Authorization header")
            authorization = value
        elif name == b"content-length":
            try:
                content_length = int(value)
            except ValueError:
                raise _Refused("malformed", "Content-Length is not a number") from None
        elif name == b"content-type":
            content_type = bytes(value)
    if authorization is None:
        raise _Refused("missing", "no Authorization header")
    if len(authorization) > MAX_TOKEN_CHARS:
        raise _Refused("malformed", f"Authorization is over {MAX_TOKEN_CHARS} characters")
    if not authorization.startswith(b"STT1 "):
        raise _Refused("malformed", "Authorization is not an STT1 token")
    return authorization[5:].decode("latin-1"), content_length, content_type


async def _read_body(receive: _Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past ``limit`` (never read further)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused("disconnected", "client went away before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(code: bytes, message: bytes) -> bytes:
    return b'{"valid":false,"error":{"code":"' + code + b'","message":"' + message + b'"}}'


async def _reply(
    scope: _Scope,
    send: _Send,
    status: int,
    body: bytes,
    request_id: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """This layer's own answer: the request never reaches the gateway, which logs it from here."""
    scope[REFUSED_KEY] = status
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


#### CLI helpers


def sign_request(
    credential: Credential,
    method: str,
    target: bytes,
    content_type: bytes,
    body: bytes,
    now: float,
    otp: str | None = None,
) -> tuple[str, str]:
    """A request token for one call (and its jti, to check the response against).

    Signs with the rotated key when the credential holds one (PROTOCOL.md 5.3): the server
    may already have promoted it, and the old kid keeps working through the grace period.
    """
    kid, k = (credential.next.kid, credential.next.k) if credential.next else (credential.kid, credential.k)
    key = DirectionKey(b64decode(k), "c2s", credential.tid, kid)
    jti = new_jti()
    claims = RequestClaims(jti=jti, otp=otp) if otp is not None else RequestClaims(jti=jti)
    token = mint(key, int(now), claims, request_assertion(credential.url, method, target, content_type, body))
    return token, jti
