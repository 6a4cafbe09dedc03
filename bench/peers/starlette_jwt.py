"""Peer: the plain Starlette route behind a pure-ASGI PyJWT (HS256) check.

The closest like-for-like to the gateway with STT1 on: a lean framework, a pure-ASGI
middleware that authenticates every /rest/ call before the handler runs. The gateway's
target is >= 1.2x its req/s with a p99 no worse. A JWT is reusable (no replay check, no
request binding, no signed response), which is exactly the cost difference being measured.

The HS256 secret comes from BENCH_JWT_SECRET (bench/run.py generates one and mints the token).

    BENCH_JWT_SECRET=... uvicorn starlette_jwt:app --app-dir bench/peers --port 8003 \
        --no-access-log --log-level warning
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import jwt
import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECRET = os.environ["BENCH_JWT_SECRET"]


class AddArgs(msgspec.Struct, forbid_unknown_fields=True):
    a: float
    b: float


_decode = msgspec.json.Decoder(AddArgs).decode
_encode = msgspec.json.encode
_UNAUTHORIZED = _encode(
    {"valid": False, "error": {"code": "unauthorized", "message": "a valid bearer token is needed"}}
)


class JWTMiddleware:
    """Verify `Authorization: Bearer <HS256 JWT>` on /rest/ before the app sees the request."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app, self.secret = app, secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/rest/"):
            await self.app(scope, receive, send)
            return
        header = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        try:
            if scheme.lower() != "bearer":
                raise jwt.InvalidTokenError("not a bearer token")
            scope["jwt.claims"] = jwt.decode(
                token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
            )
        except jwt.InvalidTokenError:
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _UNAUTHORIZED})
            return
        await self.app(scope, receive, send)


async def add(request: Request) -> Response:
    try:
        args = _decode(await request.body())
    except msgspec.DecodeError as exc:
        error = {"valid": False, "error": {"code": "invalid_arguments", "message": str(exc)}}
        return Response(_encode(error), 422, media_type="application/json")
    return Response(_encode({"results": args.a + args.b, "valid": True}), media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(_encode({"status": "ok"}), media_type="application/json")


app = Starlette(
    routes=[Route("/rest/add/", add, methods=["POST"]), Route("/healthz", healthz)],
    middleware=[Middleware(JWTMiddleware, secret=SECRET)],
)
