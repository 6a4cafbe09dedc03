"""Self-deploying: a saved module is live, changed or gone without a restart or a failed call."""
from __future__ import annotations

import logging
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import client as stt1_client
import gateway_app as gateway
from conftest import FIXTURES, secured_server


def module(version: int, name: str = "version") -> str:
    return f'__all_exposed__ = ["{name}"]\n\n\ndef {name}() -> int:\n    return {version}\n'


def test_only_the_changed_file_is_imported_again(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(module(1, "alpha"))
    (tmp_path / "b.py").write_text(module(1, "beta"))
    first = gateway.load_modules(tmp_path)
    (tmp_path / "a.py").write_text(module(2, "alpha"))
    second = gateway.load_modules(tmp_path, previous=first, changed={str(tmp_path / "a.py")})
    assert second.functions["beta"] is first.functions["beta"]  # untouched: not imported again
    assert (first.functions["alpha"].func(), second.functions["alpha"].func()) == (1, 2)


def test_a_broken_change_keeps_the_previous_version_until_it_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "a.py"
    path.write_text(module(1))
    good = gateway.load_modules(tmp_path)
    path.write_text("def version(:\n")
    broken = gateway.load_modules(tmp_path, previous=good, changed={str(path)})
    assert broken.functions["version"] is good.functions["version"]
    assert [str(r) for r in broken.refused] == [f"{path}: SyntaxError: invalid syntax (line 1)"]
    path.write_text(module(3))
    fixed = gateway.load_modules(tmp_path, previous=broken, changed={str(path)})
    assert fixed.functions["version"].func() == 3 and fixed.refused == ()


def test_a_removed_file_takes_its_functions_and_its_refusal_with_it(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(module(1))
    (tmp_path / "bad.py").write_text("import nowhere_at_all\n")
    first = gateway.load_modules(tmp_path)
    assert len(first.refused) == 1
    (tmp_path / "a.py").unlink()
    (tmp_path / "bad.py").unlink()
    gone = gateway.load_modules(tmp_path, previous=first, changed={str(tmp_path / "a.py"), str(tmp_path / "bad.py")})
    assert (gone.functions, gone.refused) == ({}, ())


def test_a_change_that_takes_another_modules_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(module(1, "alpha"))
    (tmp_path / "b.py").write_text(module(1, "beta"))
    first = gateway.load_modules(tmp_path)
    (tmp_path / "b.py").write_text(module(2, "alpha"))
    second = gateway.load_modules(tmp_path, previous=first, changed={str(tmp_path / "b.py")})
    assert second.functions["alpha"].func() == 1 and second.functions["beta"] is first.functions["beta"]
    assert [r.reason for r in second.refused] == [f"`alpha` is already exposed by {tmp_path / 'a.py'}"]


def test_a_refusal_is_tried_again_once_the_name_it_wanted_is_free(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(module(1, "alpha"))
    (tmp_path / "b.py").write_text(
        '__all_exposed__ = ["alpha", "beta"]\n\n\n'
        "def alpha() -> int:\n    return 2\n\n\n"
        "def beta() -> int:\n    return 2\n"
    )
    first = gateway.load_modules(tmp_path)
    assert [r.reason for r in first.refused] == [f"`alpha` is already exposed by {tmp_path / 'a.py'}"]
    (tmp_path / "a.py").write_text(module(3, "alpha"))  # edited, still exposing alpha: a.py keeps it
    second = gateway.load_modules(tmp_path, previous=first, changed={str(tmp_path / "a.py")})
    assert (second.functions["alpha"].func(), "beta" in second.functions, second.refused) == (3, False, first.refused)
    (tmp_path / "a.py").write_text(module(4, "gamma"))  # alpha is free: b.py, untouched, loads whole
    third = gateway.load_modules(tmp_path, previous=second, changed={str(tmp_path / "a.py")})
    assert third.refused == ()
    assert {name: fn.func() for name, fn in third.functions.items()} == {"gamma": 4, "alpha": 2, "beta": 2}


def test_reloads_do_not_pile_up_in_sys_modules(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(module(0))
    catalog = gateway.load_modules(tmp_path)
    before = len(sys.modules)
    for version in range(1, 30):
        (tmp_path / "a.py").write_text(module(version))
        catalog = gateway.load_modules(tmp_path, previous=catalog, changed={str(tmp_path / "a.py")})
    assert catalog.functions["version"].func() == 29
    assert len(sys.modules) <= before + 2


def owned(name: str, *names: str) -> str:
    """A module exposing ``names``, each answering the module's ``name``."""
    listed = ", ".join(f'"{n}"' for n in names)
    return f"__all_exposed__ = [{listed}]\n" + "".join(f"\n\ndef {n}() -> str:\n    return {name!r}\n" for n in names)


def test_a_reload_leaves_a_contested_name_with_the_module_that_had_it(tmp_path: Path) -> None:
    # A changed helper reloads every file: in file order alpha took `who`, zeta was refused,
    # then zeta's previous version took `who` back; /healthz blamed zeta while zeta served it.
    zeta, alpha = tmp_path / "zeta.py", tmp_path / "alpha.py"
    zeta.write_text(owned("zeta", "who", "zonly"))
    first = gateway.load_modules(tmp_path)
    alpha.write_text(owned("alpha", "who", "aonly"))
    second = gateway.load_modules(tmp_path, previous=first, changed={str(alpha)})
    refusal = [f"{alpha}: `who` is already exposed by {zeta}"]
    assert [str(r) for r in second.refused] == refusal
    third = gateway.load_modules(tmp_path, previous=second)  # a helper changed: every file again
    assert {n: fn.func() for n, fn in third.functions.items()} == {"who": "zeta", "zonly": "zeta"}
    assert [str(r) for r in third.refused] == refusal
    zeta.write_text(owned("zeta", "who", "zonly") + "# saved again\n")
    fourth = gateway.load_modules(tmp_path, previous=third, changed={str(zeta)})
    assert {n: fn.func() for n, fn in fourth.functions.items()} == {"who": "zeta", "zonly": "zeta"}
    assert [str(r) for r in fourth.refused] == refusal
    # The owner now fails: its previous version serves whole, and the newcomer still may not have `who`.
    zeta.write_text("def who(:\n")
    fifth = gateway.load_modules(tmp_path, previous=fourth)
    assert {n: fn.func() for n, fn in fifth.functions.items()} == {"who": "zeta", "zonly": "zeta"}
    assert [str(r) for r in fifth.refused] == [*refusal, f"{zeta}: SyntaxError: invalid syntax (line 1)"]


def test_of_two_changed_files_that_want_one_name_the_one_that_had_it_keeps_it(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(owned("a", "x"))
    b.write_text(owned("b", "y"))
    first = gateway.load_modules(tmp_path)
    a.write_text(owned("a", "x", "y"))
    b.write_text(owned("b", "y") + "# saved again\n")
    second = gateway.load_modules(tmp_path, previous=first, changed={str(a), str(b)})
    assert {n: fn.func() for n, fn in second.functions.items()} == {"x": "a", "y": "b"}
    assert second.functions["x"] is first.functions["x"]  # a's previous version, whole
    assert [str(r) for r in second.refused] == [f"{a}: `y` is already exposed by {b}"]


def test_two_files_may_trade_names_in_one_reload(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(owned("a", "x"))
    b.write_text(owned("b", "y"))
    first = gateway.load_modules(tmp_path)
    a.write_text(owned("a", "y"))
    b.write_text(owned("b", "x"))
    second = gateway.load_modules(tmp_path, previous=first, changed={str(a), str(b)})
    assert ({n: fn.func() for n, fn in second.functions.items()}, second.refused) == ({"x": "b", "y": "a"}, ())


def test_a_module_beaten_by_one_refused_itself_is_let_in(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(owned("a", "x"))
    first = gateway.load_modules(tmp_path)
    (tmp_path / "b.py").write_text(owned("b", "x", "q"))  # refused for x, held by a
    (tmp_path / "c.py").write_text(owned("c", "q"))  # beaten to q by b, which is refused itself
    second = gateway.load_modules(tmp_path, previous=first)
    assert {n: fn.func() for n, fn in second.functions.items()} == {"x": "a", "q": "c"}
    assert [str(r) for r in second.refused] == [f"{tmp_path / 'b.py'}: `x` is already exposed by {tmp_path / 'a.py'}"]


LAZY = (
    '__all_exposed__ = ["lazy_fn"]\n\n\n'
    "def lazy_fn() -> str:\n"
    "    from . import _lazyhelp  # imported at the first call, not at load\n\n"
    "    return _lazyhelp.VALUE\n"
)


def test_a_replaced_generation_stays_importable_while_a_call_holds_it(tmp_path: Path) -> None:
    (tmp_path / "_lazyhelp.py").write_text('VALUE = "helper"\n')
    (tmp_path / "lazy.py").write_text(LAZY)
    first = gateway.load_modules(tmp_path)
    in_flight = first.functions["lazy_fn"]  # what a call that started before the reload holds
    generation = in_flight.func.__module__.split(".")[0]
    (tmp_path / "lazy.py").write_text(LAZY + "# saved again\n")
    second = gateway.load_modules(tmp_path, previous=first, changed={str(tmp_path / "lazy.py")})
    del first  # swapped out
    assert in_flight.func() == "helper"  # failed: No module named '_gwN'
    del in_flight  # the call ended: its generation goes
    assert generation not in sys.modules
    assert second.functions["lazy_fn"].func() == "helper"


# -- against a real server, under load ---------------------------------------------------------

@pytest.fixture
def live(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A secured gateway watching tmp_path/modules (a module `live` plus the e2e fixtures)."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "live.py").write_text(module(0))
    shutil.copy(FIXTURES / "e2e" / "calls.py", folder / "calls.py")
    with secured_server(folder, tmp_path) as server:
        time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher is up: the latencies below are its own
        yield folder, server.cred, server.app, server.settings


def wait_for(check, seconds: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    """Poll until check() is true; returns how long it took (the reload latency)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "the change did not go live"
        time.sleep(0.005)
    return time.monotonic() - started


def test_twenty_rewrites_under_authenticated_load_fail_no_request(live) -> None:  # type: ignore[no-untyped-def]
    folder, cred, app, settings = live
    path = folder / "live.py"
    stop = threading.Event()
    answers: list[object] = []
    problems: list[BaseException] = []

    def load() -> None:
        with stt1_client.Client(cred) as api:
            while not stop.is_set():
                try:
                    answers.append(api.call("version"))
                except stt1_client.NotFound:
                    answers.append("404")
                except BaseException as exc:  # any 5xx, forged answer or connection error
                    problems.append(exc)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    latencies = []
    probe = stt1_client.Client(cred)

    def answers_with(expected: object) -> bool:
        try:
            return probe.call("version") == expected
        except stt1_client.NotFound:
            return expected == "404"

    try:
        for step in range(1, 21):
            if step == 8:  # a broken save: the previous version goes on serving, /healthz says why
                path.write_text("def version(:\n")
                wait_for(lambda: httpx.get(f"{settings.audience}/healthz").json()["refused"] != [])
                assert probe.call("version") == 7
                continue
            if step == 12:  # the file is removed: its function is gone
                path.unlink()
                latencies.append(wait_for(lambda: answers_with("404")))
                continue
            path.write_text(module(step))
            latencies.append(wait_for(lambda step=step: answers_with(step)))
        assert httpx.get(f"{settings.audience}/healthz").json()["refused"] == []
        assert "version" in probe.catalog()
        assert probe.call("add", 2, b=3) == 5  # the other module's functions never went away
    finally:
        stop.set()
        for worker in workers:
            worker.join(20)
        probe.close()
    assert problems == [], problems[:3]
    assert len(answers) > 100
    assert set(answers) <= {*range(0, 21), "404"}
    assert app.reloads >= 19
    print(f"\nreload latency (save -> new version answering): median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} changes; {len(answers)} calls, 0 failed")


def test_openapi_follows_the_swap(live) -> None:  # type: ignore[no-untyped-def]
    folder, _, _, settings = live
    (folder / "extra.py").write_text(module(1, "brand_new"))
    wait_for(lambda: "/rest/brand_new/" in httpx.get(f"{settings.audience}/openapi.json").json()["paths"])
    (folder / "extra.py").unlink()
    wait_for(lambda: "/rest/brand_new/" not in httpx.get(f"{settings.audience}/openapi.json").json()["paths"])


def test_a_changed_helper_reloads_the_modules_that_use_it(live) -> None:  # type: ignore[no-untyped-def]
    folder, cred, _, _ = live
    (folder / "_shared.py").write_text("FACTOR = 2\n")
    (folder / "uses.py").write_text(
        'from . import _shared\n__all_exposed__ = ["scaled"]\n\n\ndef scaled(x: int) -> int:\n'
        "    return x * _shared.FACTOR\n")
    with stt1_client.Client(cred) as api:
        wait_for(lambda: "scaled" in api.catalog())
        assert api.call("scaled", 5) == 10
        (folder / "_shared.py").write_text("FACTOR = 3\n")
        wait_for(lambda: api.call("scaled", 5) == 15)


def test_no_reload_means_no_watcher(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.py").write_text(module(1))
    gw = serve(gateway.create_app(tmp_path, auth="off", reload=False))
    (tmp_path / "a.py").write_text(module(2))
    time.sleep(0.5)
    assert gw.post("/rest/version").json()["results"] == 1 and gw.app.reloads == 0


def test_a_save_before_the_watcher_is_up_is_not_missed(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.py").write_text(module(1))
    gw = serve(gateway.create_app(tmp_path, auth="off"))
    time.sleep(0.05)  # after the modules were loaded, well before the watcher starts (WATCH_DELAY)
    (tmp_path / "a.py").write_text(module(2))
    wait_for(lambda: gw.post("/rest/version").json()["results"] == 2)
    assert gw.app.reloads == 1


def test_an_editors_dangling_lock_file_does_not_stop_live_reload(tmp_path: Path, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.py").write_text(module(1))
    (tmp_path / ".#a.py").symlink_to("root@host.1234:1700000000")  # Emacs's lock file: a link to nowhere
    gw = serve(gateway.create_app(tmp_path, auth="off"))
    time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher has looked for saves it missed: the link has no mtime
    (tmp_path / "a.py").write_text(module(2))
    wait_for(lambda: gw.post("/rest/version").json()["results"] == 2, seconds=5)
    assert "live reload stopped" not in caplog.text


def test_a_folder_moved_out_or_in_takes_its_modules_with_it(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    folder, elsewhere = tmp_path / "modules", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (folder / "sub" / "inner.py").write_text(module(1, "inner"))
    gw = serve(gateway.create_app(folder, auth="off"))
    assert gw.post("/rest/inner").json()["results"] == 1
    time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher is up
    (folder / "sub").rename(elsewhere / "sub")  # one event, for the folder: no .py path in it
    wait_for(lambda: gw.post("/rest/inner").status_code == 404, seconds=5)
    (elsewhere / "sub").rename(folder / "sub")
    wait_for(lambda: gw.post("/rest/inner").status_code == 200, seconds=5)


def test_start_up_imports_modules_as_a_reload_does(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    # Start-up imported in the main thread, reloads in a worker: a module that takes the event
    # loop at import loaded at start, then every save of it was refused. Now both refuse it.
    loopy = 'import asyncio\n\nLOOP = asyncio.get_event_loop()\n' + module(1, "loopy")
    (tmp_path / "loopy.py").write_text(loopy)
    reason = "RuntimeError: There is no current event loop in thread 'gateway-load'."
    gw = serve(gateway.create_app(tmp_path, auth="off"))
    assert gw.client.get("/healthz").json()["refused"] == [{"module": str(tmp_path / "loopy.py"), "reason": reason}]
    time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher is up
    (tmp_path / "loopy.py").write_text(loopy.replace("return 1", "return 2"))
    wait_for(lambda: gw.app.reloads >= 1, seconds=5)
    assert gw.client.get("/healthz").json()["refused"] == [{"module": str(tmp_path / "loopy.py"), "reason": reason}]
    assert gw.post("/rest/loopy").status_code == 404


def test_a_call_in_flight_across_a_reload_still_imports_its_siblings(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    started, go = tmp_path / "started", tmp_path / "go"
    blocking = LAZY.replace(
        "    from . import _lazyhelp",
        f"    import pathlib, time\n\n    pathlib.Path({str(started)!r}).touch()\n"
        f"    for _ in range(4000):  # 20 s at most: a failed test must not leave it running\n"
        f"        if pathlib.Path({str(go)!r}).exists():\n            break\n        time.sleep(0.005)\n"
        "    from . import _lazyhelp",
    )
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "_lazyhelp.py").write_text('VALUE = "helper"\n')
    (folder / "lazy.py").write_text(blocking)
    gw = serve(gateway.create_app(folder, auth="off"))
    generation = gw.app.catalog.functions["lazy_fn"].func.__module__.split(".")[0]
    time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher is up
    answers: list[httpx.Response] = []
    call = threading.Thread(target=lambda: answers.append(httpx.post(f"{gw.url}/rest/lazy_fn", timeout=10)))
    call.start()
    try:
        wait_for(started.exists)
        (folder / "lazy.py").write_text(LAZY.replace("lazy_fn", "lazy_fn2"))
        wait_for(lambda: gw.post("/rest/lazy_fn2").status_code == 200)  # swapped while the call runs
    finally:
        go.touch()
        call.join(10)
    assert [a.json() for a in answers] == [{"results": "helper", "valid": True}]
    wait_for(lambda: generation not in sys.modules, seconds=2)  # and then let go


@pytest.mark.parametrize("how", ["symlink re-pointed", "moved away, made anew", "removed, made anew"])
def test_a_replaced_modules_folder_is_served_and_watched(tmp_path: Path, serve, monkeypatch, caplog, how: str) -> None:  # type: ignore[no-untyped-def]
    # The watcher watched the directory it started on: the new folder was never seen, and a save
    # in the old one reloaded the file of that name in the new one.
    monkeypatch.setattr(gateway, "FOLDER_CHECK", 0.05)
    caplog.set_level(logging.INFO, logger="gateway")
    folder, release = tmp_path / "modules", tmp_path / "release1"
    if how == "symlink re-pointed":
        release.mkdir()
        folder.symlink_to(release)
    else:
        folder.mkdir()
    (folder / "a.py").write_text(module(1))
    gw = serve(gateway.create_app(folder, auth="off"))
    time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher is up
    if how == "symlink re-pointed":  # ln -sfn release2 modules.tmp && mv -T modules.tmp modules
        (tmp_path / "release2").mkdir()
        (tmp_path / "release2" / "a.py").write_text(module(2))
        (tmp_path / "modules.tmp").symlink_to(tmp_path / "release2")
        (tmp_path / "modules.tmp").replace(folder)
    else:
        if how == "moved away, made anew":
            folder.rename(release)
        else:
            shutil.rmtree(folder)
        folder.mkdir()
        (folder / "a.py").write_text(module(2))
    wait_for(lambda: gw.post("/rest/version").json().get("results") == 2, seconds=5)
    if release.exists():
        (release / "stale.py").write_text(module(3, "stale"))  # the old tree: never served, never reloaded
    (folder / "fresh.py").write_text(module(4, "fresh"))
    wait_for(lambda: gw.post("/rest/fresh").status_code == 200, seconds=5)
    assert "stale.py" not in caplog.text and gw.post("/rest/stale").status_code == 404


def test_an_import_that_hangs_is_reported_while_it_lasts(tmp_path: Path, serve, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    # A hanging import held up every reload after it, and /healthz said nothing was wrong.
    monkeypatch.setattr(gateway, "SLOW_IMPORT", 0.1)
    caplog.set_level(logging.WARNING, logger="gateway")
    folder, go = tmp_path / "modules", tmp_path / "go"
    folder.mkdir()
    (folder / "a.py").write_text(module(1))
    gw = serve(gateway.create_app(folder, auth="off"))
    time.sleep(gateway.WATCH_DELAY + 0.2)  # the watcher is up
    hangs = folder / "hangs.py"
    try:
        hangs.write_text(f"import pathlib, time\n\nwhile not pathlib.Path({str(go)!r}).exists():\n"
                         "    time.sleep(0.005)\n" + module(2, "late"))  # fmt: skip
        wait_for(lambda: [e["module"] for e in gw.client.get("/healthz").json().get("loading", [])] == [str(hangs)])
        wait_for(lambda: f"importing {hangs} for" in caplog.text)
    finally:
        go.touch()  # else the import, in a thread that exit waits for, never ends
    wait_for(lambda: gw.post("/rest/late").status_code == 200)
    assert "loading" not in gw.client.get("/healthz").json()
