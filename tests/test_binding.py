"""Binding: JSON body and URL var1 to keyword arguments, validated by msgspec from the hints."""

from __future__ import annotations

import datetime

import msgspec
import pytest

import gateway_app as gateway
from conftest import FIXTURES


@pytest.fixture(scope="module")
def fns() -> dict[str, gateway.Exposed]:
    return gateway.load_modules(FIXTURES / "e2e").functions


def bind(fn: gateway.Exposed, body: object = None, var1: str | None = None, url: str | None = "") -> dict:
    raw = b"" if body is None else msgspec.json.encode(body)
    return gateway.bind(fn, raw, var1, fn.name if url == "" else url)


def refused(fn: gateway.Exposed, body: object = None, var1: str | None = None, url: str | None = "") -> tuple:
    with pytest.raises(gateway.GatewayError) as info:
        bind(fn, body, var1, url)
    return info.value.status, info.value.code, info.value.message


def test_body_gives_keyword_arguments(fns: dict) -> None:
    assert bind(fns["add"], {"a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_defaults_are_left_to_the_function(fns: dict) -> None:
    assert bind(fns["echo"], {"text": "x"}) == {"text": "x"}
    assert bind(fns["scale"], {"factor": 2, "values": [1]}) == {"factor": 2.0, "values": [1.0]}


def test_var1_binds_the_first_parameter_and_is_converted_from_the_url_string(fns: dict) -> None:
    assert bind(fns["add"], {"b": 2}, var1="40") == {"a": 40, "b": 2}
    assert bind(fns["scale"], {"values": [1.5]}, var1="2.5") == {"factor": 2.5, "values": [1.5]}
    assert bind(fns["when"], None, var1="2026-11-28") == {"day": datetime.date(2026, 11, 28)}


def test_body_values_are_converted_strictly(fns: dict) -> None:
    assert refused(fns["add"], {"a": "1", "b": 2}) == (422, "invalid_arguments", "Expected `int`, got `str` - at `$.a`")
    assert refused(fns["add"], {"a": True, "b": 2})[2] == "Expected `int`, got `bool` - at `$.a`"
    assert refused(fns["scale"], {"factor": 1, "values": [1, "x"]})[2] == (
        "Expected `float`, got `str` - at `$.values[1]`"
    )


def test_a_whole_float_is_an_int_as_in_json_schema(fns: dict) -> None:
    # /openapi.json says "integer", and to JSON Schema 2.0 is one: the body must be read the same way.
    assert bind(fns["add"], {"a": 2.0, "b": 1e3}) == {"a": 2, "b": 1000}
    assert type(bind(fns["add"], {"a": 2.0, "b": 1})["a"]) is int
    assert bind(fns["echo"], {"text": "ab", "times": 3.0}) == {"text": "ab", "times": 3}
    assert refused(fns["add"], {"a": 2.5, "b": 1})[2] == "Expected `int`, got `float` - at `$.a`"
    assert refused(fns["echo"], {"text": 2.0})[2] == "Expected `str`, got `float` - at `$.text`"  # not `int`


def test_a_var1_that_does_not_convert_names_the_field(fns: dict) -> None:
    assert refused(fns["add"], {"b": 2}, var1="forty") == (
        422,
        "invalid_arguments",
        "Expected `int`, got `str` - at `$.a` (from the URL)",
    )


def test_missing_argument(fns: dict) -> None:
    assert refused(fns["add"], {"a": 1}) == (422, "invalid_arguments", "Object missing required field `b`")


def test_extra_argument(fns: dict) -> None:
    assert refused(fns["add"], {"a": 1, "b": 2, "c": 3}) == (
        422,
        "invalid_arguments",
        "Object contains unknown field `c`",
    )


def test_var1_given_in_the_body_as_well_is_a_422(fns: dict) -> None:
    assert refused(fns["add"], {"a": 1, "b": 2}, var1="1") == (
        422,
        "invalid_arguments",
        "`a` is given both in the URL and in the body",
    )


def test_var1_for_a_function_without_parameters(fns: dict) -> None:
    assert refused(fns["nothing"], None, var1="x")[:2] == (422, "invalid_arguments")


def test_funcname_in_the_body_must_agree_with_the_url(fns: dict) -> None:
    assert bind(fns["add"], {"funcName": "add", "a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert refused(fns["add"], {"funcName": "echo", "a": 1, "b": 2}) == (
        400,
        "bad_json",
        "funcName `echo` conflicts with the URL's `add`",
    )


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"3", b"null"])
def test_a_body_that_is_not_an_object_is_a_400(fns: dict, body: bytes) -> None:
    with pytest.raises(gateway.GatewayError) as info:
        gateway.bind(fns["add"], body, None, "add")
    assert (info.value.status, info.value.message) == (400, "body must be a JSON object")


@pytest.mark.parametrize("body", [b"{", b'{"a": 1,}', b"\xff", b'{"a": 1} trailing'])
def test_malformed_json_is_a_400(fns: dict, body: bytes) -> None:
    with pytest.raises(gateway.GatewayError) as info:
        gateway.bind(fns["add"], body, None, "add")
    assert (info.value.status, info.value.code) == (400, "bad_json")


def test_an_empty_body_means_no_arguments(fns: dict) -> None:
    assert gateway.bind(fns["nothing"], b"", None, "nothing") == {}


@pytest.mark.parametrize(
    "body",
    [b'{"a-\xc8\xdf1, "b": 2}', b'{"a": "\xff", "b": 2}', b"[" * 100_000, b'{"a": ' * 100_000],
    ids=["bad-utf8-in-a-key", "bad-utf8-in-a-value", "deep-arrays", "deep-objects"],
)
def test_json_msgspec_refuses_with_python_errors_is_a_400(fns: dict, body: bytes) -> None:
    # Found by fuzz/fuzz_request.py: msgspec raises UnicodeDecodeError and RecursionError for
    # these, not DecodeError, and the gateway answered 500 "the function failed".
    with pytest.raises(gateway.GatewayError) as info:
        gateway.bind(fns["add"], body, None, "add")
    assert (info.value.status, info.value.code) == (400, "bad_json")
    with pytest.raises(gateway.GatewayError) as info:
        gateway.decode_object(body)  # POST /rest/ reads funcName with it
    assert (info.value.status, info.value.code) == (400, "bad_json")


def test_a_whole_float_becomes_an_int_only_where_an_int_is_wanted(fns: dict) -> None:
    # Untyped, Any and float arguments keep the 2.0 they were sent, whatever a sibling needed:
    # converting the whole body made their type depend on the fields beside them.
    fns = {**fns, **gateway.load_modules(FIXTURES / "binding").functions}
    for body in ({"x": 2.0, "n": 3.0}, {"x": 2.0, "n": 3}):
        args = bind(fns["anyf"], body)
        assert (args, type(args["x"]), type(args["n"])) == ({"x": 2.0, "n": 3}, float, int)
    args = bind(fns["tally"], {"counts": [1.0, 2], "label": 4.0, "ratio": 2.0})
    assert args == {"counts": [1, 2], "label": 4.0, "ratio": 2.0}
    assert [type(args[k]) for k in ("label", "ratio")] == [float, float]
    # A float that is not whole is the one named, not the whole one before it.
    assert refused(fns["tally"], {"counts": [1.0, 2.5]})[2] == "Expected `int`, got `float` - at `$.counts[1]`"
    # Once 2.0 is read as 2, the refusal names the argument that is really wrong.
    assert refused(fns["add"], {"a": 2.0, "b": "3"})[2] == "Expected `int`, got `str` - at `$.b`"
