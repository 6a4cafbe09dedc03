"""Peer: a minimal raw ASGI app, the practical ceiling for one uvicorn worker.

No framework, no routing table, no auth: read the body, decode it into a typed struct with
msgspec (the same validation engine the gateway uses), answer. Anything slower than this is
framework or security cost, which is what the other peers and the gateway are measured against.

    uvicorn raw_asgi:app --app-dir bench/peers --port 8001 --no-access-log --log-level warning
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class AddArgs(msgspec.Struct, forbid_unknown_fields=True):
    a: float
    b: float


_decode = msgspec.json.Decoder(AddArgs).decode
_encode = msgspec.json.encode
_HEALTH = _encode({"status": "ok"})
_NOT_FOUND = _encode({"valid": False, "error": {"code": "not_found", "message": "no such route"}})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":  # served with --lifespan on, like the gateway
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path, method = scope["path"], scope["method"]
    if method == "POST" and path in ("/rest/add/", "/rest/add"):
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            args = _decode(body)
            status, payload = 200, _encode({"results": args.a + args.b, "valid": True})
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            status = 422
            payload = _encode({"valid": False, "error": {"code": "invalid_arguments", "message": str(exc)}})
    elif method == "GET" and path == "/healthz":
        status, payload = 200, _HEALTH
    else:
        status, payload = 404, _NOT_FOUND
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
