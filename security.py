"""STT1 security: the token envelope (PROTOCOL.md sections 1 and 2).

One flat module, read top to bottom, in banner sections: envelope, then (appended later)
keystore, replay stores, middleware, CLI helpers.

The envelope is an unmodified PASETO v3.local token (HKDF-SHA384, AES-256-CTR,
HMAC-SHA384) under a per-time-step key derived from the credential secret K. Every failure to
read a token is one opaque ``InvalidToken``: callers and peers never learn which check failed.
Nothing in this section reads the clock; time comes in as ``iat`` or ``step`` parameters.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import re
import struct
from typing import Annotated, NamedTuple, NoReturn

import msgspec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

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

_LE64 = struct.Struct("<Q").pack
_LE64_MASK = 0x7FFF_FFFF_FFFF_FFFF  # PASETO clears the top bit for languages without uint64


def pae(*pieces: bytes) -> bytes:
    """PASETO pre-authentication encoding: lengths first, so no two piece lists collide.

    Used for the PASETO MAC input and for STT1's implicit assertions; never concatenate
    authenticated fields by hand. Pieces must be bytes (str raises TypeError).
    """
    return b"".join([_LE64(len(pieces) & _LE64_MASK), *[_LE64(len(p) & _LE64_MASK) + p for p in pieces]])


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


def _aes_ctr(key: bytes, counter: bytes, data: bytes) -> bytes:
    # CTR is its own inverse: the same call encrypts and decrypts.
    ctx = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    return ctx.update(data) + ctx.finalize()


def _seal(key: _LocalKey, payload: bytes, footer: bytes, implicit: bytes, nonce: bytes | None) -> str:
    if nonce is None:
        nonce = os.urandom(_NONCE_LEN)
    elif not isinstance(nonce, bytes) or len(nonce) != _NONCE_LEN:
        raise ValueError("a v3.local nonce is exactly 32 bytes")
    ek, n2 = key.encryption_key(nonce)
    c = _aes_ctr(ek, n2, payload)
    tag = hmac.digest(key.auth_key(nonce), pae(_HEADER_BYTES, nonce, c, footer, implicit), "sha384")
    token = _HEADER + b64encode(nonce + c + tag)
    if footer:
        token += "." + b64encode(footer)
    return token


def _unseal(key: _LocalKey, body: bytes, footer: bytes, implicit: bytes) -> bytes:
    nonce, c, tag = body[:_NONCE_LEN], body[_NONCE_LEN:-_TAG_LEN], body[-_TAG_LEN:]
    expected = hmac.digest(key.auth_key(nonce), pae(_HEADER_BYTES, nonce, c, footer, implicit), "sha384")
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

    __slots__ = ("_footer_prefix", "_ids", "_k_dir", "_steps")

    # A +-45 s window touches at most 4 steps; a few more cover mint and open in one process.
    _MAX_STEPS = 8

    def __init__(self, k: bytes, direction: str, tid: str, kid: str) -> None:
        self._k_dir = direction_key(k, direction, tid, kid)
        # Read-only: the ids are what K_dir is bound to, so they must not drift from it.
        self._ids = (direction, tid, kid)
        self._footer_prefix = f"{direction}.{tid}.{kid}.".encode("ascii")
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


def request_assertion(aud: str, method: str, target: bytes, content_type: bytes, body: bytes) -> bytes:
    """Bind a request token to this gateway, method, raw target, content type and body.

    Never sent, so both sides must build it from the same bytes: ``aud`` is the configured
    public origin (never the Host header), ``target`` the raw path plus ``?query`` exactly as
    on the request line, ``content_type`` the raw header value or b"".
    """
    return pae(b"stt1", b"c2s", aud.encode(), method.encode(), target, content_type, hashlib.sha256(body).digest())


def response_assertion(aud: str, request_jti: str, status: int, content_type: bytes, body: bytes) -> bytes:
    """Bind a response token to the request it answers (its jti), status, type and body."""
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    return pae(
        b"stt1",
        b"s2c",
        aud.encode(),
        request_jti.encode(),
        str(status).encode(),
        content_type,
        hashlib.sha256(body).digest(),
    )


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


def parse(token: str) -> UnverifiedToken:
    """Check a token's shape and footer without any key: the cheap first step on a server.

    Refuses anything over MAX_TOKEN_CHARS, any other version or purpose, a missing footer
    and any footer that is not exactly ``dir.tid.kid.<10 digits>``.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken()
    body, raw_footer = split(token)
    return UnverifiedToken(parse_footer(raw_footer), body, raw_footer)


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
    footer = key._footer_prefix + b"%010d" % iat  # the ids were checked when key was built
    return _seal(key._local_key(time_step(iat)), payload, footer, implicit, nonce)


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
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise InvalidToken() from None
    return Opened(footer, claims)
