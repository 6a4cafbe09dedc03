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


@pytest.fixture(scope="module")
def siblings() -> dict[str, gateway.Exposed]:
    return gateway.load_modules(FIXTURES / "binding").functions


def raw_bind(fn: gateway.Exposed, body: bytes, var1: str | None = None) -> dict:
    return gateway.bind(fn, body, var1, fn.name)


DIGITS = b"1.23456789012345678901234567890"


def test_the_url_argument_changes_no_other_value(siblings: dict) -> None:
    """With var1 the body was decoded, var1 added, and the whole written and read again: a
    Decimal lost its digits through a float, and a float var1 of inf became null (None)."""
    import decimal

    pay = siblings["pay"]
    exact = decimal.Decimal(DIGITS.decode())
    assert raw_bind(pay, b'{"account": "x", "amount": ' + DIGITS + b"}")["amount"] == exact
    assert raw_bind(pay, b'{"amount": ' + DIGITS + b"}", var1="x") == {"account": "x", "amount": exact}
    assert str(raw_bind(pay, b'{"amount": 1E+2}', var1="x")["amount"]) == "1E+2"
    args = raw_bind(siblings["maybe"], b"", var1="inf")
    assert args["x"] == float("inf")
    assert raw_bind(siblings["maybe"], b"", var1="null") == {"x": None}


def test_a_whole_float_beside_changes_no_other_value(siblings: dict) -> None:
    """Converting 2.0 to 2 for an int re-read every number through a float, and turned every
    whole float of the same argument into an int, Any and float fields included."""
    import decimal

    args = raw_bind(siblings["pay"], b'{"account": "x", "qty": 2.0, "amount": ' + DIGITS + b"}")
    assert args["qty"] == 2 and type(args["qty"]) is int and args["amount"] == decimal.Decimal(DIGITS.decode())
    body = b'{"item": {"qty": 1.0, "meta": 3.0, "price": 4.0, "pair": [5.0, 6.0]}}'
    item = raw_bind(siblings["nested"], body)["item"]
    assert (item.qty, item.meta, item.price, item.pair) == (1, 3.0, 4.0, (5, 6.0))
    assert [type(v) for v in (item.qty, item.meta, item.price, *item.pair)] == [int, float, float, int, float]
    listed = raw_bind(siblings["nested"], b'{"item": {"qty": 1}, "items": [{"qty": 2.0, "meta": 7.0}]}')["items"]
    assert (listed[0].qty, type(listed[0].qty), type(listed[0].meta)) == (2, int, float)


def test_a_whole_float_out_of_bounds_is_refused_for_its_bound(siblings: dict) -> None:
    """2.0 is the int 2: the 422 said `Expected int, got float`, as if 2.0 were the fault."""
    assert refused(siblings["bounded"], {"x": 2.0})[2] == "Expected `int` >= 3 - at `$.x`"
    assert refused(siblings["bounded"], {"x": 3.0, "xs": [1, -1.0]})[2] == "Expected `int` >= 0 - at `$.xs[1]`"
    assert bind(siblings["bounded"], {"x": 3.0, "xs": [1.0]}) == {"x": 3, "xs": [1]}


def test_a_callable_object_is_bound_by_its_call_hints(siblings: dict) -> None:
    """It was validated against its class's fields: x a str, n anything."""
    fn = siblings["scaled_by"]
    assert fn.first == "x" and fn.params == {"x", "n"}
    assert bind(fn, {"x": 5}) == {"x": 5}
    assert bind(fn, None, var1="5") == {"x": 5}
    assert refused(fn, {"x": 5, "n": "zz"})[2] == "Expected `int`, got `str` - at `$.n`"


def test_a_parameter_named_funcname_is_refused_at_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The body's funcName names the function: such a parameter could only come from the URL."""
    (tmp_path / "named.py").write_text("__all_exposed__ = ['f']\n\ndef f(funcName: str, n: int = 0):\n    return 1\n")
    catalog = gateway.load_modules(tmp_path)
    assert "f" not in catalog.functions
    assert "funcName" in catalog.refused[0].reason


UNDECODABLE = {
    "set[list[int]]": "a set cannot hold unhashable items",
    "frozenset[dict[str, int]]": "a set cannot hold unhashable items",
    "set[tuple[int, list[int]]]": "a set cannot hold unhashable items",
    "set[Open]": "a set cannot hold unhashable items",
    "list[set[list[int] | dict[str, int]]]": "a set cannot hold unhashable items",
    "dict[tuple[int, int], int]": "keys are strings",
    "dict[bool, int]": "keys are strings",
    "dict[str, dict[Frozen, int]] | None": "keys are strings",
    "Holder": "a set cannot hold unhashable items",
}
DECODABLE = [
    "set[tuple[int, int]]", "set[Frozen]", "frozenset[frozenset[int]]", "set[Any]", "set[list[int] | int]",
    "dict[int, int]", "dict[int | None, str]", "dict[Color, int]", "dict[datetime.date, int]", "Tree",
]  # fmt: skip
HINT_MODULE = '''
import datetime, enum
from typing import Any
import msgspec

class Open(msgspec.Struct):
    a: int

class Frozen(msgspec.Struct, frozen=True):
    a: int

class Color(enum.Enum):
    red = "red"

class Holder(msgspec.Struct):
    name: str
    tags: set[list[str]] = set()

class Tree(msgspec.Struct):
    children: "list[Tree]" = []
    labels: dict[str, int] = {}
'''


def test_a_type_no_json_value_decodes_into_is_refused_at_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """msgspec describes these, so they loaded, then every call failed: a set of lists with a
    500 ("unhashable type"), a dict keyed by tuples with a 422 for any non-empty object."""
    hints = [*UNDECODABLE, *DECODABLE]
    for i, hint in enumerate(hints):  # a module each: a refusal refuses its whole module
        function = f"def f{i}(x: {hint}):\n    return 1\n"
        (tmp_path / f"m{i}.py").write_text(f"{HINT_MODULE}\n__all_exposed__ = ['f{i}']\n\n{function}")
    catalog = gateway.load_modules(tmp_path)
    refused = {entry.reason.split("`")[1]: entry.reason for entry in catalog.refused}
    for i, (hint, why) in enumerate(UNDECODABLE.items()):
        assert f"f{i}" in refused, hint
        assert why in refused[f"f{i}"] and "parameter `x`" in refused[f"f{i}"], refused[f"f{i}"]
    assert sorted(catalog.functions) == sorted(f"f{i}" for i in range(len(UNDECODABLE), len(hints)))


def test_an_unhashable_value_for_a_set_of_anything_is_a_422(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """set[Any] is a fine type, but a list in it was a 500 with the call's traceback logged."""
    (tmp_path / "sets.py").write_text(
        "from typing import Any\n__all_exposed__ = ['count']\n\n"
        "def count(xs: set[Any], n: int = 0):\n    return len(xs)\n"
    )
    fn = gateway.load_modules(tmp_path).functions["count"]
    assert bind(fn, {"xs": [1, "a", 1]}) == {"xs": {1, "a"}}
    status, code, message = refused(fn, {"xs": [1, [2]]})
    assert (status, code) == (422, "invalid_arguments") and "unhashable type: 'list'" in message
    status, code, message = refused(fn, {"xs": [{"a": 1}], "n": 2.0})  # through the whole-float retry too
    assert (status, code) == (422, "invalid_arguments") and "unhashable type: 'dict'" in message
