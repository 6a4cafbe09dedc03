"""Peer: a plain Starlette route with msgspec, no auth.

The baseline the gateway with security off is held to (>= 90 % of its req/s): the same
framework the gateway's non-/rest routes use, with the same validation library, written the
way a Starlette user would write it.

    uvicorn starlette_plain:app --app-dir bench/peers --port 8002 --no-access-log --log-level warning
"""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class AddArgs(msgspec.Struct, forbid_unknown_fields=True):
    a: float
    b: float


_decode = msgspec.json.Decoder(AddArgs).decode
_encode = msgspec.json.encode


async def add(request: Request) -> Response:
    try:
        args = _decode(await request.body())
    except msgspec.DecodeError as exc:
        error = {"valid": False, "error": {"code": "invalid_arguments", "message": str(exc)}}
        return Response(_encode(error), 422, media_type="application/json")
    return Response(_encode({"results": args.a + args.b, "valid": True}), media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(_encode({"status": "ok"}), media_type="application/json")


app = Starlette(routes=[Route("/rest/add/", add, methods=["POST"]), Route("/healthz", healthz)])
