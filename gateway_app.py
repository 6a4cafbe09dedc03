"""The gateway: every function a module in ``modules/`` lists in
``__all_exposed__`` becomes ``POST /rest/<name>/<var1>``.

Read top to bottom: configuration, errors, discovery, dispatch, HTTP, serving, CLI.
Nothing here runs at import time, so tests and scripts build apps from any folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import decimal
import functools
import importlib
import importlib.util
import inspect
import itertools
import logging
import math
import os
import pkgutil
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import sys
import threading
import time
import types
import typing
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NotRequired, Required, TypedDict
from urllib.parse import quote, unquote

import msgspec

from security import (
    BODY_KEY,
    CALLER_KEY,
    FAILURE_REASONS,
    MAX_BODY_KEY,
    REFUSED_KEY,
    REQUEST_ID_KEY,
    TENANT_KEY,
    Credential,
    Keystore,
    KeystoreUnavailable,
    OtpLocked,
    RedisKeystore,
    Security,
    b64encode,
    open_replay_store,
    read_credential,
    redacted_url,
    write_credential,
)

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The scope keys the security middleware fills (the verified Caller, the body it already
# read) are defined in security.py beside the code that writes them.

STARTUP_FAILURE = 3  # exit code for "could not start", as uvicorn uses
STATIC = Path(__file__).resolve().parent / "static"
# The console handles keys: it runs only this origin's scripts, talks only to this origin, and
# cannot be framed (clickjacking) or leak its URL to other sites.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _with_console_headers(static_files: type) -> type:
    """StaticFiles whose every answer carries CONSOLE_HEADERS. The console's own page is in
    static/ too: served from there without them, it ran without its policy and could be framed
    by any site, while holding the key the browser had stored for this origin."""

    class ConsoleStaticFiles(static_files):  # type: ignore[misc,valid-type]
        def file_response(self, *args: Any, **kwargs: Any) -> Any:
            response = super().file_response(*args, **kwargs)
            response.headers.update(CONSOLE_HEADERS)
            return response

    return ConsoleStaticFiles


#### Configuration


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the CLI and ``create_app`` accept; each field is also ``GATEWAY_<NAME>``."""

    host: str = "127.0.0.1"
    port: int = 8000
    modules: str = "modules"
    packages: tuple[str, ...] = ()
    db: str = "gateway.db"
    workers: int = 1
    timeout: float = 30.0
    max_body: int = 1 << 20  # default for functions whose entry sets none
    rate: float = 0  # default calls per second per tenant and function; 0: unlimited
    max_result: int = 16 << 20  # the largest encoded result sent; it is built (and signed) whole in memory
    concurrency: int = 1024
    threads: int = 40
    log_level: str = "info"
    auth: str = "stt1"  # "off" serves /rest/ without tokens: only for benchmarks and trusted loopback use
    public_url: str = ""  # the audience tokens are bound to; default http://HOST:PORT
    replay: str = "memory"
    keystore: str = ""  # "": SQLite at db; redis://...: one keystore shared by every host
    rotate_days: float = 0  # rotate credentials older than this many days; 0: only on demand
    reload: bool = True  # watch the modules folder and swap in what changed
    metrics: bool = False  # serve GET /metrics (Prometheus text format)

    @property
    def audience(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address, as URLs write it
        return (self.public_url or f"http://{host}:{self.port}").rstrip("/")


#### Errors


class GatewayError(Exception):
    """The one error type of the request path: it carries what the client is told."""

    def __init__(self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode({"valid": False, "error": {"code": code, "message": message}})


#### Discovery


class Entry(msgspec.Struct, forbid_unknown_fields=True):
    """One ``__all_exposed__`` item in its dict form; a plain name becomes ``Entry(name)``."""

    name: str
    tenants: list[str] | None = None
    timeout: typing.Annotated[float, msgspec.Meta(gt=0)] | None = None
    doc: str | None = None
    inline: bool = False
    otp: bool = False
    max_body: typing.Annotated[int, msgspec.Meta(ge=0)] | None = None  # bytes; None: the global default
    rate: typing.Annotated[float, msgspec.Meta(ge=0)] | None = None  # calls/s per tenant; 0: unlimited


@dataclasses.dataclass(frozen=True, slots=True, weakref_slot=True)  # see _forget_generations
class Exposed:
    """A function ready to call: everything the hot path needs, computed once per load."""

    name: str
    func: Callable[..., Any]
    source: str  # the file or module it came from, for messages
    is_async: bool
    inline: bool
    timeout: float | None
    tenants: frozenset[str] | None  # None: every tenant
    doc: str
    otp: bool
    max_body: int | None  # None: Settings.max_body
    rate: float | None  # None: Settings.rate
    params: frozenset[str]
    first: str | None  # the parameter the URL's <var1> binds
    url_var1: str | None  # `first`, shown as the URL's <var1> only when a URL string can be one (not a list)
    args_type: Any  # a TypedDict: what the arguments are decoded into
    decode_args: Callable[[bytes], Any]  # built once: msgspec.convert re-reads the type per call
    decode_var1: Callable[[bytes], Any] | None  # lax: the URL's "42" becomes 42 where the hint says int
    returns: Any

    def allows(self, caller: Any) -> bool:
        """May this caller (a security.Caller, or None with security off) call it?

        A function restricted to tenants, or needing a second factor, is never callable
        anonymously: with security off it is hidden like a missing one.
        """
        if caller is None:
            return self.tenants is None and not self.otp
        return (self.tenants is None or caller.tenant in self.tenants) and caller.may_call(self.name)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    source: str
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", " ".join(self.reason.split()))  # one line, always

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclasses.dataclass(frozen=True, slots=True)
class Catalog:
    """The result of one load: the dispatch dict and the modules that were refused."""

    functions: dict[str, Exposed]
    refused: tuple[Refusal, ...]
    max_body: int = dataclasses.field(init=False, default=0)  # the largest any entry allows

    def __post_init__(self) -> None:
        largest = max((fn.max_body or 0 for fn in self.functions.values()), default=0)
        object.__setattr__(self, "max_body", largest)


class Refused(Exception):
    """A module cannot be served; the message is the reason shown to the operator."""


_generation = 0
SLOW_IMPORT = 5.0  # seconds an import may take before the log and /healthz report it
_importing: dict[str, float] = {}  # module -> when its import started (time.monotonic)


def load_modules(
    path: str | os.PathLike[str] | None = "modules",
    packages: tuple[str, ...] = (),
    *,
    previous: Catalog | None = None,
    changed: Collection[str] | None = None,
) -> Catalog:
    """Import every module of the folder (and of the named installed packages) afresh.

    Each load imports the folder as a new package (``_gw<N>``), so a reload never sees the
    modules of the previous one and modules can import their siblings with ``from . import x``.
    A bad module is refused with its reason; the others still load.

    A reload passes the ``previous`` catalog. With ``changed`` (files, as named in sources),
    only those are imported again and the rest of ``previous`` is kept as it was, so a reload
    costs what changed; without, every file of the folder is. A file that now fails keeps
    serving its previous version while it is reported as refused; a file that is gone takes its
    functions with it. The files refused so far are tried again too: what refused them (a name
    another file exposed) may be gone. A name stays with the file that exposed it before (see
    _assign), so the catalog and the refusals always agree.
    """
    global _generation
    _generation += 1
    functions: dict[str, Exposed] = {}
    refused: list[Refusal] = []
    only = None
    retried: set[str] = set()
    if previous is not None:
        if changed is None:  # every file; installed packages do not change under a running gateway
            sources = {fn.source for fn in previous.functions.values()} | {r.source for r in previous.refused}
            changed = {source for source in sources if _is_file_in(source, path)}
        else:  # and the refused files: they are few, so retrying each costs little
            retried = {r.source for r in previous.refused if _is_file_in(r.source, path)} - set(changed)
            only = [source for source in sorted(changed) + sorted(retried) if Path(source).exists()]
            changed = {*changed, *retried}
        functions = {name: fn for name, fn in previous.functions.items() if fn.source not in changed}
        refused = [refusal for refusal in previous.refused if refusal.source not in changed]
        packages = ()
    outcomes: dict[str, list[Exposed] | str] = {}  # what each module imported exposes, or why it cannot load
    cwd = os.getcwd()
    for source, import_module in _module_sources(path, packages, f"_gw{_generation}", only):
        _importing[source] = time.monotonic()
        try:
            try:
                module = import_module()
            finally:
                _importing.pop(source, None)
                _keep_cwd(cwd, source)
            outcomes[source] = _exposed_of(module, source)
        except Refused as exc:
            outcomes[source] = str(exc)
        except SyntaxError as exc:
            outcomes[source] = f"SyntaxError: {exc.msg} (line {exc.lineno})"
        except BaseException as exc:  # sys.exit(), KeyboardInterrupt, CancelledError...: the module's failure
            # Imports run in a thread of their own (_load_in_thread), where a real Ctrl-C never
            # arrives (it goes to the main thread): a KeyboardInterrupt here is the module's own
            # raise, and letting it through stopped a running gateway, with exit 0, on a save.
            outcomes[source] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    refused += _assign(outcomes, functions, previous, retried).values()
    if previous is not None:
        _forget_generations(previous.functions.values(), functions.values())
    return Catalog(functions, tuple(refused))


def _assign(
    outcomes: dict[str, list[Exposed] | str], functions: dict[str, Exposed], previous: Catalog | None, retried: set[str]
) -> dict[str, Refusal]:
    """Add to ``functions`` what the modules just imported serve; return the refusals, in load order.

    Each module is first taken to serve its new version. While two claim one name, the surer
    claim wins: a version that serves whatever happens (a module kept as it was, a refused
    module's previous version, or the module that had this name before), else the first in
    load order. The others are refused and their previous versions go on serving: those had
    their names before, so they take none from another module. Decided in file order instead,
    a full reload gave a name to a newcomer, then the owner's previous version took it back:
    served by one, reported for the other. Modules may still trade names in one reload.
    """
    before = [] if previous is None else list(previous.functions.values())
    owners = {fn.name: fn.source for fn in before}
    order = {source: i for i, source in enumerate(outcomes)}
    taken = {s: outcome for s, outcome in outcomes.items() if not isinstance(outcome, str)}  # until beaten
    reasons = {s: outcome for s, outcome in outcomes.items() if isinstance(outcome, str)}

    def surer(fn: Exposed) -> tuple[bool, int]:
        return fn.source in taken and owners.get(fn.name) != fn.source, order.get(fn.source, -1)

    while True:
        claims: dict[str, list[Exposed]] = {}
        for fn in itertools.chain(functions.values(), (fn for fn in before if fn.source in reasons), *taken.values()):
            claims.setdefault(fn.name, []).append(fn)
        beaten: dict[str, str] = {}
        for name, fns in claims.items():
            best = min(fns, key=surer)
            for fn in fns:
                if fn is not best and fn.source in taken:
                    beaten.setdefault(fn.source, f"`{name}` is already exposed by {best.source}")
        if not beaten:
            break
        for source, reason in beaten.items():
            del taken[source]
            reasons[source] = reason
    kept_back = (fn for fn in before if fn.source in reasons)  # a refused module's previous version
    functions.update((fn.name, fn) for fn in itertools.chain(*taken.values(), kept_back))
    while any(_let_in(source, outcomes[source], functions, reasons) for source in list(reasons)):
        pass  # what beat it may have been refused too
    refusals: dict[str, Refusal] = {}
    for source in outcomes:
        if source not in reasons:
            if source in retried:
                log.info("%s loads now: what refused it is gone", source)
            continue
        refusal = refusals[source] = Refusal(source, reasons[source])
        if previous is not None and source in retried and refusal in previous.refused:
            log.debug("still refused %s", refusal)  # logged when it happened, not at every reload
        else:
            log.error("refused %s", refusal)
    return refusals


def _let_in(source: str, outcome: list[Exposed] | str, functions: dict[str, Exposed], reasons: dict[str, str]) -> bool:
    """Let a module refused for a name in when its names are all free after all (else say who
    has the name now); True if it got in."""
    if isinstance(outcome, str):
        return False
    for fn in outcome:
        if functions.get(fn.name, fn).source != source:
            reasons[source] = f"`{fn.name}` is already exposed by {functions[fn.name].source}"
            return False
    for name in [name for name, fn in functions.items() if fn.source == source]:
        del functions[name]  # its previous version
    functions.update((fn.name, fn) for fn in outcome)
    del reasons[source]
    return True


def _load_in_thread(*args: Any, **kwargs: Any) -> Future[Catalog]:
    """``load_modules`` in a thread of its own, as both start-up and live reload run it.

    Reloads cannot import in the main thread (it runs the event loop), so start-up does not
    either: a module that needs the main thread at import (``asyncio.get_event_loop()``,
    ``signal.signal``) is then refused from the start, with the reason, instead of loading at
    start and being refused at its first save. The loop such a module got at start was never
    the one that serves anyway.
    """
    future: Future[Catalog] = Future()
    future.set_running_or_notify_cancel()  # a cancelled reload cannot stop an import: it finishes, unseen
    done = threading.Event()

    def load() -> None:
        try:
            future.set_result(load_modules(*args, **kwargs))
        except BaseException as exc:  # a bug of ours: the caller re-raises it
            future.set_exception(exc)
        finally:
            done.set()

    def report() -> None:
        # A module that hangs at import holds up this load and every reload after it, and a
        # thread cannot be stopped: at least say which one, ever less often while it lasts.
        warn_at: dict[str, float] = {}  # module -> how long its import runs before the next warning
        while not done.wait(SLOW_IMPORT / 5):
            for entry in importing_slowly():
                if entry["seconds"] >= warn_at.get(entry["module"], 0):
                    log.warning("importing %s for %.0f s now: reloads wait for it", entry["module"], entry["seconds"])
                    warn_at[entry["module"]] = entry["seconds"] * 2

    # Not a daemon: a thread a module starts at import inherits that, and must stay the
    # non-daemon thread it would be anywhere else (exit waits for it; see _end_process_after).
    threading.Thread(target=load, name="gateway-load", daemon=False).start()
    threading.Thread(target=report, name="gateway-load-report", daemon=True).start()
    return future


def importing_slowly(now: float | None = None) -> list[dict[str, Any]]:
    """The imports running for over SLOW_IMPORT seconds, for /healthz: until they end, no
    reload can go live and no refusal is reported."""
    now = time.monotonic() if now is None else now
    return [
        {"module": source, "seconds": round(now - started, 1)}
        for source, started in list(_importing.items())
        if now - started >= SLOW_IMPORT
    ]


def _is_file_in(source: str, path: str | os.PathLike[str] | None) -> bool:
    """Is this source a file of the modules folder (not a module of an installed package)?"""
    return path is not None and source.endswith(".py") and Path(source).is_relative_to(path)


def _keep_cwd(cwd: str, source: str) -> None:
    """Undo a module's os.chdir at import: the gateway names its modules folder, keystore and
    credential files relative to the working directory, so a module that moved it would break
    every later import and every reload (the watcher would look for the folder elsewhere)."""
    if os.getcwd() != cwd:
        log.warning("%s changed the working directory at import; changed it back to %s", source, cwd)
        os.chdir(cwd)


def _generation_of(fn: Exposed) -> str:
    return fn.func.__module__.split(".", 1)[0]


_retiring: dict[str, int] = {}  # a generation nothing serves -> how many of its records are still held
_retiring_refs: dict[int, weakref.ref[Exposed]] = {}  # those weak references, kept until they fire
_retiring_lock = threading.RLock()  # they fire in whichever thread lets go last, maybe while holding it


def _forget_generations(replaced: Iterable[Exposed], serving: Iterable[Exposed]) -> None:
    """Drop from sys.modules the generations a reload replaced and nothing serves any more.

    Without this every reload would keep its module objects alive for ever; a generation that
    still serves (an unchanged file loaded earlier) keeps its package, for lazy imports, but not
    the modules of it that were replaced: whatever such a module holds (a cache, a leak) is
    freed by reloading it, whatever else its generation still serves.

    A generation goes only once its last record is gone, not at the swap: a call in flight
    holds its record, and may still import a sibling lazily (``from . import _helper``), which
    needs the package; dropped at the swap, that call failed with "No module named '_gwN'".
    """
    replaced = list(replaced)
    # This load's own generation goes too when nothing it imported serves (a broken save, a
    # removed file): else it and the refused modules retried in it would stay for good.
    gone = {_generation_of(fn) for fn in replaced} | {f"_gw{_generation}"}
    gone -= {_generation_of(fn) for fn in serving}
    for name in {name for name in gone if re.fullmatch(r"_gw\d+", name)}:  # never a package or stdlib module
        held = [fn for fn in replaced if _generation_of(fn) == name]
        if not held:
            _drop_generation(name)
            continue
        with _retiring_lock:
            _retiring[name] = _retiring.get(name, 0) + len(held)
            for fn in held:
                ref = weakref.ref(fn, functools.partial(_released, name))
                _retiring_refs[id(ref)] = ref
    stale = {fn.func.__module__ for fn in replaced} - {fn.func.__module__ for fn in serving}
    for name in stale:
        if re.fullmatch(r"_gw\d+\..+", name):
            sys.modules.pop(name, None)
            parent, _, child = name.rpartition(".")
            package = sys.modules.get(parent)
            if package is not None:  # importing _gwN.x also set it as an attribute of the package
                vars(package).pop(child, None)


def _released(generation: str, ref: weakref.ref[Exposed]) -> None:
    """A record of a retired generation is gone (its catalog was swapped out, its call ended)."""
    with _retiring_lock:
        del _retiring_refs[id(ref)]
        _retiring[generation] -= 1
        if _retiring[generation]:
            return
        del _retiring[generation]
    _drop_generation(generation)


def _drop_generation(generation: str) -> None:
    # list(): a copy taken at once, as another thread may be importing (a reload, a lazy import)
    for name in [n for n in list(sys.modules) if n.split(".", 1)[0] == generation]:
        sys.modules.pop(name, None)


def _module_sources(
    path: str | os.PathLike[str] | None, packages: tuple[str, ...], package_name: str, only: list[str] | None = None
) -> Iterator[tuple[str, Callable[[], types.ModuleType]]]:
    """Yield (display name, importer) for each module to consider, in a stable order (``only``:
    just these files, in the order given)."""
    if path is not None:
        root = Path(path)
        package = types.ModuleType(package_name)
        package.__path__ = [str(root)]
        package.__package__ = package_name
        sys.modules[package_name] = package
        for file in _walk(root) if only is None else map(Path, only):
            dotted = ".".join(file.relative_to(root).with_suffix("").parts)
            yield str(file), functools.partial(importlib.import_module, f"{package_name}.{dotted}")
    for name in packages:
        yield name, functools.partial(importlib.import_module, name)
        top = sys.modules.get(name)  # absent when the import just failed (and was refused)
        for info in pkgutil.walk_packages(getattr(top, "__path__", []), prefix=f"{name}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                yield info.name, functools.partial(importlib.import_module, info.name)


def _walk(folder: Path) -> Iterator[Path]:
    for child in sorted(folder.iterdir()):
        if child.name.startswith(("_", ".")):
            continue
        if child.is_dir():
            yield from _walk(child)
        elif child.suffix == ".py":
            yield child


def _defined_function(obj: Any, module_name: str) -> bool:
    """A function defined in this module, decorated or not (functools.lru_cache, @wraps): what
    ``"*"`` exposes. Not a class, not an imported name (its __module__ is another's)."""
    if inspect.isclass(obj) or not callable(obj) or getattr(obj, "__module__", None) != module_name:
        return False
    try:
        return inspect.isfunction(inspect.unwrap(obj))
    except Exception:  # a __wrapped__ chain that loops, or an attribute that raises: not ours to expose
        return False


def _exposed_of(module: types.ModuleType, source: str) -> list[Exposed]:
    listing = getattr(module, "__all_exposed__", None)
    if listing is None:
        return []
    if listing == "*":
        entries = [
            Entry(name)
            for name, obj in vars(module).items()
            if not name.startswith("_") and _defined_function(obj, module.__name__)
        ]
    elif isinstance(listing, (list, tuple)):
        entries = [_entry(item) for item in listing]
    else:
        raise Refused('__all_exposed__ must be a list or "*"')
    names = [entry.name for entry in entries]
    for name in names:
        if names.count(name) > 1:
            raise Refused(f"`{name}` is listed twice")
    return [_exposed(module, entry, source) for entry in entries]


def _entry(item: object) -> Entry:
    if isinstance(item, str):
        return Entry(item)
    if not isinstance(item, dict):
        raise Refused(f"an entry must be a name or a dict, not {type(item).__name__}: {item!r}")
    try:
        return msgspec.convert(item, Entry)
    except msgspec.ValidationError as exc:
        raise Refused(f"bad entry {item!r}: {exc}") from None


def _exposed(module: types.ModuleType, entry: Entry, source: str) -> Exposed:
    name = entry.name
    if not name.isidentifier() or name.startswith("_"):
        raise Refused(f"`{name}` is not a public function name")
    func = getattr(module, name, None)
    if func is None:
        raise Refused(f"`{name}` is listed but not defined")
    if not callable(func) or inspect.isclass(func):
        raise Refused(f"`{name}` is not a function")
    # A callable object's hints are its __call__'s: typing reads an instance's class fields.
    annotated = func if inspect.isroutine(func) or hasattr(func, "__wrapped__") else type(func).__call__
    try:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(annotated, include_extras=True)
    except Exception as exc:
        raise Refused(f"`{name}`: cannot read its signature: {exc}") from None
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise Refused(f"`{name}`: parameter `{param.name}` cannot be bound from a JSON object")
        if param.name == "funcName":  # the body's funcName names the function to call
            raise Refused(f"`{name}`: a parameter cannot be called `funcName`, which names the function to call")
        hint = hints.get(param.name, Any)
        try:
            msgspec.json.schema(hint, schema_hook=_schema_hook)  # proves msgspec can convert into it
        except Exception:
            raise Refused(
                f"`{name}`: parameter `{param.name}` has a type msgspec cannot convert: "
                f"{inspect.formatannotation(hint, module.__name__)}"
            ) from None
        if (why := _never_decodes(hint)) is not None:
            raise Refused(
                f"`{name}`: parameter `{param.name}` can never be decoded from JSON ({why}): "
                f"{inspect.formatannotation(hint, module.__name__)}"
            )
        fields[param.name] = Required[hint] if param.default is param.empty else NotRequired[hint]
    args_type = TypedDict(f"{name}_args", fields, total=False)  # type: ignore[misc]
    returns = hints.get("return", Any)
    try:
        msgspec.json.schema(returns, schema_hook=_schema_hook)
    except Exception:
        returns = Any  # only documentation suffers: the result is checked when it is encoded
    is_async = inspect.iscoroutinefunction(func)
    if entry.inline and is_async:
        raise Refused(f"`{name}`: `inline` is for sync functions; this one is async")
    first = next(iter(fields), None)
    return Exposed(
        name=name,
        func=func,
        source=source,
        is_async=is_async,
        inline=entry.inline,
        timeout=entry.timeout,
        tenants=None if entry.tenants is None else frozenset(entry.tenants),
        doc=entry.doc if entry.doc is not None else inspect.cleandoc(func.__doc__ or ""),
        otp=entry.otp,
        max_body=entry.max_body,
        rate=entry.rate,
        params=frozenset(fields),
        first=first,
        url_var1=first if first is not None and _from_url(hints.get(first, Any)) else None,
        args_type=args_type,
        decode_args=msgspec.json.Decoder(args_type).decode,
        decode_var1=msgspec.json.Decoder(hints.get(first, Any), strict=False).decode if first else None,
        returns=returns,
    )


def _from_url(hint: Any) -> bool:
    """Can the URL's <var1>, a string, be a value of this type? A number, a string, an enum, a
    date..., or a union of those: yes. A list, a dict or a struct: no, so the catalog and the
    OpenAPI description do not offer the URL for it (a try is still a clear 422)."""
    try:
        return _from_url_cached(hint)  # a schema costs ~14 us; most hints are a few plain types
    except TypeError:  # an unhashable hint
        return _from_url_cached.__wrapped__(hint)


@functools.lru_cache(maxsize=256)
def _from_url_cached(hint: Any) -> bool:
    schema = msgspec.json.schema(hint, schema_hook=_schema_hook)
    defs = schema.get("$defs", {})

    def scalar(node: dict[str, Any]) -> bool:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
        if "anyOf" in node:
            return all(scalar(option) for option in node["anyOf"])
        if "type" not in node:
            return True  # Any, object, an enum or a const: a string may be one
        return node["type"] in ("string", "integer", "number", "boolean", "null")

    return scalar(schema)


def _never_decodes(hint: Any) -> str | None:
    """Why no JSON value can ever decode into ``hint``, though msgspec describes it: a set of
    lists is a 500 on every call (a list is unhashable), a dict keyed by tuples a 422 (JSON's
    keys are strings). Refused at load, so the author hears of it, not each caller."""
    if hint in (Any, int, float, str, bool):
        return None
    try:
        return _never_decodes_cached(hint)
    except TypeError:  # an unhashable hint
        return _never_decodes_cached.__wrapped__(hint)


@functools.lru_cache(maxsize=256)
def _never_decodes_cached(hint: Any) -> str | None:
    import msgspec.inspect as mi

    key_types = (
        mi.StrType, mi.IntType, mi.FloatType, mi.DecimalType, mi.BytesType, mi.EnumType, mi.LiteralType,
        mi.UUIDType, mi.DateTimeType, mi.DateType, mi.TimeType, mi.TimeDeltaType, mi.AnyType,
    )  # fmt: skip
    seen: set[int] = set()

    def bare(info: Any) -> Any:
        while isinstance(info, mi.Metadata):
            info = info.type
        return info

    def never_hashable(info: Any) -> bool:
        info = bare(info)
        if isinstance(info, mi.UnionType):
            return all(never_hashable(t) for t in info.types)
        if isinstance(info, (mi.TupleType, mi.NamedTupleType)):
            types = info.item_types if isinstance(info, mi.TupleType) else [f.type for f in info.fields]
            return any(never_hashable(t) for t in types)
        if isinstance(info, mi.VarTupleType):
            return never_hashable(info.item_type)
        if isinstance(info, mi.StructType):
            return not info.cls.__struct_config__.frozen
        if isinstance(info, mi.DataclassType):
            return info.cls.__hash__ is None
        return isinstance(info, (mi.ListType, mi.DictType, mi.SetType, mi.ByteArrayType, mi.TypedDictType))

    def walk(info: Any) -> str | None:
        info = bare(info)
        if id(info) in seen:  # a recursive type
            return None
        seen.add(id(info))
        if isinstance(info, (mi.SetType, mi.FrozenSetType)) and never_hashable(info.item_type):
            return "a set cannot hold unhashable items"
        if isinstance(info, (mi.DictType, mi.FrozenDictType)):
            key = bare(info.key_type)
            members = key.types if isinstance(key, mi.UnionType) else (key,)
            if not any(isinstance(bare(t), key_types) for t in members):
                return "a JSON object's keys are strings, which cannot become this dict's keys"
        inner: list[Any] = []
        if isinstance(info, mi.UnionType):
            inner = list(info.types)
        elif isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            inner = [info.item_type]
        elif isinstance(info, mi.TupleType):
            inner = list(info.item_types)
        elif isinstance(info, (mi.DictType, mi.FrozenDictType)):
            inner = [info.value_type]
        elif isinstance(info, (mi.StructType, mi.TypedDictType, mi.DataclassType, mi.NamedTupleType)):
            inner = [f.type for f in info.fields]
        for item in inner:
            if (why := walk(item)) is not None:
                return why
        return None

    return walk(mi.type_info(hint))


def _schema_hook(cls: type) -> dict[str, Any]:
    if cls is object:  # msgspec passes `object` values through untouched
        return {"description": "any JSON value"}
    raise NotImplementedError


#### Dispatch


def bind(fn: Exposed, body: bytes, var1: str | None, url_func: str | None) -> dict[str, Any]:
    """Turn the body (and the URL's var1) into keyword arguments, or raise a 400/422.

    Body values are converted strictly, as JSON typed them; only the URL's var1, always a
    string, is converted laxly ("42" becomes 42 where the hint says int).
    """
    args = decode_object(body)  # generic first: funcName and unknown fields need the raw keys
    named = args.pop("funcName", url_func)
    if url_func is not None and named != url_func:
        raise GatewayError(400, "bad_json", f"funcName `{named}` conflicts with the URL's `{url_func}`")
    for key in args:
        if key not in fn.params:
            raise GatewayError(422, "invalid_arguments", f"Object contains unknown field `{key}`")
    if var1 is None:
        return _decode_args(fn.decode_args, fn.args_type, body)
    if fn.decode_var1 is None or fn.first is None:
        raise GatewayError(422, "invalid_arguments", f"`{fn.name}` takes no arguments, so the URL cannot carry one")
    if fn.first in args:
        raise GatewayError(422, "invalid_arguments", f"`{fn.first}` is given both in the URL and in the body")
    try:
        value = fn.decode_var1(msgspec.json.encode(var1))
    except msgspec.ValidationError as exc:
        raise GatewayError(422, "invalid_arguments", f"{exc} - at `$.{fn.first}` (from the URL)") from None
    # The body is decoded as sent, without the URL's argument, which is added after: written
    # into the body and decoded again, other numbers passed through a float (a Decimal lost
    # digits) and a float var1 of inf or nan became null.
    decode, rest_type = _without_first(fn.args_type, fn.first)
    kwargs = _decode_args(decode, rest_type, body)
    kwargs[fn.first] = value
    return kwargs


_WITHOUT_FIRST: weakref.WeakKeyDictionary[type, tuple[Callable[[bytes], Any], type]] = weakref.WeakKeyDictionary()


def _without_first(args_type: type, first: str) -> tuple[Callable[[bytes], Any], type]:
    """A decoder for a function's arguments but the first, for a call whose URL carries it.

    Made on the first such call, not at load (a TypedDict and its decoder cost about 40 us, for
    every function of every module); weakly keyed, so a reload's old types are not kept.
    """
    made = _WITHOUT_FIRST.get(args_type)
    if made is None:
        fields = {name: hint for name, hint in args_type.__annotations__.items() if name != first}
        rest_type = TypedDict(args_type.__name__, fields, total=False)  # type: ignore[misc]
        made = _WITHOUT_FIRST[args_type] = (msgspec.json.Decoder(rest_type).decode, rest_type)
    return made


def _decode_args(decode: Callable[[bytes], Any], args_type: type, body: bytes) -> dict[str, Any]:
    """Decode strictly, with whole floats as ints where the type wants an int; else the 422.

    JSON has one kind of number: 2.0 is the integer 2, as JSON Schema (so /openapi.json) says,
    but msgspec's strict mode wants it spelled 2. Only values whose type is an int change:
    an untyped or float value keeps the 2.0 it was sent, wherever it is. Numbers are read as
    Decimal and written back digit for digit, so no other value changes on the way.
    """
    try:
        return decode(body or b"{}")  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        if "got `float`" not in str(exc):
            raise GatewayError(422, "invalid_arguments", str(exc)) from None
    except TypeError as exc:  # a list sent for an item of set[Any]: "unhashable type: 'list'"
        raise GatewayError(422, "invalid_arguments", f"a set cannot hold this value: {exc}") from None
    import msgspec.inspect as mi

    converted = _ints_where_int(mi.type_info(args_type), _EXACT_DECODE(body))
    try:
        return decode(_EXACT_NUMBERS(converted))  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:  # now about the values as sent: "Expected `int` >= 3"
        raise GatewayError(422, "invalid_arguments", str(exc)) from None
    except TypeError as exc:
        raise GatewayError(422, "invalid_arguments", f"a set cannot hold this value: {exc}") from None


_EXACT_DECODE = msgspec.json.Decoder(float_hook=decimal.Decimal).decode
_EXACT_NUMBERS = msgspec.json.Encoder(decimal_format="number").encode


def _ints_where_int(info: Any, value: Any) -> Any:
    """``value`` (numbers as Decimal) with each whole number an int where ``info`` wants one."""
    import msgspec.inspect as mi

    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(value, decimal.Decimal):
        whole = value.is_finite() and value == value.to_integral_value()
        return int(value) if whole and _wants_int(info) else value
    if isinstance(info, mi.UnionType):  # the one member that takes this kind of JSON value
        kind: tuple[type, ...] = (
            mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType, mi.TupleType, mi.NamedTupleType
        )
        if not isinstance(value, list):
            kind = (mi.DictType, mi.StructType, mi.TypedDictType, mi.DataclassType)
        members = [t for t in info.types if isinstance(t, kind)]
        return _ints_where_int(members[0], value) if len(members) == 1 else value
    if isinstance(value, list):
        if isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            return [_ints_where_int(info.item_type, item) for item in value]
        if isinstance(info, (mi.TupleType, mi.NamedTupleType)):
            types = info.item_types if isinstance(info, mi.TupleType) else [f.type for f in info.fields]
            return [_ints_where_int(t, item) for t, item in zip(types, value, strict=False)] + value[len(types) :]
    if isinstance(value, dict):
        if isinstance(info, mi.DictType):
            return {key: _ints_where_int(info.value_type, item) for key, item in value.items()}
        if isinstance(info, (mi.StructType, mi.TypedDictType, mi.DataclassType)):
            fields = {f.encode_name: f.type for f in info.fields}
            return {key: _ints_where_int(fields[key], item) if key in fields else item for key, item in value.items()}
    return value


def _wants_int(info: Any) -> bool:
    """An int, an IntEnum or an int Literal, or a union with one of them and no float (int |
    float already takes 2.0 as the float it is)."""
    import msgspec.inspect as mi

    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.UnionType):
        members = info.types
        return not any(isinstance(t, (mi.FloatType, mi.AnyType, mi.DecimalType)) for t in members) and any(
            _wants_int(t) for t in members
        )
    if isinstance(info, (mi.LiteralType, mi.EnumType)):
        values = info.values if isinstance(info, mi.LiteralType) else [m.value for m in info.cls]
        return any(type(v) is int for v in values)
    return isinstance(info, mi.IntType)


def decode_object(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        args = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # msgspec reports bad UTF-8 inside a string and nesting past the recursion limit with
        # Python's own errors, not DecodeError: both are the client's malformed JSON, not a 500.
        raise GatewayError(400, "bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(args, dict):
        raise GatewayError(400, "bad_json", "body must be a JSON object")
    return args


class Dispatcher:
    """Runs one exposed function under the gateway's timeout and concurrency limits."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.inflight = 0
        self._executor: ThreadPoolExecutor | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="gateway-call")
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _release(self) -> None:
        self.inflight -= 1

    async def call(self, fn: Exposed, kwargs: dict[str, Any]) -> Any:
        if self.inflight >= self.settings.concurrency:
            raise GatewayError(503, "overloaded", "too many calls in progress; retry later")
        timeout = fn.timeout or self.settings.timeout
        work: Future[Any] | None = None  # the thread pool's job, for a sync function
        deadline: asyncio.Timeout | None = None
        self.inflight += 1
        try:
            if fn.inline or fn.is_async:
                result = fn.func(**kwargs)  # an async function's body only runs when awaited, below
                if not inspect.isawaitable(result):
                    # Inline: it ran on the event loop, where no timer could have stopped it, so it
                    # gets none (a timer costs about 7 us a call, as much as the rest of the call).
                    return result
            async with asyncio.timeout(timeout) as deadline:
                if not (fn.inline or fn.is_async):
                    work = self.executor.submit(fn.func, **kwargs)
                    result = await asyncio.shield(asyncio.wrap_future(work))
                # A coroutine, also from a sync function (an async one behind a plain decorator): run it.
                result = await result if inspect.isawaitable(result) else result
            if deadline.expired():  # it caught the cancellation and went on: its answer is late all the same
                raise TimeoutError
            return result
        except TimeoutError:
            if deadline is None or not deadline.expired():
                raise  # the function's own (an upstream's socket.timeout): a 500 with its traceback
            raise GatewayError(504, "timeout", f"`{fn.name}` did not finish within {timeout:g} s") from None
        finally:
            # A job still queued behind busy threads (a 504, a cancelled request) is cancelled: it
            # never runs. A running thread cannot be stopped: its slot stays taken until the
            # function really returns, so hung functions end in 503s, not an unbounded pile of threads.
            if work is None or work.done() or work.cancel():
                self._release()
            else:
                loop = asyncio.get_running_loop()
                work.add_done_callback(lambda _: _call_soon_threadsafe(loop, self._release))


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: the server it counted for has stopped
        loop.call_soon_threadsafe(callback)


class RateLimits:
    """Token buckets per (tenant, function): ``rate`` calls per second on average, in bursts
    of up to ``max(rate, 1)``. Kept per process: with ``--workers N`` a tenant may reach N
    times the rate (README, "Limits"). ``clock`` is a parameter so tests need not wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str | None, str], tuple[float, float]] = {}  # -> (tokens, at)

    def wait(self, tenant: str | None, function: str, rate: float) -> float:
        """Take one call from the bucket: 0.0 if it may run now, else the seconds until one may."""
        now = self.clock()
        capacity = max(rate, 1.0)
        tokens, at = self._buckets.get((tenant, function), (capacity, now))
        tokens = min(capacity, tokens + (now - at) * rate)
        if tokens >= 1:
            self._buckets[(tenant, function)] = (tokens - 1, now)
            return 0.0
        self._buckets[(tenant, function)] = (tokens, now)
        return (1 - tokens) / rate


#### HTTP

_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_JSON = b"application/json"
_CHALLENGE = ((b"www-authenticate", b"STT1"),)


class AccessLog:
    """One line per request, handed to the ``gateway.access`` logger in batches.

    A log record per request costs more than dispatching a small call (about 25 us against
    a 60 us request), so lines are stamped when they happen and written at most
    FLUSH_SECONDS later, nginx-style, as one record per batch.
    """

    FLUSH_SECONDS = 0.25

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def add(self, request_id: bytes, tenant: str, function: str, status: int, seconds: float) -> None:
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        if not self._lines:
            asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
        self._lines.append(
            f"{self._stamp},{int(now % 1 * 1000):03d} INFO gateway.access: {request_id.decode()} "
            f"tenant={tenant} func={function} status={status} {seconds * 1000:.2f}ms"
        )

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            access_log.info("\n".join(lines))


class Gateway:
    """The ASGI app: ``/rest`` goes straight to the dispatcher (the hot path, pure ASGI), and so
    do the lifespan and GET /healthz; everything else (OpenAPI, the console) is a small Starlette app."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        security: Security | Callable[[ASGIApp], ASGIApp] | None = None,
        modules: str | os.PathLike[str] | None = None,
    ):
        self.settings = settings
        self.catalog = catalog  # replaced whole on every reload: one assignment, never edited
        self.modules = None if modules is None else Path(modules)
        self.loaded_at = time.time()  # what the watcher compares mtimes with (create_app sets it exactly)
        self.reloads = 0
        self.dispatcher = Dispatcher(settings)
        self.limits = RateLimits()
        self.access = AccessLog()
        self.exit_grace: float | None = None  # the CLI's processes only: see _end_process_after
        self.security = security if isinstance(security, Security) else None
        self.metrics = Metrics(self) if settings.metrics else None
        wrap = security.wrap if isinstance(security, Security) else security
        self.secured = wrap is not None  # /rest needs a token: what /openapi.json tells clients
        self.rest: ASGIApp = wrap(self._rest) if wrap else self._rest
        self._site: ASGIApp | None = None  # built on the first request that needs it: see site
        self._openapi_built: tuple[Catalog | None, bytes] = (None, b"")  # see _openapi

    @property
    def site(self) -> ASGIApp:
        """Starlette, for OpenAPI, the console, its files, metrics and every error outside /rest.

        Built, and imported, on the first request that needs it, not at start: Starlette is about
        1.8 MB of an idle process that only ever answers /rest and /healthz.
        """
        if self._site is None:
            from starlette.applications import Starlette
            from starlette.exceptions import HTTPException
            from starlette.routing import Mount, Route
            from starlette.staticfiles import StaticFiles

            self._site = Starlette(
                routes=[
                    Route("/healthz", self._healthz),
                    Route("/openapi.json", self._openapi),
                    Route("/console", self._console),
                    *([Route("/metrics", self._metrics)] if self.metrics else []),
                    Mount("/static", _with_console_headers(StaticFiles)(directory=STATIC, check_dir=False)),
                ],
                exception_handlers={
                    HTTPException: self._http_error,
                    Exception: self._internal_error,  # a bug of ours: JSON like every error, traceback to the log
                },  # type: ignore[dict-item]
            )
            # "/healthz/" was a bare 307 to an http:// URL (wrong behind a TLS proxy), outside the
            # JSON error model: a path that is not one is a JSON 404 like any other.
            self._site.router.redirect_slashes = False
        return self._site

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/rest" or path.startswith("/rest/")):
            scope[REQUEST_ID_KEY] = _request_id(scope)
            # Read up to the largest limit of any function, for every path alike: a limit that
            # depended on the URL would tell unauthenticated callers which functions exist.
            scope[MAX_BODY_KEY] = max(self.settings.max_body, self.catalog.max_body)
            started = time.perf_counter()
            if self.metrics is None:
                await self.rest(scope, receive, send)
            else:
                await self.metrics.track(self.rest, scope, receive, send)
            # One line per request, the ones the security layer answered itself (401, 413, 429,
            # 503) too: their ids were in no log line but a rate-limited warning, if that.
            if (refused := scope.get(REFUSED_KEY)) is not None and access_log.isEnabledFor(logging.INFO):
                request_id, tenant = scope[REQUEST_ID_KEY], scope.get(TENANT_KEY, "-")
                self.access.add(request_id, tenant, "-", refused, time.perf_counter() - started)
        elif scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)
        elif scope["type"] == "http" and path == "/healthz" and scope["method"] in ("GET", "HEAD"):
            await self._healthz_raw(scope, send)
        else:
            if scope["type"] == "http":
                # Starlette answers a malformed or unsatisfiable Range on a file with a text/plain
                # 400 or 416, outside the JSON error model. RFC 9110 lets a server ignore Range,
                # and the console's files are a few KB: they are always sent whole.
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"range"]
            await self.site(scope, receive, send)

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        """The ASGI lifespan protocol around _lifespan, as Starlette's router runs it."""
        await receive()  # lifespan.startup
        started = False
        try:
            async with self._lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException as exc:
            failed = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            await send({"type": failed, "message": repr(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    @contextlib.asynccontextmanager
    async def _lifespan(self) -> typing.AsyncIterator[None]:
        tasks = []
        if self.security is not None and (reason := await self.security.unavailable()) is not None:
            # Serving anyway (the store may come up later), but not in silence: /healthz says so too.
            log.warning("%s: calls are refused (503) until it answers", reason)
        if self.security is not None and self.settings.rotate_days > 0:
            tasks.append(asyncio.create_task(self._rotate_by_policy(self.security.keystore)))
        if self.settings.reload and self.modules is not None:
            tasks.append(asyncio.create_task(watch_modules(self, self.modules)))
        yield
        for task in tasks:
            task.cancel()
        self.dispatcher.close()
        self.access.flush()
        if self.exit_grace is not None:
            _end_process_after(self.exit_grace)

    async def _rotate_by_policy(self, keystore: Keystore, every: float = 3600.0, retry: float = 60.0) -> None:
        """Rotation policy (PROTOCOL.md 5.1): hourly, a pending successor for old credentials.

        A failed pass (keystore locked or read-only, Redis down) is logged and tried again
        ``retry`` seconds later: one bad moment must not end the policy for the process's life.
        """
        while True:
            try:
                made = await asyncio.to_thread(keystore.rotate, older_than_days=self.settings.rotate_days)
            except Exception as exc:
                # A store that is locked, read-only, full or unreachable is expected now and then;
                # anything else is a bug: it gets its traceback, and the policy still goes on.
                expected = isinstance(exc, (sqlite3.Error, OSError))
                log.error("rotation policy failed, trying again in %g s: %s", retry, exc, exc_info=not expected)
                await asyncio.sleep(retry)
                continue
            for tid, old, new in made:
                log.info("rotation policy: tenant %s kid %s gets successor %s", tid, old, new)
            await asyncio.sleep(every)

    async def _rest(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = scope[REQUEST_ID_KEY]
        content_type = b""
        content_length = None
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                content_length = value
        func_name = None
        try:
            func_name, var1 = _split_rest_path(scope)
            if func_name is not None:  # else _handle names it from the body's funcName
                scope["gateway.function"] = func_name
            result = await self._handle(scope, receive, func_name, var1, content_type, content_length)
            status, body = 200, msgspec.json.encode({"results": result, "valid": True})
            # A function's result only: the catalog (GET /rest/) is the gateway's own, and it grows
            # with the modules, not with a call; limited too, it broke the console and --catalog.
            if len(body) > self.settings.max_result and "gateway.function" in scope:
                raise GatewayError(500, "internal_error", f"the result is over {self.settings.max_result} bytes")
            extra: tuple[tuple[bytes, bytes], ...] = ()
        except GatewayError as exc:
            status, body, extra = exc.status, error_body(exc.code, exc.message), exc.headers
            if status >= 500:
                log.error("request %s: %s %s", request_id.decode(), exc.code, exc.message)
        except BaseException as exc:
            # SystemExit (sys.exit, argparse), KeyboardInterrupt or a CancelledError the function
            # raised itself fail the call like any exception. A CancelledError while this request's
            # task is being cancelled is the server stopping, its grace period over: the call is
            # answered anyway, signed and with its id. Let through, it was uvicorn's bare text 500.
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                log.warning("request %s: `%s` cut off: the gateway is stopping", request_id.decode(), func_name)
                message = "the gateway is stopping: this call was cut off and may have run; check before retrying"
                status, body, extra = 503, error_body("overloaded", message), ()
                task = asyncio.current_task()
                while task is not None and task.cancelling():
                    task.uncancel()  # answered: nothing of the cancellation is left to act on
            else:
                log.exception("request %s: `%s` raised", request_id.decode(), func_name)
                status, body, extra = 500, error_body("internal_error", "the function failed; see the server log"), ()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", _JSON),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        if access_log.isEnabledFor(logging.INFO):
            self.access.add(
                request_id,
                scope.get(TENANT_KEY, "-"),
                scope.get("gateway.function", "-"),
                status,
                time.perf_counter() - started,
            )

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        func_name: str | None,
        var1: str | None,
        content_type: bytes,
        content_length: bytes | None,
    ) -> Any:
        method = scope["method"]
        caller = scope.get(CALLER_KEY)
        if func_name is None and method in ("GET", "HEAD"):  # HTTP sends no body for HEAD
            return self.describe(caller)
        if method != "POST":
            allow = b"GET, HEAD, POST" if func_name is None else b"POST"
            raise GatewayError(405, "method_not_allowed", f"use {allow.decode()}", ((b"allow", allow),))
        body = scope[BODY_KEY] if BODY_KEY in scope else await read_body(receive, content_length, scope[MAX_BODY_KEY])
        if body and content_type.split(b";", 1)[0].strip().lower() != _JSON:
            raise GatewayError(415, "unsupported_media_type", "send the arguments as application/json")
        if func_name is None:
            named = decode_object(body).get("funcName")
            if not isinstance(named, str):
                raise GatewayError(400, "bad_json", "POST /rest/ needs the function's name in `funcName`")
            func_name = scope["gateway.function"] = named
        fn = self.catalog.functions.get(func_name)
        if fn is None or not fn.allows(caller):
            raise GatewayError(404, "not_found", "no such function")
        max_body = self.settings.max_body if fn.max_body is None else fn.max_body
        if len(body) > max_body:
            raise GatewayError(413, "too_large", f"`{fn.name}` accepts at most {max_body} bytes")
        rate = self.settings.rate if fn.rate is None else fn.rate
        if rate and (wait := self.limits.wait(caller and caller.tenant, fn.name, rate)):
            raise GatewayError(
                429,
                "rate_limited",
                f"`{fn.name}` allows {rate:g} call{'' if rate == 1 else 's'} per second; retry in {wait:.2g} s",
                ((b"retry-after", str(math.ceil(wait)).encode()),),
            )
        if fn.otp:
            try:
                passed = caller is not None and await asyncio.to_thread(caller.check_otp)
            except KeystoreUnavailable as exc:
                log.error("request %s: %s", scope[REQUEST_ID_KEY].decode(), exc)
                raise GatewayError(503, "overloaded", "key store unavailable") from None
            except OtpLocked as exc:  # the caller holds K, so saying why costs nothing and helps the owner
                wait = math.ceil(exc.retry_after)
                raise GatewayError(
                    429,
                    "throttled",
                    f"too many wrong authenticator codes; retry in {wait} s",
                    ((b"retry-after", str(wait).encode()),),
                ) from None
            if not passed:
                raise GatewayError(401, "unauthorized", "missing, invalid or expired token", _CHALLENGE)
        elif caller is not None and caller.otp is not None:
            # PROTOCOL.md 2: "otp" only when 6 applies. A code where none is asked for is not
            # ignored: the client misjudged what it calls, and a stray code should not travel.
            request_id = scope[REQUEST_ID_KEY].decode()
            log.warning("request %s: an authenticator code for `%s`, which needs none", request_id, fn.name)
            raise GatewayError(401, "unauthorized", "missing, invalid or expired token", _CHALLENGE)
        kwargs = bind(fn, body, var1, func_name)
        return await self.dispatcher.call(fn, kwargs)

    def describe(self, caller: Any) -> dict[str, Any]:
        """The catalog a tenant sees: only what it may call."""
        return {
            fn.name: {
                "doc": fn.doc,
                "var1": fn.url_var1,
                "arguments": msgspec.json.schema(fn.args_type, schema_hook=_schema_hook),
                "otp": fn.otp,
            }
            for fn in self.catalog.functions.values()
            if fn.allows(caller)
        }

    async def _health(self) -> tuple[int, dict[str, Any]]:
        """200 and "ok", or 503 and "unavailable" with the reason while a store fails and every
        call is refused (see Security.unavailable): a load balancer then stops sending calls here."""
        reason = None if self.security is None else await self.security.unavailable()
        return 200 if reason is None else 503, {
            "status": "ok" if reason is None else "unavailable",
            **({} if reason is None else {"reason": reason}),
            "functions": len(self.catalog.functions),
            "refused": [{"module": r.source, "reason": r.reason} for r in self.catalog.refused],
            # Only while an import hangs (it holds up every reload): else the answer is as documented.
            **({"loading": slow} if (slow := importing_slowly()) else {}),
        }

    async def _healthz(self, request: Any) -> Any:
        # __call__ answers GET and HEAD itself, so Starlette never calls this: its route is there
        # so that other methods get the JSON 405, not a 404.
        status, health = await self._health()
        return _json_response(request, health, status)

    async def _healthz_raw(self, scope: Scope, send: Send) -> None:
        """GET or HEAD /healthz without Starlette: probes poll it, and it is what a start waits for."""
        status, health = await self._health()
        body = msgspec.json.encode(health)
        headers = [
            (b"content-length", b"%d" % len(body)),
            (b"content-type", _JSON),
            (b"x-request-id", _request_id(scope)),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    async def _openapi(self, request: Any) -> Any:
        """Built once per catalog, in a thread: anyone may ask for it, and with thousands of
        modules one build takes a third of a second, which held every call up while it ran."""
        from starlette.responses import Response

        catalog, built = self._openapi_built
        if catalog is not self.catalog:
            catalog = self.catalog
            built = await asyncio.to_thread(lambda: msgspec.json.encode(openapi(catalog, secured=self.secured)))
            self._openapi_built = (catalog, built)
        headers = {"x-request-id": _request_id(request.scope).decode()}
        return Response(built, 200, headers, media_type="application/json")

    async def _metrics(self, request: Any) -> Any:
        from starlette.responses import Response

        assert self.metrics is not None
        body, content_type = await asyncio.to_thread(self.metrics.render)  # a SQLite count may block
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    async def _console(self, request: Any) -> Any:
        from starlette.responses import FileResponse

        return FileResponse(STATIC / "console.html", headers=CONSOLE_HEADERS)

    async def _internal_error(self, request: Any, exc: Exception) -> Any:
        request_id = _request_id(request.scope).decode()
        log.error("request %s: %s %s failed: %r (traceback follows)", request_id, request.method, request.url.path, exc)
        body = msgspec.json.decode(error_body("internal_error", "see the server log"))
        return _json_response(request, body, 500, {"x-request-id": request_id})

    async def _http_error(self, request: Any, exc: Any) -> Any:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        body = msgspec.json.decode(error_body(code, str(exc.detail)))
        return _json_response(request, body, exc.status_code, dict(exc.headers or {}))


def _json_response(request: Any, content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    headers = {"x-request-id": _request_id(request.scope).decode(), **(headers or {})}
    return Response(msgspec.json.encode(content), status, headers, media_type="application/json")


def _request_id(scope: Scope) -> bytes:
    """The client's (or load balancer's) X-Request-Id when it is safe to log, else a new one.

    New ids are a per-process random prefix and a counter: unique across workers and hosts
    without a getrandom system call per request (ids are labels for logs, not secrets).
    """
    for key, value in scope["headers"]:
        if key == b"x-request-id" and _SAFE_REQUEST_ID.fullmatch(value):
            return bytes(value)
    return b"%s%08x" % (_id_prefix[0], next(_id_counter))


_id_counter = itertools.count()
_id_prefix = [secrets.token_hex(4).encode()]
# A forked worker must not repeat its parent's ids.
os.register_at_fork(after_in_child=lambda: _id_prefix.__setitem__(0, secrets.token_hex(4).encode()))


def _being_cancelled() -> bool:
    """Has someone asked to cancel the running task? (asyncio.timeout takes its own request back.)"""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _split_rest_path(scope: Scope) -> tuple[str | None, str | None]:
    """``/rest[/<func>[/<var1>]][/]`` from the raw path, so an encoded ``/`` stays in var1."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    if raw != b"/rest" and not raw.startswith(b"/rest/"):  # "/%72est/add" is routed here by its decoded path
        raise GatewayError(404, "not_found", "no such function")
    parts = raw[len(b"/rest/") :].split(b"/") if len(raw) > 5 else []
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) > 2 or b"" in parts:
        raise GatewayError(404, "not_found", "no such function")
    # Strict: "%FF" is no character; replaced by U+FFFD it reached the function as if sent.
    try:
        func_name = unquote(parts[0].decode("latin-1"), errors="strict") if parts else None
    except UnicodeDecodeError:
        raise GatewayError(404, "not_found", "no such function") from None
    try:
        var1 = unquote(parts[1].decode("latin-1"), errors="strict") if len(parts) > 1 else None
    except UnicodeDecodeError:
        raise GatewayError(422, "invalid_arguments", "the URL's argument is not UTF-8 once percent-decoded") from None
    return func_name, var1


async def read_body(receive: Receive, content_length: bytes | None, limit: int) -> bytes:
    """Read the request body, refusing with 413 before reading past ``limit``."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise GatewayError(400, "bad_json", "Content-Length is not a number") from None
        if declared > limit:
            raise GatewayError(413, "too_large", f"the body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError(400, "bad_json", "the client went away before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, "too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def openapi(catalog: Catalog, secured: bool = True) -> dict[str, Any]:
    """OpenAPI 3.1, one operation per function, schemas from the type hints via msgspec.

    It lists every status the endpoint can answer, with the error body and the headers each
    one carries, so a client (or a schema-driven tester) can rely on it. ``secured``: STT1 is
    on, so calls need a token and answers past the token check are signed.

    Anyone may read it, so a function restricted to some tenants is left out: to everyone
    else it must look exactly like a missing one (their 404 says nothing more). Its tenants
    find it, schema and all, in their own catalog (``GET /rest/``).
    """
    functions = sorted((fn for fn in catalog.functions.values() if fn.tenants is None), key=lambda fn: fn.name)
    schemas, components = _schemas([fn.args_type for fn in functions], [fn.returns for fn in functions])
    for schema in schemas[: len(functions)]:
        components[schema["$ref"].rsplit("/", 1)[1]]["additionalProperties"] = False
    # Without STT1 nothing checks tokens: no 401 (and a 429 is only ever a function's rate).
    statuses = {status: name for status, (name, _, _) in _ERRORS.items() if secured or status != 401}
    paths = {
        f"/rest/{fn.name}/": {
            "post": {
                "operationId": fn.name,
                "summary": fn.doc.split("\n", 1)[0] if fn.doc else fn.name,
                "description": "\n\n".join(
                    filter(None, [fn.doc, fn.url_var1 and f"`POST /rest/{fn.name}/{{{fn.url_var1}}}` binds "
                                  f"`{fn.url_var1}` from the URL."])
                ),
                # An empty body is `{}`: it is only optional when every argument has a default.
                "requestBody": {
                    "required": bool(components[args["$ref"].rsplit("/", 1)[1]].get("required")),
                    "content": {"application/json": {"schema": args}},
                },
                "responses": {
                    "200": {
                        "description": "the function's result",
                        "headers": _headers(secured, signed=True),
                        "content": {"application/json": {"schema": _result_schema(ret)}},
                    },
                    **{str(status): {"$ref": f"#/components/responses/{name}"} for status, name in statuses.items()},
                },
            }
        }
        for fn, args, ret in zip(functions, schemas[: len(functions)], schemas[len(functions) :], strict=True)
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "gateway", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {name: _error_response(status, secured) for status, name in statuses.items()},
        },
    }
    if secured:
        document["security"] = [{"STT1": []}]
        document["components"]["securitySchemes"] = {
            "STT1": {
                "type": "http",
                "scheme": "STT1",
                "description": "`Authorization: STT1 <token>`: a single-use PASETO v3.local token bound to this "
                "request's method, target, content type and body (PROTOCOL.md). Answers past the token check "
                "carry the gateway's token in `STT1-Response`.",
            }
        }
    return document


# Every error a function's endpoint can answer: (name in components.responses, codes, when).
_ERRORS: dict[int, tuple[str, tuple[str, ...], str]] = {
    400: ("BadRequest", ("bad_json", "bad_request"), "the body is not a JSON object, or the request not valid HTTP"),
    401: ("Unauthorized", ("unauthorized",), "any token failure, or a missing, wrong or reused second factor"),
    404: ("NotFound", ("not_found",), "no such function, or one this tenant may not call"),
    408: ("RequestTimeout", ("timeout",), "the request line and headers were too slow; the connection is closed"),
    413: ("TooLarge", ("too_large",), "the body is over the largest limit (unread), or over the function's"),
    415: ("UnsupportedMediaType", ("unsupported_media_type",), "a body that is not application/json"),
    422: ("InvalidArguments", ("invalid_arguments",), "binding or validation failed; the message names the field"),
    429: (
        "TooManyRequests",
        ("throttled", "rate_limited"),
        "too many failed calls from this address or for this tenant, too many wrong authenticator codes,"
        " or over the function's rate",
    ),
    431: ("HeadTooLarge", ("too_large",), "the request line and headers are too large; the connection is closed"),
    500: ("InternalError", ("internal_error",), "the function raised, or its result cannot be sent"),
    503: ("Overloaded", ("overloaded",), "too many calls in progress, or the key or replay store is unavailable"),
    504: ("Timeout", ("timeout",), "the call exceeded its timeout"),
}
# Refused by the HTTP protocol itself, before any request exists: no request id, no signature.
_RAW = {408, 431}
# Signed or not: a bad token, a body over the largest limit, a throttled address or an
# unavailable keystore are answered before the token is verified (PROTOCOL.md 3.11); a replay,
# a missing second factor, a function's own limit or rate, a full concurrency limit after it.
_SOMETIMES_SIGNED = {401, 413, 429, 503}
# A request that is not HTTP at all (bad_request) is refused by the protocol itself, like 408
# and 431: no request id, no token. A bad_json 400 has both.
_SOMETIMES_RAW = {400}


def _headers(secured: bool, signed: bool) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "X-Request-Id": {
            "description": "the id of this request in the server log: the caller's own when it is safe to log",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
        }
    }
    if secured and signed:
        headers["STT1-Response"] = {
            "description": "the gateway's token over this status, content type and body, bound to the request's",
            "required": True,
            "schema": {"type": "string", "pattern": "^v3\\.local\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$"},
        }
    return headers


def _error_response(status: int, secured: bool) -> dict[str, Any]:
    """A response object for one error status: its body, ``{"valid": false, "error": {...}}``."""
    _, codes, when = _ERRORS[status]
    if status == 429 and not secured:
        codes = ("rate_limited",)  # nothing counts failed tokens
    headers = {} if status in _RAW else _headers(secured, signed=True)
    if status in _SOMETIMES_SIGNED and "STT1-Response" in headers:
        headers["STT1-Response"]["required"] = False
    if status in _SOMETIMES_RAW:
        for header in headers.values():
            header["required"] = False
    if status == 401:
        headers["WWW-Authenticate"] = {"required": True, "schema": {"const": "STT1"}}
    elif status == 429:
        headers["Retry-After"] = {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    code = {"const": codes[0]} if len(codes) == 1 else {"enum": list(codes)}
    detail = {"code": code, "message": {"type": "string"}}
    error = {"type": "object", "properties": detail, "required": ["code", "message"], "additionalProperties": False}
    body = {
        "type": "object",
        "properties": {"valid": {"const": False}, "error": error},
        "required": ["valid", "error"],
        "additionalProperties": False,
    }
    response = {"description": when, "content": {"application/json": {"schema": body}}}
    return {**response, "headers": headers} if headers else response


def _schemas(args_types: list[Any], returns: list[Any]) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """The schemas of every function's arguments, then of its result, with their shared types.

    One call shares a type two functions use. msgspec names a type after its class, and after
    its module only when two classes share a name; for two generic aliases (``Page[Item]`` in
    two modules) both names are the same and it raises. Then each function gets its own
    components, prefixed with its name: longer, but /openapi.json still answers.
    """
    template = "#/components/schemas/{name}"
    try:
        schemas, components = msgspec.json.schema_components(
            args_types + returns, ref_template=template, schema_hook=_schema_hook
        )
    except KeyError:
        pass
    else:
        return _without_generations(schemas, components)
    args_schemas: list[dict[str, Any]] = []
    return_schemas: list[dict[str, Any]] = []
    merged: dict[str, Any] = {}
    for args_type, returned in zip(args_types, returns, strict=True):
        prefix = f"{args_type.__name__.removesuffix('_args')}."
        (args, ret), own = msgspec.json.schema_components(
            [args_type, returned], ref_template=f"#/components/schemas/{prefix}{{name}}", schema_hook=_schema_hook
        )
        args_schemas.append(args)
        return_schemas.append(ret)
        merged.update((prefix + name, schema) for name, schema in own.items())
    return (*args_schemas, *return_schemas), merged


def _without_generations(
    schemas: tuple[dict[str, Any], ...], components: dict[str, Any]
) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """Component names without the import generation (``_gw3.shop.Item`` is ``shop.Item``), so
    a reload does not rename them; kept where two generations' classes would take one name."""
    renamed = {name: re.sub(r"^_gw\d+\.", "", name) for name in components}
    if renamed == {name: name for name in components} or len(set(renamed.values())) < len(renamed):
        return schemas, components
    prefix = "#/components/schemas/"

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: prefix + renamed[value[len(prefix) :]]
                if key == "$ref" and isinstance(value, str) and value.startswith(prefix)
                else walk(value)
                for key, value in node.items()
            }
        return [walk(item) for item in node] if isinstance(node, list) else node

    return tuple(walk(s) for s in schemas), {renamed[name]: walk(s) for name, s in components.items()}


def _result_schema(results: dict[str, Any]) -> dict[str, Any]:
    """The 200 body around a function's result: written out, not a generic Result[T] struct,
    whose schema msgspec names the same for the same class name in two modules."""
    return {
        "type": "object",
        "properties": {"results": results, "valid": {"const": True}},
        "required": ["results", "valid"],
        "additionalProperties": False,
    }


def create_app(
    modules: str | os.PathLike[str] | None = "modules",
    *,
    settings: Settings | None = None,
    security: Security | Callable[[ASGIApp], ASGIApp] | None = None,
    **overrides: Any,
) -> Gateway:
    """Build the ASGI app for a folder of modules; for scripts and tests that embed the gateway.

    Secure by default: unless ``auth="off"``, every call needs an STT1 token checked against
    the keystore in ``settings.db`` (or the ``security`` given).
    """
    settings = dataclasses.replace(settings or Settings(), **overrides)
    if security is None and settings.auth != "off":
        security = build_security(settings)
    loaded_at = time.time()
    app = Gateway(settings, _load_in_thread(modules, settings.packages).result(), security, modules)
    app.loaded_at = loaded_at
    return app


def open_keystore(settings: Settings) -> Keystore:
    """SQLite at --db, or with --keystore redis://... the one every host shares (same master key)."""
    if settings.keystore:
        if not settings.keystore.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"unknown keystore {settings.keystore!r}: use redis://host:port/db, or none for SQLite")
        return RedisKeystore(settings.keystore)
    return Keystore(settings.db)


def build_security(settings: Settings) -> Security:
    keystore = open_keystore(settings)
    if settings.keystore and settings.replay == "memory":
        # Allowed (one host may keep its keystore in Redis), but a shared keystore usually means
        # several hosts, and each in-memory store knows only the tokens its own host has seen.
        log.warning(
            "--keystore %s is shared but --replay memory is not: with several hosts, a token used on one "
            "can be replayed once on each other host within 45 s; give them --replay redis://...",
            redacted_url(settings.keystore),
        )
    try:
        replay = open_replay_store(settings.replay, settings.db)
    except sqlite3.Error as exc:  # sqlite's own words name no file
        keystore.close()
        raise sqlite3.Error(
            f"cannot open the replay store (--replay {redacted_url(settings.replay)}, keystore {settings.db}): {exc}"
        ) from None
    return Security(keystore, replay, settings.audience)


#### Metrics


class Metrics:
    """``GET /metrics`` in Prometheus text format (``--metrics``), through prometheus_client.

    With ``--workers N`` the numbers must add up over every worker, whichever one answers the
    scrape: prometheus_client's multiprocess mode does that through files in
    PROMETHEUS_MULTIPROC_DIR (``main`` sets one up). Labels only ever take bounded values:
    functions of the catalog (else "-"), verified tenants (else "-"), statuses, and
    security.FAILURE_REASONS, so no request can add a series.
    """

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

    def __init__(self, gateway: Gateway) -> None:
        import prometheus_client as prom

        self.gateway = gateway
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # One registry per app (tests build many); in multiprocess mode values live in files.
        self.registry = None if self.multiprocess else prom.CollectorRegistry()
        kw: dict[str, Any] = {"registry": self.registry}
        self.requests = prom.Counter(
            "gateway_requests", "Answers under /rest, by function, status and verified tenant",
            ["function", "status", "tenant"], **kw,
        )  # fmt: skip
        self.latency = prom.Histogram(
            "gateway_request_seconds", "Time from request to answer under /rest, by function", ["function"],
            buckets=self.BUCKETS, **kw,
        )  # fmt: skip
        self.token_failures = prom.Counter(
            "gateway_token_failures", "Requests refused before their call, by reason", ["reason"], **kw
        )
        self.reloads = prom.Counter("gateway_reloads", "Reloads of the modules folder since start", **kw)
        last = {**kw, "multiprocess_mode": "mostrecent"}
        self.functions = prom.Gauge("gateway_functions", "Functions served", **last)
        self.refused = prom.Gauge("gateway_refused_modules", "Modules refused by the last load", **last)
        self.replay_entries = prom.Gauge(
            "gateway_replay_store_entries", "Token ids remembered by the replay store (memory, SQLite)", **last
        )
        for reason in FAILURE_REASONS:  # every reason present from the start, at 0
            self.token_failures.labels(reason)
        if gateway.security is not None:
            gateway.security.on_failure = lambda reason: self.token_failures.labels(reason).inc()

    async def track(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500  # what the server answers if the app fails before it does

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            name = scope.get("gateway.function")  # set by _rest
            if name is None:  # refused before _rest ran: the name the URL gives, if any
                with contextlib.suppress(GatewayError):
                    name = _split_rest_path(scope)[0]
            function = name if name in self.gateway.catalog.functions else "-"
            self.requests.labels(function, str(status), scope.get(TENANT_KEY, "-")).inc()
            self.latency.labels(function).observe(time.perf_counter() - started)

    def render(self) -> tuple[bytes, str]:
        import prometheus_client as prom
        from prometheus_client import multiprocess

        catalog = self.gateway.catalog
        self.functions.set(len(catalog.functions))
        self.refused.set(len(catalog.refused))
        store = self.gateway.security.replay if self.gateway.security is not None else None
        if store is not None and hasattr(store, "__len__"):  # Redis: use a Redis exporter
            self.replay_entries.set(len(store))
        registry = self.registry
        if registry is None:
            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


#### Hot reload


WATCH_DELAY = 0.5  # seconds: start-up first; the watcher's import and set-up come after
FOLDER_CHECK = 0.5  # seconds between checks that the modules folder is still the one watched


async def watch_modules(gateway: Gateway, root: Path) -> None:
    """Swap in a new catalog whenever files under ``root`` change, for as long as it runs.

    Only the changed modules are imported again (in a thread: a slow import never stalls
    requests); a changed helper (a file or folder starting with ``_``) may be imported by any
    module, so it reloads them all. The new catalog replaces the old in one assignment, so a
    request in flight finishes on the function it started with.

    The watcher starts WATCH_DELAY after the app, so start-up serves sooner; files saved
    since the modules were loaded are found by their mtimes and reloaded then, so none is missed.
    It is one thread blocked in watchfiles' synchronous watch, which hands each batch of changes
    to the event loop and waits for it: awatch runs the same call through anyio's worker threads
    and kept a thread more alive for the whole life of the process.

    The folder itself may be replaced (a symlink re-pointed at a new release, ``mv modules old
    && mkdir modules``, ``rm -r``): a watch stays on the directory it started on, so the old
    tree's saves were taken for the new one's and the new one was never seen. So every
    FOLDER_CHECK (one stat) and at every change the watcher checks what ``root`` names; when it
    is another folder, it watches that one and loads it whole, once the watch is up so no save
    is missed. While there is none, the previous catalog goes on serving.
    """
    await asyncio.sleep(WATCH_DELAY)
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def reload(parts: set[tuple[str, ...]] | None) -> None:
        try:
            asyncio.run_coroutine_threadsafe(_reload(gateway, root, parts), loop).result()
        except Exception:  # one batch that fails must not end live reload for good
            if not stop.is_set():
                log.exception("live reload of %s failed; still watching", _shown_parts(root, parts))

    def watch() -> None:
        try:
            import watchfiles

            folder, resolved, replaced = _folder_id(root), root.resolve(), False
            missed = {f.relative_to(resolved).parts for f in resolved.rglob("*.py") if _mtime(f) >= gateway.loaded_at}
            if missed:
                reload(missed)
            while True:
                batches = watchfiles.watch(
                    resolved, debounce=50, step=20, stop_event=stop, recursive=True,
                    rust_timeout=round(FOLDER_CHECK * 1000), yield_on_timeout=True,
                )  # fmt: skip
                with contextlib.closing(batches):
                    for changes in batches:  # an empty batch every FOLDER_CHECK
                        gone = (watchfiles.Change.deleted, str(resolved)) in changes  # and maybe made anew
                        if gone or _folder_id(root) != folder:
                            break  # a new folder, or none: what changed here is no longer served
                        if replaced:
                            replaced = False
                            reload(None)
                        elif changes:
                            reload({Path(path).relative_to(resolved).parts for _, path in changes})
                    else:
                        return  # stopped
                while (folder := _folder_id(root)) is None:
                    if stop.wait(FOLDER_CHECK):
                        return
                resolved, replaced = root.resolve(), True
                log.info("the modules folder %s is another one now (%s): watching it", root, resolved)
        except Exception:
            if not stop.is_set():
                log.exception("live reload stopped")

    threading.Thread(target=watch, name="gateway-watcher", daemon=True).start()
    try:
        await asyncio.Event().wait()  # until the lifespan cancels this task at shutdown
    finally:
        stop.set()  # watch() sees it within a step (20 ms)


def _folder_id(folder: Path) -> tuple[int, int] | None:
    """The directory ``folder`` names now (through a symlink), None while there is none."""
    try:
        info = folder.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _shown_parts(root: Path, parts: set[tuple[str, ...]] | None) -> str:
    return f"all of {root} (another folder now)" if parts is None else ", ".join("/".join(p) for p in sorted(parts))


def _mtime(file: Path) -> float:
    """When it was last saved; 0 for what cannot be read, such as the dangling symlink Emacs
    leaves as a lock file (``.#a.py -> user@host.pid:boot``)."""
    try:
        return file.stat().st_mtime
    except OSError:
        return 0.0


def _is_or_was_folder(path: Path, catalog: Catalog) -> bool:
    """A folder moved into or out of the modules comes as one change, for the folder alone: it
    reloads everything when it is a folder now, or when modules served came from inside it."""
    if path.is_dir():
        return True
    inside = f"{path}{os.sep}"
    sources = itertools.chain((fn.source for fn in catalog.functions.values()), (r.source for r in catalog.refused))
    return any(source.startswith(inside) for source in sources)


async def _reload(gateway: Gateway, root: Path, parts: set[tuple[str, ...]] | None) -> None:
    """Load what these changed files (relative to ``root``) serve; None: the whole folder."""
    everything = parts is None
    parts = {p for p in parts or () if p and not any(s.startswith(".") for s in p)}
    folders = {p for p in parts if not p[-1].endswith(".py") and _is_or_was_folder(root.joinpath(*p), gateway.catalog)}
    parts = {p for p in parts if p[-1].endswith(".py")} | folders
    if not parts and not everything:
        return
    started = time.perf_counter()
    for p in parts - folders:
        # A pyc is trusted while the source's size and whole-second mtime match: two saves
        # within a second with the same size would import the old code. Drop it.
        with contextlib.suppress(OSError, ValueError):
            os.unlink(importlib.util.cache_from_source(str(root.resolve().joinpath(*p))))
    previous = gateway.catalog
    if everything or folders or any(s.startswith("_") for p in parts for s in p):
        loading = _load_in_thread(root, gateway.settings.packages, previous=previous)
    else:
        changed = {str(root.joinpath(*p)) for p in parts}
        loading = _load_in_thread(root, previous=previous, changed=changed)
    catalog = await asyncio.wrap_future(loading)
    gateway.catalog = catalog
    gateway.reloads += 1
    if gateway.metrics is not None:
        gateway.metrics.reloads.inc()
    log.info(
        "reloaded after changes to %s, in %.0f ms: %s, %d refused",  # a change may be a deletion
        _shown_parts(root, None if everything else parts), (time.perf_counter() - started) * 1000,
        _count(len(catalog.functions), "function"), len(catalog.refused),
    )  # fmt: skip


#### Serving

EXIT_GRACE = 2.0  # seconds a stopped gateway process may take to exit before it is ended


def _end_process_after(seconds: float) -> None:
    """End this process ``seconds`` from now unless it has exited by then.

    Python's exit waits for every non-daemon thread: a sync function that hangs (a thread
    cannot be killed, and the thread pool is joined at exit) or a thread a module started
    would keep a gateway that has drained and stopped alive until SIGKILL. Only the CLI's
    processes arm this (``exit_grace``); a script that embeds the gateway owns its process.
    """

    def end() -> None:
        time.sleep(seconds)
        running = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        log.warning("exiting with %d thread(s) still running: %s", len(running), ", ".join(running))
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=end, name="gateway-exit", daemon=True).start()


def serve(app: Gateway, host: str | None = None, port: int | None = None) -> None:
    """Serve an app in this process until interrupted; exits with STARTUP_FAILURE if it cannot listen."""
    settings = app.settings
    port = settings.port if port is None else port
    if port != settings.port and not settings.public_url and app.secured:
        # Tokens name the origin in the settings (PROTOCOL.md 3): listening elsewhere, every
        # client whose credential says this port would be refused, and nothing would say why.
        log.warning(
            "serving on port %d, but tokens are bound to %s: pass port=%d to create_app (or public_url)",
            port,
            settings.audience,
            port,
        )
    _serve_on(app, _listen(host or settings.host, port))


def _serve_on(app: Gateway, sock: socket.socket) -> None:
    import uvicorn

    config = _uvicorn_config(app, app.settings)
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains, then re-raises the signal it caught: make SIGTERM end as cleanly as Ctrl+C.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        if hasattr(signal, "SIGHUP"):
            # Unhandled, SIGHUP (a closed terminal, a log rotation hook) killed the process at once,
            # calls in flight and all; with --workers it restarts the workers one by one. One
            # process cannot restart itself: it stops as on SIGTERM, draining its calls first.
            signal.signal(signal.SIGHUP, lambda sig, frame: server.handle_exit(signal.SIGTERM, frame))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass


def _uvicorn_config(app: Any, settings: Settings, **extra: Any) -> Any:
    import uvicorn

    # By name only for --workers (other processes import it); in this process, the function itself.
    extra.setdefault("http", "gateway_app:http_protocol" if extra.get("workers", 1) > 1 else http_protocol)
    return uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=False,
        server_header=False,  # "server: uvicorn" tells a scanner what to try, and costs every answer a header
        lifespan="on",
        timeout_graceful_shutdown=10,
        **extra,
    )


HEAD_LIMIT = 64 * 1024  # bytes of request line and headers; nginx allows 32 KiB by default
HEAD_TIMEOUT = 10.0  # seconds from a connection (or a request's first byte) to the end of its headers
BODY_TIMEOUT = 30.0  # seconds a request body may go without a byte arriving


def http_protocol(
    *, head_limit: int = HEAD_LIMIT, head_timeout: float = HEAD_TIMEOUT, body_timeout: float = BODY_TIMEOUT, **kw: Any
) -> Any:
    """uvicorn's HTTP protocol (httptools) with the limits it leaves out; uvicorn calls this per connection.

    uvicorn reads a request head of any size and waits for it for ever: one client could hold
    memory without bound, and idle or trickling connections (slowloris) stay open until the
    file descriptors run out. Here a head over ``head_limit`` bytes is answered 431 and one not
    complete ``head_timeout`` s after the connection opened (or the request began) 408, both
    JSON, and the connection closed; a body that goes ``body_timeout`` s without a byte is
    dropped, which the call sees as a disconnect. Tests pass small limits with functools.partial.
    """
    protocol = _guarded_http()(**kw)
    protocol.limits = (head_limit, head_timeout, body_timeout)
    return protocol


@functools.cache
def _guarded_http() -> type:
    import http

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttp(HttpToolsProtocol):  # type: ignore[misc]
        # Deadlines, not timers: re-arming a timer three times per request cost more than the
        # call itself (about 15% of the req/s of a small call). Each phase stores the loop time
        # it must end by, and one sweep per server (see _sweep_soon) enforces them.
        limits = (HEAD_LIMIT, HEAD_TIMEOUT, BODY_TIMEOUT)
        _head = 0  # bytes of the request head received so far; -1 once it is complete
        _reading = 0  # bytes of the read being parsed
        _too_large = False
        _phase = ""  # what the client owes: "head", "body", or "" (a call runs, or keep-alive)
        _deadline = math.inf  # loop time by which it must have arrived

        def connection_made(self, transport: Any) -> None:
            super().connection_made(_CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
            self._expect("head", self.limits[1])
            _sweep_soon(self)

        def data_received(self, data: bytes) -> None:
            self._reading = len(data)
            if self._head >= 0:
                self._head += len(data)
            elif not self._phase and (self.cycle is None or self.cycle.response_complete):
                # Between requests, whatever comes starts the next head's deadline. Bare CRLFs
                # begin no message yet cancel uvicorn's keep-alive timer: without this, one every
                # few seconds would hold the connection for ever.
                self._expect("head", self.limits[1])
            super().data_received(data)
            if (self._too_large or self._head > self.limits[0]) and not self.transport.is_closing():
                self._refuse(431, "too_large", f"the request head is over {self.limits[0]} bytes")

        def on_message_begin(self) -> None:
            if self._too_large:
                return
            self._head = 0
            self._expect("head", self.limits[1])
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            # A head that began in this read (the count was reset after it was added) is not
            # counted above; it is at most this read, so only a longer read needs counting, exactly.
            if self._head or self._reading > self.limits[0]:
                size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
                self._too_large = self._too_large or size > self.limits[0]
            if self._too_large:
                return
            self._head = -1
            self._expect("body", self.limits[2])
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._too_large:
                self._deadline = self.loop.time() + self.limits[2]
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._too_large:
                self._phase, self._deadline = "", math.inf
                super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            """Not HTTP at all (httptools could not parse it): uvicorn's answer is text/plain."""
            self._refuse(400, "bad_request", "the request is not valid HTTP/1.1")

        def _expect(self, phase: str, seconds: float) -> None:
            self._phase, self._deadline = phase, self.loop.time() + seconds

        def expired(self) -> None:
            """The sweep found this connection's deadline passed."""
            phase, self._phase, self._deadline = self._phase, "", math.inf
            if self.transport.is_closing():
                return
            if phase == "head":
                self._refuse(408, "timeout", f"the request head did not arrive within {self.limits[1]:g} s")
            elif phase == "body":
                log.info("closed a connection whose request body stalled for %g s", self.limits[2])
                self.transport.close()

        def _refuse(self, status: int, code: str, message: str) -> None:
            body = error_body(code, message)
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, http.HTTPStatus(status).phrase.encode(), len(body), body)
            )
            self.transport.close()
            self._phase, self._deadline = "", math.inf

    return GuardedHttp


class _CorkedTransport:
    """A socket transport that sends what one loop step wrote as one write.

    uvicorn writes a response's head and its body separately: two system calls, two TCP
    segments, and a client that wakes up twice to read one answer. Side by side under wrk on
    loopback (two runs each, means), joining them took the gateway from 19.5k to 22.5k req/s
    with security off and from 5.1k to 7.05k with STT1: the second wake-up cost more than the
    whole security check.
    Everything written in one loop step goes out at its end (or at once past CORK_LIMIT
    bytes, or before a close), so a streamed response is delayed by one loop step at most.
    """

    __slots__ = ("_held", "_loop", "_transport")
    CORK_LIMIT = 64 * 1024

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._held += data
        if len(self._held) > self.CORK_LIMIT:
            self.flush()

    def flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, set_protocol, ...
        return getattr(self._transport, name)


def _sweep_soon(protocol: Any) -> None:
    """Check every open connection's deadline a few times per shortest limit (at most every
    0.25 s), for as long as the server has connections: one timer per server, not per request."""
    state = protocol.server_state
    if getattr(state, "gateway_sweeping", False):
        return
    state.gateway_sweeping = True
    loop = protocol.loop
    every = min(1.0, *protocol.limits[1:]) / 4

    def sweep() -> None:
        now = loop.time()
        for connection in list(state.connections):
            if now >= getattr(connection, "_deadline", math.inf):
                connection.expired()
        if state.connections:
            loop.call_later(every, sweep)
        else:
            state.gateway_sweeping = False

    loop.call_later(every, sweep)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(_fail(f"cannot listen on {host}:{port}: {exc.strerror}")) from None
    except OverflowError:  # serve(app, port=...) from a script: main() checks --port before this
        sock.close()
        raise SystemExit(_fail(f"cannot listen on {host}:{port}: a port is 0-65535")) from None
    sock.set_inheritable(True)
    return sock


def _fail(message: str) -> int:
    print(f"gateway: {message}", file=sys.stderr)
    return STARTUP_FAILURE


def app_from_env() -> Gateway:
    """The factory each worker process calls (``--workers N``): settings come from GATEWAY_*."""
    settings = _settings(_parser().parse_args([]))
    if (problem := _bad_setting(settings)) is not None:
        raise SystemExit(_fail(problem))
    _configure_logging(settings.log_level)
    try:
        app = create_app(settings.modules, settings=settings)
    except (ValueError, OSError, sqlite3.Error) as exc:  # e.g. the master key file went missing since the start
        raise SystemExit(_fail(f"worker {os.getpid()} cannot start: {exc}")) from None
    app.exit_grace = EXIT_GRACE
    return app


#### CLI

_OPTIONS: list[tuple[str, type, str]] = [
    ("host", str, "address to listen on"),
    ("port", int, "port"),
    ("modules", str, "modules folder"),
    ("db", str, "keystore file (SQLite); its master key is <db>.key unless GATEWAY_MASTER_KEY is set"),
    ("workers", int, "processes serving the port (needs a shared replay store: --replay sqlite or redis://...)"),
    ("timeout", float, "seconds a call may take, unless its entry sets one"),
    ("max_body", int, "largest request body in bytes, unless a function's entry sets max_body"),
    ("rate", float, "calls per second per tenant and function, unless its entry sets rate (0: no limit)"),
    ("max_result", int, "largest result in bytes, encoded; a bigger one is a 500"),
    ("concurrency", int, "calls in progress (per process) before 503"),
    ("log_level", str, "debug, info, warning, error or critical"),
    ("auth", str, "stt1 (tokens required) or off (open: benchmarks and trusted loopback only)"),
    ("public_url", str, "the origin clients call, bound into every token (default http://HOST:PORT)"),
    ("replay", str, "replay store: memory (one process), sqlite (beside the db), sqlite:///path, redis://..."),
    ("keystore", str, "redis://host:port/db: a keystore shared by several hosts (default: SQLite at --db)"),
    ("rotate_days", float, "give credentials older than this a successor, in-band (0: never)"),
]


def _env_name(field: str) -> str:
    return "GATEWAY_PACKAGE" if field == "packages" else f"GATEWAY_{field.upper()}"


def _env_default(name: str, kind: type, fallback: Any) -> Any:
    """GATEWAY_<NAME> converted here, not by argparse: argparse would blame --name for a bad
    environment value and exit 2, which systemd restarts for ever (it stops on exit 3)."""
    variable = _env_name(name)
    text = os.environ.get(variable)
    if text is None:
        return fallback
    try:
        return kind(text)
    except ValueError:
        raise SystemExit(_fail(f"{variable}={text!r} is not a valid {kind.__name__}")) from None


_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_flag(variable: str, fallback: bool) -> bool:
    """A yes/no GATEWAY_* variable. Anything else is a start-up failure (exit 3): read as "no",
    GATEWAY_METRICS=enabled served no /metrics, and GATEWAY_RELOAD=maybe reloaded, unwarned."""
    text = os.environ.get(variable)
    if text is None:
        return fallback
    if text.strip().lower() in _YES + _NO:
        return text.strip().lower() in _YES
    raise SystemExit(_fail(f"{variable}={text!r} is not one of {', '.join(_YES)} or {', '.join(_NO)}"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway.py",
        description="Serve every function listed in modules/*.py __all_exposed__ as POST /rest/<name>/.",
        epilog="Every option can also be set as an environment variable GATEWAY_<OPTION>, e.g. GATEWAY_PORT=9000.",
    )
    defaults = Settings()
    for name, kind, help_text in _OPTIONS:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=_env_default(name, kind, getattr(defaults, name)),
            help=f"{help_text} (%(default)s)" if getattr(defaults, name) != "" else help_text,
        )
    parser.add_argument(
        "--no-reload",
        dest="reload",
        action="store_false",
        default=_env_flag("GATEWAY_RELOAD", True),
        help="do not watch the modules folder for changes (env GATEWAY_RELOAD=0)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        default=_env_flag("GATEWAY_METRICS", False),
        help="serve GET /metrics in Prometheus text format (env GATEWAY_METRICS=1)",
    )
    parser.add_argument(
        "--package",
        action="append",
        default=[p for p in os.environ.get("GATEWAY_PACKAGE", "").split(",") if p],
        help="also expose this installed package's modules (repeatable)",
    )
    commands = parser.add_subparsers(dest="command", metavar="{tenant,token}")
    tenant = commands.add_parser("tenant", help="manage tenants and their credentials").add_subparsers(
        dest="action", required=True
    )
    add = tenant.add_parser("add", help="a new tenant and its first credential file")
    add.add_argument("name", help="up to 32 lowercase letters, digits and -, not starting with -")
    add.add_argument("--functions", help="comma-separated names it may call (default: all)")
    add.add_argument("--out", help="credential file to write (default: NAME-credential.json)")
    tenant.add_parser("list", help="tenants, credentials and their states (never secrets)")
    tenant.add_parser("rotate", help="a pending successor key, delivered in-band").add_argument("name")
    tenant.add_parser("revoke", help="retire a tenant's credentials, or one kid, now").add_argument(
        "name_or_kid", help='a tenant, or a kid (one that starts with "-" goes after --: revoke -- -AbC...)'
    )
    export = tenant.add_parser("export", help="another credential file for a new installation")
    export.add_argument("name")
    export.add_argument("--out", required=True, help="credential file to write (it must not exist)")
    tenant.add_parser("otp-enroll", help="an authenticator secret for functions flagged otp").add_argument("name")
    token = commands.add_parser("token", help="print a curl command with a fresh token (valid 45 s, once)")
    token.add_argument("--cred", required=True, help="credential file")
    token.add_argument("method", help="POST, or GET for the catalog (/rest/)")
    token.add_argument("path", help="path and query, e.g. /rest/add")
    token.add_argument("--data", help="JSON body")
    token.add_argument("--otp", help="authenticator code, for functions flagged otp")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    fields = {name: getattr(args, name) for name, _, _ in _OPTIONS}
    fields["log_level"] = fields["log_level"].lower()  # "INFO" is fine, as uvicorn and logging read it
    return Settings(packages=tuple(args.package), reload=args.reload, metrics=args.metrics, **fields)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _listens_everywhere(host: str) -> bool:
    """0.0.0.0 or :: (any spelling): listening on every address, an origin no client calls."""
    import ipaddress  # here, not at the top: only the CLI asks, once

    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


def _bad_setting(settings: Settings) -> str | None:
    """What is wrong with the settings every command uses (a tenant's URL holds the port), if anything.

    Checked before logging is set up: a bad value is a start-up failure (exit 3), which systemd
    does not restart, rather than a traceback from deep in uvicorn that it restarts for ever.
    """
    if settings.log_level not in LOG_LEVELS:
        return f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {settings.log_level!r}"
    if not 0 <= settings.port <= 65535:
        return f"--port must be 0-65535, not {settings.port}"
    if not settings.rotate_days >= 0:  # "not >=" also refuses nan
        return f"--rotate-days must be 0 (no policy) or positive, not {settings.rotate_days:g}"
    if settings.public_url and not re.fullmatch(r"https?://[^/?#@\s\\]+/?", settings.public_url):
        return f"--public-url must be an origin like https://api.example.com, not {settings.public_url!r}"
    return None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not access_log.handlers:  # its lines come already stamped, in batches (see AccessLog)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.propagate = False


def _credential(settings: Settings, kid: str, k: bytes, tid: str) -> Credential:
    return Credential(stt=1, url=settings.audience, tid=tid, kid=kid, k=b64encode(k))


class CredentialNotWritten(Exception):
    """A credential file could not be written; the message says what became of its key."""


def _cannot_write(out: str) -> str | None:
    """Why a credential file cannot be created at ``out``, found without changing anything."""
    import tempfile

    if os.path.isdir(out):
        return f"cannot write {out}: it is a folder"
    try:
        # Just what write_credential does first: a new file beside the target.
        fd, probe = tempfile.mkstemp(prefix=".gateway-probe.", dir=os.path.dirname(os.path.abspath(out)))
    except OSError as exc:
        return f"cannot write {out}: {exc.strerror}"
    os.close(fd)
    os.unlink(probe)
    return None


def _issue(
    keystore: Keystore,
    settings: Settings,
    tid: str,
    out: str,
    make: Callable[[], tuple[str, bytes]],
    replace: bool = False,
) -> str:
    """Make a credential with ``make`` and write it to ``out``: both, or no usable key left behind.

    A key is only good in its file: one saved without it is a live secret nobody holds, and
    for ``tenant add`` a retry would be refused. So the file is proven creatable before the
    keystore changes (the usual mistakes then change nothing); if writing still fails (a full
    disk), the key just made is revoked. The keystore cannot delete a tenant: after ``add``
    the tenant stays, with no usable key, and ``tenant export`` gives it one.

    An existing ``out`` is refused unless ``replace``: it may hold a live credential, whose key
    would stay active with nobody holding it. Only the first run replaces (an empty keystore:
    whatever the old file held is gone with its keystore).
    """
    if (problem := _cannot_write(out)) is not None:
        raise CredentialNotWritten(f"{problem}; the keystore was not changed")
    if not replace and os.path.lexists(out):
        raise CredentialNotWritten(
            f"{out} exists already (it may hold a live credential): choose another --out, or remove it first; "
            "the keystore was not changed"
        )
    kid, k = make()
    try:
        write_credential(out, _credential(settings, kid, k, tid))
    except OSError as exc:
        failed = f"cannot write {out}: {exc.strerror or exc}"
        try:
            keystore.revoke(kid)
        except (OSError, sqlite3.Error) as undo:
            raise CredentialNotWritten(
                f"{failed}; its key {kid} is in the keystore and revoking it failed ({undo}): "
                f"run `gateway.py tenant revoke {kid}`"
            ) from None
        raise CredentialNotWritten(
            f"{failed}; its key {kid} was revoked (`gateway.py tenant export {tid} --out FILE` issues another)"
        ) from None
    return kid


def _tenant_command(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.keystore and args.action != "add" and not os.path.exists(settings.db):
        # A mistyped --db or the wrong folder: opening it would create an empty keystore and a
        # new master key, and answer "nothing here" as if that were the real one.
        return _fail(f"no keystore at {settings.db} (check --db; `tenant add` creates one)")
    where = redacted_url(settings.keystore) if settings.keystore else settings.db
    try:
        keystore = open_keystore(settings)
    except (ValueError, OSError, sqlite3.Error) as exc:
        return _fail(f"cannot open the keystore {where}: {exc}")
    try:
        if args.action == "add":
            if any(row["tid"] == args.name for row in keystore.rows()):  # before its file's name is refused
                return _fail(f"tenant {args.name!r} exists already")
            functions = None if args.functions is None else [f.strip() for f in args.functions.split(",") if f.strip()]
            if functions == []:  # --functions "" or " , ": a tenant that could call nothing, by a slip
                return _fail("--functions names no function: leave it out to allow every function")
            if functions is not None and (bad := [f for f in functions if not f.isidentifier()]):
                # A name no function can have would never match: the tenant would get 404s, unwarned.
                return _fail(f"--functions takes function names separated by commas, not {', '.join(map(repr, bad))}")
            out = args.out or f"{args.name}-credential.json"
            kid = _issue(keystore, settings, args.name, out, lambda: keystore.add_tenant(args.name, functions))
            # The url is this command's --public-url (or --host and --port), not a running gateway's:
            # shown, so a mismatch is seen here rather than as "unreachable" at the first call.
            print(
                f"tenant {args.name}: credential {kid} for {settings.audience} written to {out} "
                "(mode 0600; keep it secret)"
            )
        elif args.action == "export":
            kid = _issue(keystore, settings, args.name, args.out, lambda: keystore.add_credential(args.name))
            print(f"tenant {args.name}: new credential {kid} for {settings.audience} written to {args.out} (mode 0600)")
        elif args.action == "list":
            now = time.time()
            rows = keystore.rows()
            states = []
            for row in rows:
                state, until = row["state"], row["retire_at"]
                if state == "retiring" and until is not None:  # retired in effect once its grace is over
                    state = "retired" if until <= now else f"retiring until {_utc(until)}"
                states.append(state)
            width = max(map(len, states), default=0)  # "retiring until <time>" is wider than the rest
            for row, state in zip(rows, states, strict=True):
                print(
                    f"{row['tid']:<20} {row['kid']}  {state:<{width}} functions={row['functions'] or 'all'}"
                    f"{'  otp' if row['otp'] else ''}"
                )
        elif args.action == "rotate":
            made = keystore.rotate(args.name)
            for tid, old, new in made:
                print(f"tenant {tid}: {old} -> {new} (pending; clients adopt it on their next call)")
            if not made:
                print(f"tenant {args.name}: nothing to rotate (no active credential without a pending successor)")
        elif args.action == "revoke":
            print(f"{args.name_or_kid}: {keystore.revoke(args.name_or_kid)} credential(s) retired")
        elif args.action == "otp-enroll":
            import pyotp

            secret = keystore.otp_enroll(args.name)
            print(pyotp.TOTP(secret).provisioning_uri(name=args.name, issuer_name="gateway"))
    except (ValueError, OSError, CredentialNotWritten) as exc:  # OSError: the shared keystore is unreachable
        return _fail(str(exc))
    except sqlite3.Error as exc:  # locked, read-only or full: the change was rolled back
        return _fail(f"the keystore {where} was not changed: {exc}")
    finally:
        keystore.close()
    return 0


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _token_command(args: argparse.Namespace) -> int:
    import shlex

    from security import sign_request

    try:
        credential = read_credential(args.cred)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read the credential file: {exc}")
    if not args.path.startswith("/"):
        return _fail(f"the path must start with /, e.g. /rest/add (not {args.path!r})")
    # The token covers the target as it goes on the request line, and curl percent-encodes a
    # space or a non-ASCII character before sending: encode them here, so that what is signed
    # is what is sent. What is encoded already (%2F) and the query's own characters stay.
    target = quote(args.path, safe="/?&=:@!$'()*+,;~%-._")
    if args.otp is not None and not re.fullmatch(r"[0-9]{6}", args.otp):
        return _fail("--otp must be the 6-digit code the authenticator app shows")
    body = (args.data or "").encode()
    content_type = b"application/json" if body else b""
    try:
        token, _ = sign_request(
            credential, args.method.upper(), target.encode(), content_type, body, time.time(), otp=args.otp
        )
    except ValueError as exc:
        return _fail(str(exc))
    command = [
        "curl",
        "-sS",
        "--path-as-is",
        "-X",
        args.method.upper(),
        credential.url + target,
        "-H",
        f"Authorization: STT1 {token}",
    ]
    if body:
        command += ["-H", "Content-Type: application/json", "--data-raw", args.data]
    print(shlex.join(command))
    return 0


DEMO_CREDENTIAL = "demo-credential.json"  # the first run writes it in the working folder


def _first_run(settings: Settings, keystore: Keystore) -> None:
    """No keystore yet: make one with a demo tenant, and show how to call the gateway.

    Raises CredentialNotWritten if its credential file cannot be written (main checks first).
    """
    _issue(keystore, settings, "demo", DEMO_CREDENTIAL, lambda: keystore.add_tenant("demo"), replace=True)
    here = STATIC.parent  # where client.py and gateway.py are
    python, client, launcher = (_shown(p) for p in (sys.executable, here / "client.py", here / "gateway.py"))
    body = '{"a": 1, "b": 2}'
    print(
        f"\nFirst run: created {settings.db} with the tenant 'demo'; its credential is demo-credential.json"
        " (mode 0600: it is a secret).\nList the functions it may call:\n"
        f"  {python} {client} --cred demo-credential.json --catalog\n"
        "Call one with the Python client (add comes with the example modules):\n"
        f"  {python} {client} --cred demo-credential.json add --json '{body}'\n"
        "or with curl (a token is good for one call within 45 s):\n"
        f"  eval \"$({python} {launcher} token --cred demo-credential.json POST /rest/add --data '{body}')\"\n"
        f"or in a browser: open {settings.audience}/console and choose demo-credential.json\n",
        flush=True,
    )


def _shown(path: str | os.PathLike[str]) -> str:
    """A path as a command to paste here: short when below this folder, else whole (a bare
    ``python`` may be another interpreter, without the gateway's packages)."""
    relative = os.path.relpath(path)
    return shlex.quote(os.fspath(path) if relative.startswith("..") else relative)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    if (problem := _bad_setting(settings)) is not None:
        return _fail(problem)
    _configure_logging(settings.log_level)
    binds = args.command is None or (args.command == "tenant" and args.action in ("add", "export"))
    if binds and not settings.public_url and _listens_everywhere(settings.host):
        log.warning(
            "--host %s listens on every address, but tokens and credential files are bound to %s, which no "
            "client can call: set --public-url (GATEWAY_PUBLIC_URL) to the origin clients use",
            settings.host,
            settings.audience,
        )
    if args.command == "tenant":
        return _tenant_command(args, settings)
    if args.command == "token":
        return _token_command(args)
    if not Path(settings.modules).is_dir():
        return _fail(f"modules folder {settings.modules!r} does not exist (set --modules)")
    for name in ("workers", "timeout", "max_body", "max_result", "concurrency"):
        if not getattr(settings, name) > 0:  # "not >" also refuses nan
            return _fail(f"--{name.replace('_', '-')} must be positive")
    if not settings.rate >= 0:
        return _fail("--rate must be 0 (no limit) or positive")
    if settings.auth not in ("stt1", "off"):
        return _fail("--auth must be stt1 or off")
    if settings.auth == "stt1" and settings.workers > 1 and settings.replay == "memory":
        return _fail("--workers > 1 needs a replay store the workers share: add --replay sqlite")
    if settings.auth == "stt1":
        # Before the keystore exists: a first run that cannot write the demo's file creates nothing.
        fresh = not settings.keystore and not Path(settings.db).exists()
        if fresh and (problem := _cannot_write(os.path.abspath(DEMO_CREDENTIAL))) is not None:
            return _fail(
                f"first run: {problem}; start from a writable folder, "
                "or create a tenant first with `gateway.py tenant add NAME --out FILE`"
            )
        try:
            security = build_security(settings)  # proves the keystore, its master key and the store work
        except (ValueError, OSError, sqlite3.Error) as exc:
            return _fail(str(exc))
    else:
        security = None
        log.warning("--auth off: /rest/ answers anyone who can reach %s", settings.audience)
    # The port before the first run: it writes the demo credential for this port, so a busy one
    # must stop the start first. A keystore left empty by such a start is a first run next time.
    sock = _listen(settings.host, settings.port)
    if security is not None and not settings.keystore and not security.keystore.rows():
        try:
            _first_run(settings, security.keystore)
        except CredentialNotWritten as exc:
            return _fail(f"first run: {exc}")
    origin = f"http://{settings.host}:{settings.port}"
    if settings.workers == 1:
        app = create_app(settings.modules, settings=settings, security=security if settings.auth == "stt1" else None)
        app.exit_grace = EXIT_GRACE
        log.info("serving %s from %s on %s", _count(len(app.catalog.functions), "function"), settings.modules, origin)
        _serve_on(app, sock)
        return 0
    import uvicorn.supervisors

    # Each worker builds its own app in a fresh process from GATEWAY_*: pass the settings on there.
    for field in dataclasses.fields(Settings):
        value = getattr(settings, field.name)
        os.environ[_env_name(field.name)] = ",".join(value) if field.name == "packages" else str(value)
    config = _uvicorn_config("gateway_app:app_from_env", settings, factory=True, workers=settings.workers)
    log.info("serving %s on %s with %d workers", settings.modules, origin, settings.workers)
    with contextlib.ExitStack() as cleanup:
        if settings.metrics and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # The workers add up their numbers through files here (see Metrics); a fresh folder per run.
            import tempfile

            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="gateway-metrics-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        uvicorn.supervisors.Multiprocess(config, sockets=[sock]).run()
    return 0
