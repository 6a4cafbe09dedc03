"""The Python client of the gateway: STT1-signed calls, verified answers, in-band rotation.

One flat module in banner sections: errors, the client (prepare, send, verify, rotate), the
asyncio wrapper, the command line. The protocol is ``PROTOCOL.md``; this module is its client
part (sections 2, 4 and 5), built on the public API of ``security.py``: no crypto here.

    with Client("acme.cred") as gw:
        gw.call("power", 3)                      # POST /rest/power/3
        gw.call("add", a=1, b=2)                 # POST /rest/add/ with {"a": 1, "b": 2}
        gw.request("reserve", {"sku": "A-1"}, otp="123456")

Every answer is checked before its body is used: a response that is not signed by the gateway
for exactly this request is a failed call (``ResponseForged``), whatever it says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import logging
import os
import re
import secrets
import select
import ssl
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from security import (
    Credential,
    DirectionKey,
    InvalidToken,
    RequestClaims,
    ResponseClaims,
    RotatedKey,
    b64decode,
    mint,
    new_jti,
    open_token,
    parse,
    read_credential,
    request_assertion,
    response_assertion,
    write_credential,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "BadResponse",
    "Client",
    "DEFAULT_MAX_ANSWER",
    "DEFAULT_TIMEOUT",
    "GatewayError",
    "InvalidArguments",
    "MethodNotAllowed",
    "NotFound",
    "Overloaded",
    "RateLimited",
    "ResponseForged",
    "ServerError",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unreachable",
    "UnsupportedMediaType",
    "main",
]

log = logging.getLogger("gateway.client")


#### Errors


class GatewayError(Exception):
    """Any failed call: the HTTP status (0 when there was none), a short code and a message.

    For a signed error the code and message are the gateway's own. For everything else they
    are fixed texts of this module: an unverified body is never quoted, and no message ever
    holds a key or a token.
    """

    # The X-Request-Id this client sent with the call, to find the server's log line.
    request_id: str | None = None
    # True for an error the gateway signed: its code and message are facts. False for an
    # unsigned hint (PROTOCOL.md 4), which anyone on the path could have sent, and for errors
    # of this client.
    verified: bool = False

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status!r}, {self.code!r}, {self.message!r})"

    def __reduce__(self) -> tuple[type[GatewayError], tuple[int, str, str], dict[str, Any]]:
        # OSError (a base of Unreachable) keeps only two of the three args: rebuild from ours.
        return type(self), (self.status, self.code, self.message), {
            "request_id": self.request_id,
            "verified": self.verified,
        }


class BadRequest(GatewayError):
    """400: the body is not a JSON object (signed)."""


class Unauthorized(GatewayError):
    """401: the gateway refused the token. Usually unsigned: then it means nothing but "retry"."""


class NotFound(GatewayError):
    """404: no such function, or not one this tenant may call (signed)."""


class MethodNotAllowed(GatewayError):
    """405 (signed)."""


class TooLarge(GatewayError):
    """413: the request body is over the gateway's limit (unsigned: refused before verifying)."""


class UnsupportedMediaType(GatewayError):
    """415 (signed)."""


class InvalidArguments(GatewayError):
    """422: the arguments did not bind or validate; the message names the field (signed)."""


class RateLimited(GatewayError):
    """429: throttled (usually unsigned: throttling happens before the token is read)."""


class ServerError(GatewayError):
    """500: the function raised or returned something JSON cannot carry (signed)."""


class Overloaded(GatewayError):
    """503: too many calls in progress, or the replay store is down (signed); retry later.

    Unsigned when the key store is down, as the token cannot be verified then: code
    ``unavailable``, the body unread.
    """


class Timeout(GatewayError):
    """504: the function ran past its timeout (signed)."""


class ResponseForged(GatewayError):
    """The answer is not signed by the gateway for this request: its body was not used.

    Raised for a missing, malformed or failing ``STT1-Response`` token (wrong key, kid,
    tenant, direction, request jti, status, content type or body), for any status other
    than an unsigned 400/401/408/413/429/431/503 (and a proxy's 502/504, which are Unreachable),
    and for a rotated key on a non-2xx answer.
    """


class BadResponse(GatewayError):
    """A verified answer whose body does not follow the gateway's JSON contract."""


class Unreachable(GatewayError, ConnectionError):
    """No HTTP answer: connection refused or dropped, TLS failure, or no answer in time."""


_SIGNED_ERRORS: dict[int, type[GatewayError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    413: TooLarge,
    415: UnsupportedMediaType,
    422: InvalidArguments,
    429: RateLimited,
    500: ServerError,
    503: Overloaded,
    504: Timeout,
}

# Unsigned answers that are legitimate before the token is verified (PROTOCOL.md 3), and the
# HTTP layer's own refusals, sent before there is a request to sign for (README: 400, 408, 431):
# a hint, never a fact. Their body is not read.
_UNSIGNED_HINTS: dict[int, tuple[type[GatewayError], str, str]] = {
    400: (BadRequest, "bad_request", "the gateway could not read the request as HTTP (unsigned answer)"),
    401: (Unauthorized, "unauthorized", "the gateway refused the token (unsigned answer)"),
    408: (GatewayError, "timeout", "the request did not reach the gateway in time (unsigned answer)"),
    413: (TooLarge, "too_large", "the request body is over the gateway's limit (unsigned answer)"),
    429: (RateLimited, "rate_limited", "throttled by the gateway (unsigned answer)"),
    431: (TooLarge, "too_large", "the request's URL and headers are over the gateway's limit (unsigned answer)"),
    # Sent before the token can be verified (the key store is down): the gateway is unavailable.
    503: (Overloaded, "unavailable", "the gateway is unavailable; retry later (unsigned answer)"),
    # Never the gateway's (its 504 is signed): a proxy in front of it that got no answer, or none
    # in time. Called a forgery, they raised a false alarm whenever the gateway was down.
    502: (
        Unreachable,
        "unreachable",
        "no answer from the gateway: a proxy in front of it answered 502 (unsigned); the call may have run,"
        " so check before retrying",
    ),
    504: (
        Unreachable,
        "unreachable",
        "no answer from the gateway in time: a proxy in front of it answered 504 (unsigned); the call may have"
        " run, so check before retrying",
    ),
}


#### Client

_JSON = b"application/json"
_OTP_RE = re.compile(r"[0-9]{6}")
# The pattern of stt1.js's checkCredentialKeys, case and all: scheme://host[:port] and nothing
# else. urlsplit alone would take "HTTP://", a trailing "?" or "#", and drops tabs and newlines
# anywhere, so the client would sign for an audience the gateway never matches. JS's \s also
# covers U+FEFF, Python's does not.
_ORIGIN_RE = re.compile(r"https?://[^/?#@\s\\\ufeff]+")
# A verified answer was signed somewhere between the request's signing and the answer's
# arrival, so the offset learned from its iat can be wrong by up to that round trip. The
# gateway allows 45 s either way (PROTOCOL.md 3.3): an answer held back longer than that (a
# slow link, or an on-path attacker delaying it) would teach an offset that puts every later
# iat outside the window, and the unsigned 401s that follow can correct nothing. Learn only
# from a round trip short enough to leave the window ample room.
_OFFSET_MAX_ROUND_TRIP = 10.0


class _Ok(msgspec.Struct):
    results: Any
    valid: Literal[True]


class _ErrorDetail(msgspec.Struct):
    code: str
    message: str


class _Error(msgspec.Struct):
    valid: Literal[False]
    error: _ErrorDetail


_DECODE_OK = msgspec.json.Decoder(_Ok).decode
_DECODE_ERROR = msgspec.json.Decoder(_Error).decode
_ENCODE = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One signed request, exactly as it goes on the wire, and what its answer must match."""

    method: str
    target: str  # ASCII: path plus ?query, byte for byte as on the request line
    body: bytes
    headers: dict[str, str] = field(repr=False)  # holds the token
    jti: str  # the answer must be bound to it
    kid: str  # the answer must be signed under it
    request_id: str
    signed_at: float  # local clock when signed: the answer cannot have been signed before it


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a credential's url, which must be a bare origin.

    The url is the AUD every token is bound to, so it is used as written; anything but
    ``scheme://host[:port]`` would make the client and the gateway disagree about it.
    """
    parts = urllib.parse.urlsplit(url)
    if not _ORIGIN_RE.fullmatch(url) or not parts.hostname:
        raise ValueError(f"the credential url must be an origin like https://api.example.com, not {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the credential url has a bad port: {url!r}") from None
    return parts.scheme, parts.hostname, port


def _rest_target(func: str, var1: Any) -> str:
    """``/rest/<func>/`` or ``/rest/<func>/<var1>``, percent-encoded, ASCII only."""
    if not isinstance(func, str) or not func.isidentifier():
        raise ValueError(f"a function name is a Python identifier, not {func!r}")
    target = f"/rest/{urllib.parse.quote(func, safe='')}/"
    if var1 is None:
        return target
    text = str(var1)
    # The gateway drops an empty last segment and intermediaries may collapse dot segments:
    # the call would silently change meaning, so refuse it here.
    if text in ("", ".", ".."):
        raise ValueError(f"var1 cannot be {text!r} in a URL; pass it by name in args")
    return target + urllib.parse.quote(text, safe="")


# The gateway lets a call run 30 s (its --timeout) unless the function's entry sets its own. A
# client that gives up first reports a call still running as unreachable, and a retry runs it
# twice: wait longer, with a margin for the network and a queue in front of the gateway.
GATEWAY_CALL_TIMEOUT = 30.0
DEFAULT_TIMEOUT = GATEWAY_CALL_TIMEOUT + 10.0
# The largest answer body read, by default: four times the gateway's default --max-result.
# Anyone on the path can send a body of any size; it is never read whole beyond this.
DEFAULT_MAX_ANSWER = 64 << 20


class Client:
    """A gateway client for one credential file: one keep-alive connection, calls in series.

    Thread-safe: a lock serializes calls, because they share the connection and the rotation
    state (the key that signs, the learned clock offset). For parallel calls use several
    Clients; they (and other processes, the CLI too) may share one credential file: a rotation
    is written under a lock, and only over what this Client last read (see ``_save``).

    ``timeout`` is seconds per network read; the default outlasts the gateway's default call
    timeout. Give more to call a function whose entry sets a longer ``timeout``.
    ``max_answer`` is the largest answer body read, in bytes: raise it for a gateway whose
    ``--max-result`` is over 64 MiB. The body of an unsigned answer is never read.
    """

    def __init__(
        self,
        cred_path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        max_answer: int = DEFAULT_MAX_ANSWER,
    ) -> None:
        self._path = os.fspath(cred_path)
        cred = read_credential(self._path)
        _warn_if_readable(self._path)
        self._scheme, self._host, self._port = _origin(cred.url)
        self._cred: Credential = cred
        self._clock = clock
        self._timeout = timeout
        self._max_answer = max_answer
        # Learned only from the iat of verified responses (PROTOCOL.md 4).
        self._offset = 0.0
        self._keys: dict[str, tuple[DirectionKey, DirectionKey]] = {}
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Client(url={self._cred.url!r}, tid={self._cred.tid!r}, kid={self._signing()[0]!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        with self._lock:
            self._drop()

    # -- public calls ----------------------------------------------------------------------

    def call(self, func: str, var1: Any = None, /, **kwargs: Any) -> Any:
        """Call ``func`` with keyword arguments (and the URL's var1); return its results."""
        return self.request(func, kwargs, var1=var1)

    def request(
        self,
        func: str,
        args: dict[str, Any] | None = None,
        *,
        var1: Any = None,
        otp: str | None = None,
    ) -> Any:
        """The general form of ``call``: arguments as a dict, and an authenticator code.

        ``otp`` is the 6-digit code for a function flagged ``otp`` (PROTOCOL.md 6); it travels
        inside the encrypted token, never in the body. Raises a ``GatewayError`` subclass.
        """
        with self._lock:
            return self._roundtrip(self._prepare_call(func, args, var1=var1, otp=otp))

    def catalog(self) -> dict[str, Any]:
        """The functions this tenant may call: doc, var1 and argument schema of each."""
        with self._lock:
            results = self._roundtrip(self._prepare("GET", "/rest/", b""))
        if not isinstance(results, dict):
            raise BadResponse(200, "bad_response", "the catalog is not a JSON object")
        return results

    # -- signing ---------------------------------------------------------------------------

    def _signing(self) -> tuple[str, str]:
        """(kid, k) that signs: a stored ``next`` as soon as it is durable (PROTOCOL.md 5.3).

        At start-up too: the gateway may already have promoted it, and signing with it is
        what promotes it otherwise.
        """
        nxt = self._cred.next
        if isinstance(nxt, RotatedKey):
            return nxt.kid, nxt.k
        return self._cred.kid, self._cred.k

    def _direction_keys(self, kid: str, k: str) -> tuple[DirectionKey, DirectionKey]:
        """(c2s, s2c) for a kid, built once: two HKDFs, and their step keys cached inside."""
        keys = self._keys.get(kid)
        if keys is None:
            secret = b64decode(k)
            tid = self._cred.tid
            keys = self._keys[kid] = (DirectionKey(secret, "c2s", tid, kid), DirectionKey(secret, "s2c", tid, kid))
        return keys

    def _prepare_call(
        self, func: str, args: dict[str, Any] | None, *, var1: Any = None, otp: str | None = None
    ) -> _Prepared:
        """The signed ``POST /rest/<func>/[<var1>]`` with the arguments as a JSON object.

        No arguments, no body (the gateway reads it as ``{}``): a function whose entry sets
        ``max_body: 0`` takes its argument in the URL only, and refuses even ``{}``.
        """
        if args is None:
            args = {}
        if not isinstance(args, dict) or not all(isinstance(name, str) for name in args):
            raise TypeError("args must be a dict with str keys")
        return self._prepare("POST", _rest_target(func, var1), _ENCODE(args) if args else b"", otp=otp)

    def _prepare(self, method: str, target: str, body: bytes, *, otp: str | None = None) -> _Prepared:
        """Sign one request: a fresh jti, bound to the audience, method, target, type and body."""
        if otp is not None and (not isinstance(otp, str) or not _OTP_RE.fullmatch(otp)):
            raise ValueError("otp must be the 6 digits of the authenticator code")
        kid, k = self._signing()
        c2s, _ = self._direction_keys(kid, k)
        content_type = _JSON if method == "POST" else b""
        jti = new_jti()
        claims = RequestClaims(jti=jti) if otp is None else RequestClaims(jti=jti, otp=otp)
        # The token covers the exact bytes sent: target as on the request line, the header
        # value as sent (b"" when there is none) and the body.
        implicit = request_assertion(self._cred.url, method, target.encode("ascii"), content_type, body)
        signed_at = self._clock()
        token = mint(c2s, int(signed_at + self._offset), claims, implicit)
        request_id = secrets.token_hex(8)
        headers = {"Authorization": f"STT1 {token}", "Accept": "application/json", "X-Request-Id": request_id}
        if content_type:
            headers["Content-Type"] = content_type.decode("ascii")
        return _Prepared(method, target, body, headers, jti, kid, request_id, signed_at)

    # -- verifying -------------------------------------------------------------------------

    def _verify(self, prepared: _Prepared, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> Any:
        """Check an answer to ``prepared`` (PROTOCOL.md 4); return its results or raise.

        ``headers`` are (name, value) pairs as http.client gives them (values latin-1 text,
        i.e. the raw bytes). Nothing of the answer is used before its token verifies: not
        the body, not the iat, not a rotated key.
        """
        received_at = self._clock()
        tokens: list[str] = []
        content_types: list[str] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == "stt1-response":
                tokens.append(value)
            elif lowered == "content-type":
                content_types.append(value)
        if not tokens and status in _UNSIGNED_HINTS:
            if status == 401:
                self._adopt_stored()
            cls, code, message = _UNSIGNED_HINTS[status]
            raise cls(status, code, message)
        forged = ResponseForged(status, "response_forged", "the answer is not signed by the gateway; body not used")
        # Steps 1, 2, 6 and 7 of the server's checks, with dir s2c, our tid, the kid that
        # signed the request and REQUEST_JTI = the jti we sent. Two headers, or two content
        # types, leave it unclear which bytes were signed: refused.
        if len(tokens) != 1 or len(content_types) > 1:
            raise forged
        content_type = content_types[0].encode("latin-1") if content_types else b""
        try:
            _, s2c = self._direction_keys(*self._key_for(prepared.kid))
            implicit = response_assertion(self._cred.url, prepared.jti, status, content_type, body)
            opened = open_token(s2c, parse(tokens[0]), implicit)
        except (InvalidToken, ValueError, KeyError):
            raise forged from None
        claims = opened.claims
        ok = 200 <= status < 300
        if not isinstance(claims, ResponseClaims):
            raise forged
        # A rotated key only ever comes with a 2xx (PROTOCOL.md 5.5): a signed error that
        # carries one is not something this gateway sends; use nothing of it.
        if isinstance(claims.rk, RotatedKey) and not ok:
            raise forged

        # Verified from here on. A slow answer is still a good answer, but its iat says
        # little about the gateway's clock now: keep the offset we had (see
        # _OFFSET_MAX_ROUND_TRIP). A clock that went back during the call measures nothing.
        if 0 <= received_at - prepared.signed_at <= _OFFSET_MAX_ROUND_TRIP:
            self._offset = opened.footer.iat - received_at
        self._promote(prepared.kid)
        if isinstance(claims.rk, RotatedKey):
            self._store_next(claims.rk)
        return _results(status, body)

    def _key_for(self, kid: str) -> tuple[str, str]:
        """The secret for a kid we signed with: the current key or the stored next one."""
        nxt = self._cred.next
        if isinstance(nxt, RotatedKey) and nxt.kid == kid:
            return nxt.kid, nxt.k
        if self._cred.kid == kid:
            return self._cred.kid, self._cred.k
        raise KeyError(kid)  # e.g. promoted in between: the answer cannot be checked

    # -- rotation (PROTOCOL.md 5) ----------------------------------------------------------

    def _store_next(self, rk: RotatedKey) -> None:
        """Keep a rotated key: durably first, and only then sign with it."""
        current = self._cred.next
        if isinstance(current, RotatedKey) or rk.kid == self._cred.kid:
            # The same rk again is already stored. A different one while one is pending
            # cannot happen with calls in series; the first stays (a key we may already have
            # signed with must not be lost).
            return
        try:
            self._save(msgspec.structs.replace(self._cred, next=rk))
        except (OSError, ValueError) as exc:
            # Not durable, so not used: the gateway keeps offering it on every 2xx.
            log.warning("could not store the rotated key in %s (%s); will retry", self._path, _reason(exc))

    def _promote(self, kid: str) -> None:
        """A verified answer under the next kid: it is now the key; drop the old one."""
        nxt = self._cred.next
        if not isinstance(nxt, RotatedKey) or nxt.kid != kid:
            return
        try:
            self._save(msgspec.structs.replace(self._cred, kid=nxt.kid, k=nxt.k, next=msgspec.UNSET))
        except (OSError, ValueError) as exc:
            # Harmless: we already sign with next, and a restart reads next and signs with it.
            log.warning("could not store the promoted key in %s (%s); will retry", self._path, _reason(exc))

    def _save(self, updated: Credential) -> None:
        """Replace the credential this Client last read or wrote by ``updated``: compare, then write.

        Another Client, process or the CLI may share the file and have rotated further: writing
        our older view over theirs would leave only a retiring key, lost after its grace period.
        So, under an exclusive lock, the file is written only if it still holds what this Client
        last read or wrote; otherwise the file wins and this Client adopts it (the gateway offers
        a still pending key again with the next 2xx). When in doubt, the stored record stays.
        """
        with _locked(self._path):
            on_disk = read_credential(self._path)
            if on_disk == self._cred:
                write_credential(self._path, updated)
            elif (on_disk.url, on_disk.tid) != (self._cred.url, self._cred.tid):
                raise ValueError("it now holds another credential")
            else:
                updated = on_disk
        self._adopt(updated)

    def _adopt_stored(self) -> None:
        """After an unsigned 401: take the file's keys if another Client or process moved on.

        A Client idle past a rotation's grace period signs with a retired key, and every call
        gets an unsigned 401, while the shared file holds the newer key. The refused call is not
        retried (an unsigned 401 can be forged after the call ran); the next one signs with what
        is stored. Anyone can send an unsigned 401, so this only ever reads our own file.
        """
        try:
            with _locked(self._path):
                on_disk = read_credential(self._path)
        except (OSError, ValueError):
            return
        if (on_disk.url, on_disk.tid) == (self._cred.url, self._cred.tid):
            self._adopt(on_disk)

    def _adopt(self, credential: Credential) -> None:
        self._cred = credential
        kids = {credential.kid} | ({credential.next.kid} if isinstance(credential.next, RotatedKey) else set())
        for kid in self._keys.keys() - kids:
            del self._keys[kid]

    # -- transport -------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _roundtrip(self, prepared: _Prepared) -> Any:
        try:
            status, headers, body = self._exchange(prepared)
            return self._verify(prepared, status, headers, body)
        except GatewayError as exc:
            exc.request_id = prepared.request_id
            raise

    def _exchange(self, prepared: _Prepared) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send exactly the prepared bytes; read the answer, its body only if it is signed.

        http.client puts ``target`` on the request line as given (httpx and requests may
        re-encode a path, which would break the signature). A keep-alive connection the
        server closed while idle is seen before sending and replaced. One that drops as the
        request goes out is tried once more, on a new connection, with the SAME token: if the
        first attempt did reach the gateway, its replay check refuses the second, so a call
        never runs twice, and that refusal is reported as what it means, "may have run".
        """
        resent = False
        for attempt in (1, 2):
            if self._conn is not None and _dropped(self._conn.sock):
                self._drop()
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                conn.request(prepared.method, prepared.target, body=prepared.body or None, headers=prepared.headers)
                response = conn.getresponse()
                body = self._read_body(response)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
                # RemoteDisconnected is a ConnectionResetError: the usual stale keep-alive.
                self._drop()
                if reused and attempt == 1:
                    resent = True
                    continue
                raise self._unreachable(exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise self._unreachable(exc) from exc
            except BaseException:
                self._drop()  # e.g. KeyboardInterrupt mid-request: the connection state is unknown
                raise
            if response.will_close or not response.isclosed():
                self._drop()  # an unread body, or the server's close: the connection is done
            if resent and response.status == 401:
                # Signed or not, most likely the replay check refusing the resend: the first
                # attempt reached the gateway, and its answer was lost with the connection.
                raise Unreachable(
                    0,
                    "unreachable",
                    f"{self._cred.url}: the connection dropped after the request went out, and the gateway"
                    " refused it sent again as already seen: the call may have run, so check before retrying",
                )
            return response.status, response.getheaders(), body
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        """The body of a signed answer, up to ``max_answer`` bytes; nothing of an unsigned one.

        An unsigned answer's body is never used (PROTOCOL.md 4), so it is not read at all:
        anyone on the path could make it as large as they like.
        """
        if response.getheader("STT1-Response") is None:
            return b""
        body = response.read(self._max_answer + 1)
        if len(body) > self._max_answer:
            self._drop()
            raise BadResponse(
                response.status,
                "bad_response",
                f"an answer over {self._max_answer} bytes, not read (see the client's max_answer)",
            )
        return body

    def _unreachable(self, exc: BaseException) -> Unreachable:
        if isinstance(exc, TimeoutError):
            # Once the request is out the function may be running, or done: a blind retry could
            # run it twice.
            reason = (
                f"no answer within {self._timeout:g} s; the call may still have run on the gateway,"
                " so check before retrying"
            )
        elif isinstance(exc, http.client.HTTPException) and not isinstance(exc, http.client.RemoteDisconnected):
            # BadStatusLine and its kind quote what came back, and nothing verified it: an
            # on-path sender could write to the user's terminal through this message.
            reason = f"{type(exc).__name__}: the answer is not HTTP (its text is not shown: nothing verified it)"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Unreachable(0, "unreachable", f"{self._cred.url}: {reason}")


def _dropped(sock: Any) -> bool:
    """Is an idle keep-alive socket unusable? Closed by the server (or sent something unasked
    for), it polls readable; a live idle one does not. Checked before sending, when a new
    connection still costs nothing but a handshake."""
    if sock is None:
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


# msgspec raises these besides DecodeError: for bad UTF-8 inside a string, and for deep nesting.
_UNDECODABLE = (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _results(status: int, body: bytes) -> Any:
    """The results of a verified answer, or the gateway's error as an exception."""
    if 200 <= status < 300:
        try:
            return _DECODE_OK(body).results
        except _UNDECODABLE:
            raise BadResponse(status, "bad_response", "a success without `results`") from None
    try:
        detail = _DECODE_ERROR(body).error
    except _UNDECODABLE:
        raise BadResponse(status, "bad_response", "an error without a JSON error body") from None
    error = _SIGNED_ERRORS.get(status, GatewayError)(status, detail.code, detail.message)
    error.verified = True
    raise error


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock for read-compare-write of a credential file, shared by every process.

    The lock is a sidecar file (``<path>.lock``, left in place): the credential file itself is
    replaced by rename on every write, so a lock on it would guard a file no longer there.
    """
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.name == "posix":  # elsewhere the comparison alone still keeps the newer record
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _reason(exc: OSError | ValueError) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _warn_if_readable(path: str) -> None:
    # The file holds K in the clear: PROTOCOL.md 1 says 0600. Warn, as ssh does, but go on.
    if os.name == "posix" and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        log.warning("%s is readable by other users; it holds a secret (chmod 600)", path)


#### Asyncio

# AsyncClient runs Client in a worker thread instead of re-implementing it on an async HTTP
# library: the security-critical logic (signing, verifying, rotation) exists once, and
# http.client gives exact control of the request line, which the signature covers.


class AsyncClient:
    """``Client`` for asyncio: the same methods, as coroutines.

    Calls still run one at a time per client (they share a connection and rotation state).
    A cancelled call's thread finishes its request in the background.
    """

    def __init__(
        self,
        cred_path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        max_answer: int = DEFAULT_MAX_ANSWER,
    ) -> None:
        self._client = Client(cred_path, clock=clock, timeout=timeout, max_answer=max_answer)

    def __repr__(self) -> str:
        return f"Async{self._client!r}"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, func: str, var1: Any = None, /, **kwargs: Any) -> Any:
        """See ``Client.call``."""
        return await asyncio.to_thread(self._client.request, func, kwargs, var1=var1)

    async def request(
        self,
        func: str,
        args: dict[str, Any] | None = None,
        *,
        var1: Any = None,
        otp: str | None = None,
    ) -> Any:
        """See ``Client.request``."""
        return await asyncio.to_thread(self._client.request, func, args, var1=var1, otp=otp)

    async def catalog(self) -> dict[str, Any]:
        """See ``Client.catalog``."""
        return await asyncio.to_thread(self._client.catalog)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)


#### Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py",
        description="Call a gateway function with an STT1 credential and print its results as JSON.",
    )
    parser.add_argument("--cred", required=True, metavar="FILE", help="the credential file (JSON, mode 0600)")
    parser.add_argument("func", nargs="?", metavar="FUNC", help="the function to call")
    parser.add_argument("var1", nargs="?", metavar="VAR1", help="the URL's var1 (the first parameter)")
    parser.add_argument("--json", metavar="OBJECT", help="the keyword arguments as a JSON object")
    parser.add_argument("--otp", metavar="CODE", help="the authenticator code, for functions that need one")
    parser.add_argument("--catalog", action="store_true", help="print the functions this credential may call")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait per network read (default {DEFAULT_TIMEOUT:g}: past the gateway's default call"
        " timeout; give more for a function whose entry sets a longer one)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the results on stdout, 1 on a gateway error, 2 on a usage or file error."""
    parser = _parser()
    opts = parser.parse_args(argv)
    if opts.catalog == (opts.func is not None):
        parser.error("give either FUNC or --catalog")
    if not opts.timeout > 0:  # 0 made every call "unreachable" (a non-blocking socket); "not >" refuses nan
        parser.error("--timeout must be a positive number of seconds")
    if opts.catalog and (opts.var1 is not None or opts.otp is not None or opts.json is not None):
        parser.error("--catalog takes no VAR1, --json or --otp")
    try:
        args = msgspec.json.decode(opts.json or "{}")
    except msgspec.DecodeError as exc:
        parser.error(f"--json: {exc}")
    except UnicodeError:  # an argument that is not UTF-8 reaches us with lone surrogates
        parser.error("--json: not valid UTF-8")
    except RecursionError:
        parser.error("--json: nested too deeply")
    if not isinstance(args, dict):
        parser.error("--json must be a JSON object")
    try:
        client = Client(opts.cred, timeout=opts.timeout)
    except OSError as exc:  # str() of it reads "[Errno 2] ...": say which file, and why
        print(f"error: cannot read the credential file {opts.cred}: {_reason(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the file was read: its error names it and what is wrong
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            if opts.catalog:
                results = client.catalog()
            else:
                results = client.request(opts.func, args, var1=opts.var1, otp=opts.otp)
    except GatewayError as exc:
        # Status 0 is no HTTP answer at all (Unreachable): "0 unreachable" would read as one.
        print(f"error: {exc.code}: {exc.message}" if exc.status == 0 else f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad FUNC, VAR1 or --otp, found before anything was sent
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(_ENCODE(results) + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
