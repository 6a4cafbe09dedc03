"""Self-deploying: a saved module is live, changed or gone without a restart or a failed call."""
from __future__ import annotations

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
