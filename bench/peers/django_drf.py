"""Peer: Django + Django REST framework `APIView`, with the same PyJWT (HS256) check.

A minimal single-file project (settings, URLs and view in one module), served by gunicorn
with one sync worker, the stock Django deployment. It is the "classic stack" reference
point: no middleware, JSON parser and renderer only, a DRF serializer for validation and a
DRF authentication class for the JWT.

Note that gunicorn's sync worker does not keep connections alive: every request opens a
new TCP connection, which is part of what this stack costs.

The HS256 secret comes from BENCH_JWT_SECRET (bench/run.py generates one and mints the token).

    BENCH_JWT_SECRET=... gunicorn --workers 1 --worker-class sync --bind 127.0.0.1:8005 \
        --chdir bench/peers --log-level warning django_drf:application
"""

from __future__ import annotations

import os
from typing import Any

import django
import jwt
from django.conf import settings

SECRET = os.environ["BENCH_JWT_SECRET"]

settings.configure(
    DEBUG=False,
    SECRET_KEY=SECRET,
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    INSTALLED_APPS=["rest_framework"],
    MIDDLEWARE=[],
    DATABASES={},
    USE_TZ=True,
    REST_FRAMEWORK={
        "DEFAULT_AUTHENTICATION_CLASSES": [],  # set per view below; the defaults need contrib.auth
        "DEFAULT_PERMISSION_CLASSES": [],
        "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
        "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
        "UNAUTHENTICATED_USER": None,
    },
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402  (needs settings first)
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from rest_framework import exceptions, serializers  # noqa: E402
from rest_framework.authentication import BaseAuthentication  # noqa: E402
from rest_framework.permissions import IsAuthenticated  # noqa: E402
from rest_framework.request import Request  # noqa: E402
from rest_framework.response import Response  # noqa: E402
from rest_framework.views import APIView  # noqa: E402


class TokenUser:
    """The caller as the JWT names it; DRF only needs `is_authenticated`."""

    is_authenticated = True

    def __init__(self, claims: dict[str, Any]) -> None:
        self.claims = claims


class JWTAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[TokenUser, str] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None  # -> IsAuthenticated refuses with 401
        try:
            claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.InvalidTokenError:
            raise exceptions.AuthenticationFailed("invalid token") from None
        return TokenUser(claims), token

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"  # makes DRF answer 401 rather than 403


class AddSerializer(serializers.Serializer):  # type: ignore[type-arg]
    a = serializers.FloatField()
    b = serializers.FloatField()


class AddView(APIView):
    authentication_classes = [JWTAuthentication]
    permission_classes = [IsAuthenticated]

    def post(self, request: Request) -> Response:
        args = AddSerializer(data=request.data)
        args.is_valid(raise_exception=True)
        return Response({"results": args.validated_data["a"] + args.validated_data["b"], "valid": True})


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [path("rest/add/", AddView.as_view()), path("healthz", healthz)]
application = get_wsgi_application()
