"""Property tests (Hypothesis): what must hold for every input, not just the ones we thought of.

The token parser, PASETO v3.local, STT1 mint/open, argument binding and JSON body decoding are
each fed random and mutated input: they either work or refuse with their one documented error
(InvalidToken, ValueError for bad arguments, a 4xx GatewayError), never anything else. Then the
same over HTTP against a real uvicorn server with STT1 on: no 500, every error in the JSON shape,
and no forged or mutated token ever accepted.

Profiles: ``ci`` (the default: bounded, about 10 s in all) and ``long`` (many more examples),
chosen with ``HYPOTHESIS_PROFILE=long``. Nothing waits on the clock: the server's clock is a
parameter standing at ``common.T0``.
"""

from __future__ import annotations

import dataclasses
import http.client
import inspect
import json
import os
import re
import string
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gateway_app as gateway
import security as s
from conftest import ROOT, Running
from fuzz import common

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# For the parsers a hang is a blown deadline. They take microseconds (linear in at most 1024
# characters), so 2 s trips on a hang, never on a busy machine.
QUICK = settings(deadline=timedelta(seconds=2))

B64 = string.ascii_letters + string.digits + "-_"
K = bytes(range(32))
TID = "acme"
KID = s.b64encode(bytes(range(16, 32)))
IAT = common.T0


# -- strategies --------------------------------------------------------------------------------

tids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,31}", fullmatch=True)
ids16 = st.binary(min_size=16, max_size=16).map(s.b64encode)
keys32 = st.binary(min_size=32, max_size=32)
iats = st.integers(0, 9_999_999_999)
otps = st.from_regex(r"[0-9]{6}", fullmatch=True)
rotated = st.builds(s.RotatedKey, kid=ids16, k=keys32.map(s.b64encode))
request_claims = st.one_of(st.builds(s.RequestClaims, jti=ids16), st.builds(s.RequestClaims, jti=ids16, otp=otps))
response_claims = st.one_of(st.builds(s.ResponseClaims, jti=ids16), st.builds(s.ResponseClaims, jti=ids16, rk=rotated))
# Text with every kind of character, and text made of the token alphabet (far likelier to parse).
any_text = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=400).map(lambda b: b.decode("latin-1")),
    st.text(alphabet=B64 + ".=+/ \n", max_size=400),
)


def near_token(body: bytes, footer: bytes) -> str:
    return f"v3.local.{s.b64encode(body)}.{s.b64encode(footer)}"


token_like = st.one_of(
    any_text,
    any_text.map(lambda t: "v3.local." + t),
    st.builds(near_token, st.binary(max_size=300), st.binary(max_size=80)),
    st.builds(
        lambda body, d, tid, kid, iat: near_token(body, f"{d}.{tid}.{kid}.{iat:010d}".encode()),
        st.binary(min_size=80, max_size=200),
        st.sampled_from(s.DIRECTIONS),
        tids,
        ids16,
        iats,
    ),
)


@st.composite
def mutations(draw: st.DrawFn, original: str, alphabet: st.SearchStrategy[str] | None = None) -> str:
    """One edit of ``original``: a character replaced, deleted or inserted, a cut, or an append.

    Never the original itself: the point is that any change at all is refused. The draws must
    not depend on the characters of ``original``, which hold a random nonce: an ``assume`` on a
    replacement that happens to be the same character made Hypothesis see the same choices end
    differently on a replay, and fail the test as flaky (CI, 69cfe7d).
    """
    chars = alphabet if alphabet is not None else st.one_of(st.sampled_from(B64 + ".="), st.characters())
    at = draw(st.integers(0, len(original) - 1))
    kind = draw(st.sampled_from(["replace", "delete", "insert", "truncate", "append"]))
    if kind == "replace":
        replacement = draw(chars)
        if replacement == original[at]:
            replacement = "B" if replacement == "A" else "A"
        mutated = original[:at] + replacement + original[at + 1 :]
    elif kind == "delete":
        mutated = original[:at] + original[at + 1 :]
    elif kind == "insert":
        mutated = original[:at] + draw(chars) + original[at:]
    elif kind == "truncate":
        mutated = original[:at]
    else:
        mutated = original + "".join(draw(st.lists(chars, min_size=1, max_size=8)))
    assert mutated != original
    return mutated


@st.composite
def byte_mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """One edit of a byte string (footer, implicit assertion): flip, delete, insert or append."""
    kind = draw(st.sampled_from(["flip", "delete", "insert", "append"] if original else ["append"]))
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=4))
    at = draw(st.integers(0, len(original) - 1))
    if kind == "flip":
        return original[:at] + bytes([original[at] ^ draw(st.integers(1, 255))]) + original[at + 1 :]
    if kind == "delete":
        return original[:at] + original[at + 1 :]
    return original[:at] + draw(st.binary(min_size=1, max_size=1)) + original[at:]


# -- the token parser ----------------------------------------------------------------------------


@QUICK
@given(token_like)
def test_parse_refuses_cleanly_or_returns_the_one_canonical_spelling(token: str) -> None:
    try:
        parsed = s.parse(token)
    except s.InvalidToken:
        return
    assert near_token(parsed._body, parsed._raw_footer) == token  # no second spelling of the same bytes
    assert s.build_footer(*parsed.footer) == parsed._raw_footer


@QUICK
@given(st.integers(1025, 2_000_000), st.sampled_from(["A", ".", "v3.local.", "=", "\x00", "é"]))
def test_parse_refuses_anything_long_at_once(length: int, filler: str) -> None:
    with pytest.raises(s.InvalidToken):
        s.parse(("v3.local." + filler * length)[:length])


@QUICK
@given(st.binary(max_size=120))
def test_base64url_round_trip(data: bytes) -> None:
    assert s.b64decode(s.b64encode(data)) == data


@QUICK
@given(st.one_of(st.text(alphabet=B64 + "=+/ \n", max_size=60), st.text(max_size=60)))
def test_base64url_accepts_only_the_canonical_spelling(text: str) -> None:
    try:
        data = s.b64decode(text)
    except ValueError:
        return
    assert s.b64encode(data) == text


footers = st.builds(s.build_footer, st.sampled_from(s.DIRECTIONS), tids, ids16, iats)


@QUICK
@given(st.one_of(st.binary(max_size=120), footers, footers.flatmap(byte_mutations)))
def test_footer_parser_refuses_cleanly_or_round_trips(raw: bytes) -> None:
    try:
        footer = s.parse_footer(raw)
    except s.InvalidToken:
        return
    assert s.build_footer(*footer) == raw


# -- PASETO v3.local -----------------------------------------------------------------------------

# The nonce is drawn, not random, so that Hypothesis can replay and shrink a failing token.
nonces = st.binary(min_size=32, max_size=32)
paseto_inputs = st.tuples(keys32, st.binary(max_size=200), st.binary(max_size=60), st.binary(max_size=60), nonces)


@given(paseto_inputs)
def test_paseto_round_trip(inputs: tuple[bytes, ...]) -> None:
    key, payload, footer, implicit, nonce = inputs
    token = s.encrypt(key, payload, footer, implicit, nonce)
    assert s.decrypt(key, token, footer, implicit) == payload
    assert s.decrypt(key, token, None, implicit) == payload


@given(paseto_inputs, st.data())
def test_paseto_any_single_change_of_the_token_is_refused(inputs: tuple[bytes, ...], data: st.DataObject) -> None:
    key, payload, footer, implicit, nonce = inputs
    token = s.encrypt(key, payload, footer, implicit, nonce)
    mutated = data.draw(mutations(token))
    with pytest.raises(s.InvalidToken):
        s.decrypt(key, mutated, None, implicit)


@given(paseto_inputs, st.data())
def test_paseto_any_change_of_footer_or_implicit_assertion_is_refused(
    inputs: tuple[bytes, ...], data: st.DataObject
) -> None:
    key, payload, footer, implicit, nonce = inputs
    token = s.encrypt(key, payload, footer, implicit, nonce)
    other_footer = data.draw(byte_mutations(footer))
    with pytest.raises(s.InvalidToken):
        s.decrypt(key, token, other_footer, implicit)  # the expected footer differs
    body = token.split(".")[2]
    with pytest.raises(s.InvalidToken):
        s.decrypt(key, f"v3.local.{body}.{s.b64encode(other_footer)}", None, implicit)  # the token's differs
    with pytest.raises(s.InvalidToken):
        s.decrypt(key, token, footer, data.draw(byte_mutations(implicit)))


@given(paseto_inputs, keys32)
def test_paseto_another_key_is_refused(inputs: tuple[bytes, ...], other: bytes) -> None:
    key, payload, footer, implicit, nonce = inputs
    assume(other != key)
    with pytest.raises(s.InvalidToken):
        s.decrypt(other, s.encrypt(key, payload, footer, implicit, nonce), None, implicit)


# -- STT1 mint and open ----------------------------------------------------------------------------


@dataclasses.dataclass
class Minted:
    k: bytes
    key: s.DirectionKey
    token: str
    opened: s.Opened  # what opening the token must give
    implicit: bytes


@st.composite
def minted(draw: st.DrawFn) -> Minted:
    """A random credential and direction, and a token minted with it within the limits."""
    direction = draw(st.sampled_from(s.DIRECTIONS))
    k = draw(keys32)
    key = s.DirectionKey(k, direction, draw(tids), draw(ids16))
    iat = draw(iats)
    claims = draw(request_claims if direction == "c2s" else response_claims)
    implicit = draw(st.binary(max_size=100))
    opened = s.Opened(s.Footer(direction, key.tid, key.kid, iat), claims)
    return Minted(k, key, s.mint(key, iat, claims, implicit, nonce=draw(nonces)), opened, implicit)


@given(minted())
def test_stt1_claims_within_the_limits_round_trip(case: Minted) -> None:
    assert len(case.token) <= s.MAX_TOKEN_CHARS
    assert s.open_token(case.key, case.token, case.implicit) == case.opened


@given(minted(), st.data())
def test_stt1_any_single_change_of_the_token_or_assertion_is_refused(case: Minted, data: st.DataObject) -> None:
    with pytest.raises(s.InvalidToken):
        s.open_token(case.key, data.draw(mutations(case.token)), case.implicit)
    with pytest.raises(s.InvalidToken):
        s.open_token(case.key, case.token, data.draw(byte_mutations(case.implicit)))


@given(minted(), st.sampled_from(["direction", "tid", "kid", "k"]), st.data())
def test_stt1_a_key_for_anything_else_is_refused(case: Minted, what: str, data: st.DataObject) -> None:
    key = case.key
    ids = {"direction": key.direction, "tid": key.tid, "kid": key.kid}
    k = case.k
    if what == "direction":
        ids["direction"] = "s2c" if key.direction == "c2s" else "c2s"
    elif what == "k":
        k = data.draw(keys32.filter(lambda other: other != case.k))
    else:
        ids[what] = data.draw((tids if what == "tid" else ids16).filter(lambda v: v != ids[what]))
    other = s.DirectionKey(k, ids["direction"], ids["tid"], ids["kid"])
    with pytest.raises(s.InvalidToken):
        s.open_token(other, case.token, case.implicit)


out_of_range_iats = st.one_of(st.integers(max_value=-1), st.integers(min_value=10_000_000_000), st.just(True))


@given(out_of_range_iats, request_claims)
def test_stt1_iat_outside_ten_digits_is_refused_by_mint_and_by_the_footer_parser(
    iat: int, claims: s.RequestClaims
) -> None:
    key = s.DirectionKey(K, "c2s", TID, KID)
    with pytest.raises(ValueError):
        s.mint(key, iat, claims, b"")
    with pytest.raises(ValueError):
        s.build_footer("c2s", TID, KID, iat)
    with pytest.raises(s.InvalidToken):
        s.parse_footer(f"c2s.{TID}.{KID}.{int(iat)}".encode())


@given(st.one_of(st.text(max_size=40), tids), st.one_of(st.text(max_size=30), ids16))
def test_stt1_ids_outside_the_protocol_are_refused(tid: str, kid: str) -> None:
    valid = bool(re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", tid)) and bool(re.fullmatch(r"[A-Za-z0-9_-]{21}[AQgw]", kid))
    try:
        s.DirectionKey(K, "c2s", tid, kid)
    except ValueError:
        assert not valid
    else:
        assert valid


def _sealed(payload: bytes, direction: str = "c2s") -> tuple[s.DirectionKey, str, bytes]:
    """A token around any payload bytes under the right step key: only the claims can fail."""
    implicit = b"implicit"
    step = s.step_key(s.direction_key(K, direction, TID, KID), s.time_step(IAT))
    token = s.encrypt(step, payload, s.build_footer(direction, TID, KID, IAT), implicit)
    return s.DirectionKey(K, direction, TID, KID), token, implicit


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Claim values near the limits: right-looking ids and codes, one character off, or anything.
claim_strings = st.one_of(
    ids16, otps, keys32.map(s.b64encode), st.text(max_size=50), st.text(alphabet=B64 + "=\n", min_size=5, max_size=44)
)


@st.composite
def unchecked_claims(draw: st.DrawFn, direction: str) -> s.RequestClaims | s.ResponseClaims:
    """Claims built without validation (msgspec checks constraints when decoding, not in __init__)."""
    jti = draw(claim_strings)
    if direction == "c2s":
        return s.RequestClaims(jti=jti, otp=draw(st.one_of(st.just(msgspec.UNSET), claim_strings)))
    rk = draw(st.one_of(st.just(msgspec.UNSET), st.builds(s.RotatedKey, kid=claim_strings, k=claim_strings)))
    return s.ResponseClaims(jti=jti, rk=rk)


@given(st.sampled_from(s.DIRECTIONS).flatmap(lambda d: st.tuples(st.just(d), unchecked_claims(d))))
def test_stt1_mint_and_open_refuse_exactly_the_same_claims(
    case: tuple[str, s.RequestClaims | s.ResponseClaims],
) -> None:
    """Anything outside the protocol's limits is refused on both sides, and nothing else is."""
    direction, claims = case
    key, token, implicit = _sealed(msgspec.json.encode(claims), direction)
    try:
        opened = s.open_token(key, token, implicit)
    except s.InvalidToken:
        opened = None
    try:
        minted_token = s.mint(key, IAT, claims, implicit)
    except ValueError:
        assert opened is None, f"open accepted claims mint refuses: {claims!r}"
        return
    assert opened is not None, f"mint sent claims open refuses: {claims!r}"
    assert opened.claims == claims == s.open_token(key, minted_token, implicit).claims


payloads = st.one_of(
    st.binary(max_size=600),
    json_values.map(msgspec.json.encode),
    st.builds(lambda jti: b'{"jti":"%s"}' % jti.encode(), ids16).flatmap(byte_mutations),  # bad UTF-8 and worse
)


@given(payloads, st.sampled_from(s.DIRECTIONS))
def test_stt1_open_refuses_any_payload_bytes_with_invalid_token_only(payload: bytes, direction: str) -> None:
    key, token, implicit = _sealed(payload, direction)
    try:
        opened = s.open_token(key, token, implicit)
    except s.InvalidToken:
        return
    assert len(payload) <= s.MAX_PAYLOAD_BYTES
    assert type(opened.claims) is (s.RequestClaims if direction == "c2s" else s.ResponseClaims)


# -- binding and JSON bodies --------------------------------------------------------------------

EXAMPLES = gateway.load_modules(ROOT / "modules").functions
TOTAL = gateway.load_modules(common.FIXTURE).functions
FUNCTIONS = {**{f"modules:{n}": fn for n, fn in EXAMPLES.items()}, **{f"fixture:{n}": fn for n, fn in TOTAL.items()}}


@st.composite
def bodies(draw: st.DrawFn, fn: gateway.Exposed) -> bytes:
    """A request body: a JSON object over the function's own parameter names (likelier to bind),
    any JSON value, or raw bytes, sometimes with one byte changed."""
    names = st.sampled_from(sorted(fn.params | {"funcName", "x"}))
    body = draw(
        st.one_of(
            st.dictionaries(names, json_values, max_size=4).map(msgspec.json.encode),
            json_values.map(msgspec.json.encode),
            st.binary(max_size=80),
            st.integers(1, 5000).map(lambda n: b"[" * n),
        )
    )
    if body and draw(st.booleans()):
        body = draw(byte_mutations(body))
    return body


var1s = st.one_of(st.none(), st.text(max_size=20), st.from_regex(r"-?[0-9]{1,25}(\.[0-9]+)?(e-?[0-9]{1,3})?"))


@given(st.sampled_from(sorted(FUNCTIONS)), st.data())
def test_binding_gives_callable_arguments_or_a_clean_4xx(name: str, data: st.DataObject) -> None:
    fn = FUNCTIONS[name]
    body = data.draw(bodies(fn))
    var1 = data.draw(var1s)
    try:
        kwargs = gateway.bind(fn, body, var1, fn.name)
    except gateway.GatewayError as exc:
        assert (exc.status, exc.code) in {(400, "bad_json"), (422, "invalid_arguments")}, (exc.status, exc.message)
        return
    inspect.signature(fn.func).bind(**kwargs)  # TypeError would mean a call the hints should have refused


@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(msgspec.json.encode),
        st.integers(1, 20_000).flatmap(lambda n: st.sampled_from([b"[" * n, b'{"a":' * n, b"[" * n + b"]" * n])),
    ).flatmap(lambda body: st.one_of(st.just(body), byte_mutations(body)))
)
def test_json_body_decoding_gives_an_object_or_a_400(body: bytes) -> None:
    try:
        decoded = gateway.decode_object(body)
    except gateway.GatewayError as exc:
        assert (exc.status, exc.code) == (400, "bad_json")
    else:
        assert isinstance(decoded, dict)


# -- over HTTP: a real uvicorn server with STT1 on ---------------------------------------------------


@dataclasses.dataclass
class Served:
    stack: common.Stack
    running: Running


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    stack = common.build_stack(Path(tmp_path_factory.mktemp("properties")))
    running = Running(stack.app)
    yield Served(stack, running)
    running.stop()


def send(served: Served, request: common.Request) -> common.Answer:
    conn = http.client.HTTPConnection("127.0.0.1", served.running.port, timeout=10)
    try:
        conn.putrequest(request.method, request.target.decode("ascii"), skip_accept_encoding=True)
        for name, value in request.headers:
            conn.putheader(name.decode("latin-1"), value)
        if request.body or request.method == "POST":
            conn.putheader("Content-Length", str(len(request.body)))
        conn.endheaders(request.body)
        response = conn.getresponse()
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.getheaders()]
        return common.Answer(response.status, headers, response.read())
    finally:
        conn.close()


FUNCTION_NAMES = sorted(TOTAL) + ["missing", "_private", "funcName"]
segment = st.one_of(
    st.sampled_from(FUNCTION_NAMES),
    st.text(alphabet=string.ascii_letters + string.digits + "%-._~!$&'()*+,;=:@", max_size=12),
)
paths = st.one_of(
    st.builds(lambda *parts: "/rest/" + "/".join(parts), segment),
    st.builds(lambda *parts: "/rest/" + "/".join(parts), segment, segment),
    st.sampled_from(["/rest", "/rest/", "/healthz", "/openapi.json", "/console", "/static/stt1.js", "/nowhere"]),
    st.text(alphabet="".join(map(chr, range(0x21, 0x7F))).replace("#", "").replace("?", ""), max_size=30).map(
        lambda p: "/" + p
    ),
)
targets = st.tuples(paths, st.one_of(st.just(""), st.text(alphabet=B64 + "=&%", max_size=12).map("?".__add__))).map(
    "".join
)
header_values = st.text(alphabet="".join(map(chr, range(0x20, 0x7F))) + "\t\xe9\xff", max_size=40)
extra_headers = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(["content-type", "x-request-id", "range", "accept", "authorization", "host", "if-range"]),
            st.from_regex(r"x-[a-z0-9-]{1,12}", fullmatch=True),
        ),
        st.one_of(
            header_values, st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"])
        ),
    ),
    max_size=4,
)
http_bodies = st.one_of(
    st.just(b""),
    st.dictionaries(st.sampled_from(["a", "b", "text", "values", "funcName", "item", "n"]), json_values, max_size=3)
    .map(msgspec.json.encode)
    .flatmap(lambda body: st.one_of(st.just(body), byte_mutations(body))),  # bad UTF-8 in a string, say
    st.binary(max_size=200),
)
AUTHS = ["none", "random", "valid", "mutated"]


def on_the_wire(text: str) -> bytes:
    """A header value as an HTTP parser passes it on: visible latin-1, spaces, no controls."""
    return "".join(c for c in text if " " <= c <= "~" or "\xa0" <= c <= "\xff").strip(" ").encode("latin-1")


@st.composite
def http_requests(draw: st.DrawFn, served: Served) -> tuple[common.Request, str, str | None]:
    """A request (as http.client can put it on the wire) and how its Authorization was made:
    none (or a random one among the extra headers), random, valid, or a valid one mutated."""
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    auth = draw(st.sampled_from(AUTHS))
    headers = [
        (name.encode(), on_the_wire(value))
        for name, value in draw(extra_headers)
        if name != "authorization" or auth == "none"
    ]
    request = common.Request(method, draw(targets).encode("ascii"), headers, draw(http_bodies))
    jti = None
    if auth == "random":
        value = draw(st.one_of(token_like, st.text(alphabet=B64 + ".", max_size=300).map("v3.local.".__add__)))
        request.headers.append((b"authorization", b"STT1 " + on_the_wire(value)))
    elif auth in ("valid", "mutated"):
        token, jti = served.stack.sign(method, request.target, common.content_type_of(request), request.body)
        if auth == "mutated":
            token = draw(mutations(token, st.sampled_from(B64 + ".=")))
        request.headers.append((b"authorization", b"STT1 " + token.encode("ascii")))
    return request, auth, jti


def check_answer(served: Served, request: common.Request, auth: str, jti: str | None, answer: common.Answer) -> None:
    if request.method == "HEAD":  # the answer to HEAD has no body to check
        assert answer.status != 500
    else:
        problem = common.error_problem(answer.status, answer.headers, answer.body)
        assert problem is None, problem
    if not common.routed_to_rest(request):
        return
    if auth != "valid":
        assert answer.status in (401, 413), (answer.status, answer.body)
        assert answer.status == 413 or request.method == "HEAD" or answer.body == common.UNAUTHORIZED
        assert answer.header(b"stt1-response") is None
    elif request.method != "HEAD" and (answer.status not in (401, 413) or answer.header(b"stt1-response")):
        assert jti is not None  # signed over the body, which an answer to HEAD leaves out
        common.verify_response(served.stack, jti, answer)


@given(st.data())
def test_http_no_500_every_error_is_json_and_no_forged_token_passes(served: Served, data: st.DataObject) -> None:
    request, auth, jti = data.draw(http_requests(served))
    before = served.stack.calls["n"]
    answer = send(served, request)
    check_answer(served, request, auth, jti, answer)
    if auth != "valid" and common.routed_to_rest(request):
        assert served.stack.calls["n"] == before, "the handler ran for a refused token"


@given(st.sampled_from(["add", "slug", "order", "nothing"]), st.data())
def test_http_a_mutated_valid_token_is_always_the_one_401(served: Served, name: str, data: st.DataObject) -> None:
    body = {"add": b'{"a": 1, "b": 2}', "slug": b'{"text": "A b"}', "order": b'{"item": {"sku": "a", "qty": 1}}'}
    request = common.Request("POST", f"/rest/{name}".encode(), [(b"content-type", b"application/json")], b"")
    request.body = body.get(name, b"")
    token, _ = served.stack.sign("POST", request.target, b"application/json", request.body)
    mutated = data.draw(
        mutations(token, st.one_of(st.sampled_from(B64 + ".="), st.characters(min_codepoint=0x21, max_codepoint=0x7E)))
    )
    request.headers.append((b"authorization", f"STT1 {mutated}".encode()))
    before = served.stack.calls["n"]
    answer = send(served, request)
    assert (answer.status, answer.body, answer.header(b"stt1-response")) == (401, common.UNAUTHORIZED, None)
    assert served.stack.calls["n"] == before


def test_http_the_unmutated_token_is_accepted_and_its_answer_verifies(served: Served) -> None:
    """The positive control for the two properties above: the same requests, signed, do work."""
    request = common.Request("POST", b"/rest/add", [(b"content-type", b"application/json")], b'{"a": 1, "b": 2}')
    token, jti = served.stack.sign("POST", request.target, b"application/json", request.body)
    request.headers.append((b"authorization", f"STT1 {token}".encode()))
    answer = send(served, request)
    assert (answer.status, json.loads(answer.body)) == (200, {"results": 3.0, "valid": True})
    common.verify_response(served.stack, jti, answer)
