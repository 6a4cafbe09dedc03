"""Atheris harness: the STT1 token parser and opener under fixed keys.

The first byte of an input picks what the rest is (byte % 4):

0, 1. A token (latin-1, as the middleware decodes the header), parsed and opened with the fixed
   c2s (0) or s2c (1) key and implicit assertion of ``common``. Every input must either be
   refused with InvalidToken or be exactly one of ``common.minted_tokens()``: accepting any
   other string is a forgery, and any other exception a crash. A token that parses must also be
   the one canonical spelling of what it decodes to.
2. A payload, sealed under the right c2s step key and opened: either InvalidToken, or claims
   that ``mint`` accepts back (we never accept what we would refuse to send) and that encode to
   a payload within the 512-byte limit.
3. Text for ``b64decode``: ValueError, or bytes that ``b64encode`` spells exactly as the text.

Run it with ``fuzz/run.py token --seconds N`` (see fuzz/README.md).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["security"]):
    import common

security = common.security

KEYS = common.token_keys()
MINTED = {direction: set(tokens) for direction, tokens in common.minted_tokens().items()}
IMPLICIT = {"c2s": common.REQUEST_IMPLICIT, "s2c": common.RESPONSE_IMPLICIT}
STEP_KEY = security.step_key(
    security.direction_key(common.TOKEN_K, "c2s", common.TOKEN_TID, common.TOKEN_KID), security.time_step(common.T0)
)
FOOTER = security.build_footer("c2s", common.TOKEN_TID, common.TOKEN_KID, common.T0)


def check_token(direction: str, token: str) -> None:
    try:
        parsed = security.parse(token)
    except security.InvalidToken:
        return
    body, footer = parsed._body, parsed._raw_footer
    canonical = f"v3.local.{security.b64encode(body)}.{security.b64encode(footer)}"
    assert token == canonical, f"parse accepted a non-canonical spelling: {token!r}"
    try:
        opened = security.open_token(KEYS[direction], parsed, IMPLICIT[direction])
    except security.InvalidToken:
        return
    assert token in MINTED[direction], f"accepted a token that was never minted: {token!r}"
    assert opened.footer.direction == direction and opened.footer.tid == common.TOKEN_TID


def check_payload(payload: bytes) -> None:
    token = security.encrypt(STEP_KEY, payload, FOOTER, common.REQUEST_IMPLICIT)
    try:
        opened = security.open_token(KEYS["c2s"], token, common.REQUEST_IMPLICIT)
    except security.InvalidToken:
        return
    claims = opened.claims
    assert isinstance(claims, security.RequestClaims), claims
    again = security.mint(KEYS["c2s"], common.T0, claims, common.REQUEST_IMPLICIT)  # ValueError: a crash
    assert security.open_token(KEYS["c2s"], again, common.REQUEST_IMPLICIT).claims == claims


def check_b64(text: str) -> None:
    try:
        raw = security.b64decode(text)
    except ValueError:
        return
    assert security.b64encode(raw) == text, f"b64decode accepted a non-canonical spelling: {text!r}"


def check(data: bytes) -> None:
    """Run one input; raise AssertionError when a rule in the module docstring breaks."""
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode < 2:
        check_token(security.DIRECTIONS[mode], rest.decode("latin-1"))
    elif mode == 2:
        check_payload(rest)
    else:
        check_b64(rest.decode("latin-1"))


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
