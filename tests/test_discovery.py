"""Discovery: which modules load, which are refused, and the exact reason given."""

from __future__ import annotations

import inspect

import pytest

import gateway_app as gateway
from conftest import FIXTURES

FOLDER = FIXTURES / "discovery"


@pytest.fixture(scope="module")
def catalog() -> gateway.Catalog:
    return gateway.load_modules(FOLDER)


def reason_for(catalog: gateway.Catalog, filename: str) -> str:
    [refusal] = [r for r in catalog.refused if r.source == str(FOLDER / filename)]
    return refusal.reason


@pytest.mark.parametrize(
    ("filename", "reason"),
    [
        ("syntax_error.py", "SyntaxError: invalid syntax (line 1)"),
        ("import_error.py", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
        ("raises_on_import.py", "RuntimeError: boom at import"),
        ("exits_on_import.py", "SystemExit: 2"),
        ("missing_name.py", "`ghost` is listed but not defined"),
        ("not_callable.py", "`VALUE` is not a function"),
        ("class_listed.py", "`Thing` is not a function"),
        ("duplicate_name.py", f"`greet` is already exposed by {FOLDER / 'a_greetings.py'}"),
        ("unknown_entry_key.py", "bad entry {'name': 'f', 'timout': 2}: Object contains unknown field `timout`"),
        ("negative_timeout.py", "bad entry {'name': 'f', 'timeout': -1}: Expected `float` > 0.0 - at `$.timeout`"),
        ("entry_not_a_name.py", "an entry must be a name or a dict, not int: 42"),
        ("listing_not_a_list.py", '__all_exposed__ must be a list or "*"'),
        ("listed_twice.py", "`f` is listed twice"),
        ("star_args.py", "`f`: parameter `values` cannot be bound from a JSON object"),
        ("private_listed.py", "`_hidden` is not a public function name"),
        ("unsupported_hint.py", "`f`: parameter `x` has a type msgspec cannot convert: Opaque"),
        ("inline_async.py", "`f`: `inline` is for sync functions; this one is async"),
    ],
)
def test_a_broken_module_is_refused_with_its_reason(catalog: gateway.Catalog, filename: str, reason: str) -> None:
    assert reason_for(catalog, filename) == reason


def test_every_refusal_is_one_line_naming_the_file(catalog: gateway.Catalog) -> None:
    assert len(catalog.refused) == 17
    for refusal in catalog.refused:
        assert "\n" not in str(refusal)
        assert str(refusal).startswith(f"{refusal.source}: ")


def test_the_good_modules_still_load_beside_the_broken_ones(catalog: gateway.Catalog) -> None:
    # star_mode: public functions defined there (not `join`, imported; not `_private`; not CONSTANT)
    # sub/deep_module: subpackages are scanned; _helper.py and .dotfile.py are never scanned.
    assert sorted(catalog.functions) == ["deep", "greet", "later", "quadruple", "shout"]


def test_entry_metadata_is_read(catalog: gateway.Catalog) -> None:
    greet, shout = catalog.functions["greet"], catalog.functions["shout"]
    assert (greet.tenants, greet.timeout, greet.doc, greet.inline) == (None, None, "Say hello.", False)
    assert (shout.tenants, shout.timeout, shout.doc) == (frozenset({"acme"}), 1.5, "Loud.")
    assert catalog.functions["later"].is_async and not greet.is_async


def test_sibling_helpers_are_importable(catalog: gateway.Catalog) -> None:
    assert catalog.functions["quadruple"].func(3) == 12
    assert catalog.functions["deep"].func(3) == 7


def test_each_load_imports_fresh_module_objects() -> None:
    first = gateway.load_modules(FOLDER).functions["greet"].func
    second = gateway.load_modules(FOLDER).functions["greet"].func
    assert first is not second and inspect.getmodule(first) is not inspect.getmodule(second)


def test_a_missing_folder_is_an_error_not_an_empty_gateway(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        gateway.load_modules(tmp_path / "absent")


def test_modules_of_an_installed_package_are_exposed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES / "pkgs"))
    catalog = gateway.load_modules(None, packages=("gwplugin",))
    assert list(catalog.functions) == ["plugin_echo"]
    assert catalog.functions["plugin_echo"].source == "gwplugin.tools"
    assert catalog.functions["plugin_echo"].func("hi") == "hi"


def test_a_package_that_cannot_be_imported_is_refused() -> None:
    catalog = gateway.load_modules(None, packages=("no_such_package_xyz",))
    assert [str(r) for r in catalog.refused] == [
        "no_such_package_xyz: ModuleNotFoundError: No module named 'no_such_package_xyz'"
    ]


def test_the_example_modules_all_load() -> None:
    from conftest import ROOT

    catalog = gateway.load_modules(ROOT / "modules")
    assert catalog.refused == ()
    assert {
        "add",
        "power",
        "describe",
        "is_prime",
        "slugify",
        "word_count",
        "stock_level",
        "reserve",
        "slow_report",
    } == set(catalog.functions)
    assert catalog.functions["reserve"].tenants == frozenset({"acme"})
    assert "_normalise" not in catalog.functions


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        ('import asyncio\n\nraise asyncio.CancelledError("at import")\n', "CancelledError: at import"),
        ("raise SystemExit(2)\n", "SystemExit: 2"),
        # Imports run in a thread of their own, where a real Ctrl-C never arrives: this is the
        # module's own raise, and it used to stop a running gateway (exit 0) on a save.
        ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
    ],
)
def test_a_module_raising_a_base_exception_at_import_is_refused_too(tmp_path, code: str, refusal: str) -> None:
    (tmp_path / "cancels.py").write_text(code)
    (tmp_path / "good.py").write_text('__all_exposed__ = ["fine"]\n\n\ndef fine() -> int:\n    return 1\n')
    catalog = gateway._load_in_thread(tmp_path).result()
    assert [str(r) for r in catalog.refused] == [f"{tmp_path / 'cancels.py'}: {refusal}"]
    assert list(catalog.functions) == ["fine"]


def test_star_exposes_decorated_functions_defined_here_and_nothing_else(tmp_path) -> None:
    """An lru_cache'd function is not an inspect.isfunction: "*" skipped it, though listing it
    by name worked."""
    (tmp_path / "starred.py").write_text(
        "import functools\n"
        "from os.path import join\n"
        "__all_exposed__ = '*'\n\n"
        "def _wrap(f):\n"
        "    @functools.wraps(f)\n"
        "    def inner(*args, **kwargs):\n"
        "        return f(*args, **kwargs)\n"
        "    return inner\n\n"
        "@functools.lru_cache(maxsize=8)\n"
        "def cached(n: int) -> int:\n"
        "    return n * 2\n\n"
        "@_wrap\n"
        "def wrapped(n: int) -> int:\n"
        "    return n + 1\n\n"
        "def plain(n: int) -> int:\n"
        "    return n\n\n"
        "class Thing:\n"
        "    def __call__(self) -> int:\n"
        "        return 1\n\n"
        "thing = Thing()\n"
        "imported = join\n"
    )
    catalog = gateway.load_modules(tmp_path)
    assert catalog.refused == ()
    assert sorted(catalog.functions) == ["cached", "plain", "wrapped"]
    assert catalog.functions["cached"].func(3) == 6
