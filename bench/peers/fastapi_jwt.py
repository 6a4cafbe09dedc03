"""Peer: FastAPI + pydantic, with the PyJWT (HS256) check as a dependency.

The way the FastAPI documentation teaches it: a pydantic body model, an `HTTPBearer`
security dependency that decodes the JWT, and a typed response model. The gateway with
STT1 on is held to >= 2.5x its req/s.

The HS256 secret comes from BENCH_JWT_SECRET (bench/run.py generates one and mints the token).

    BENCH_JWT_SECRET=... uvicorn fastapi_jwt:app --app-dir bench/peers --port 8004 \
        --no-access-log --log-level warning
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

SECRET = os.environ["BENCH_JWT_SECRET"]

app = FastAPI(title="bench peer: FastAPI + pydantic + PyJWT")
bearer = HTTPBearer()


class AddArgs(BaseModel):
    a: float
    b: float


class AddResult(BaseModel):
    results: float
    valid: bool = True


async def claims(credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)]) -> dict[str, Any]:
    try:
        decoded: dict[str, Any] = jwt.decode(
            credentials.credentials, SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.InvalidTokenError:
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"}) from None
    return decoded


@app.post("/rest/add/")
async def add(args: AddArgs, _: Annotated[dict[str, Any], Depends(claims)]) -> AddResult:
    return AddResult(results=args.a + args.b)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
