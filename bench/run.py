"""The gateway against its peers: one command, one markdown table.

    .venv/bin/python bench/run.py [--rounds 3] [--duration 10] [--connections 32] [--quick]

Every stack serves the same call, ``POST /rest/add/`` with ``{"a": 1, "b": 2}``, from one
server process with one worker on 127.0.0.1. The server is pinned to CPU 0 and wrk to CPU 1,
so the two never fight for a core; this script pins itself to CPU 1 too, so its polling and
token minting stay off the server's core. Each stack gets a warm-up, then a measured run,
and the stacks run in alternating order (forward, then backward, ...) over the rounds, so a
slow drift of the machine does not favour whoever goes first; the report shows medians.

The full run writes bench/RESULTS.md; ``--quick`` (short runs, one round, for development)
writes bench/out/RESULTS-quick.md so that it never overwrites the kept results.

Standard library only, plus what bench/requirements.txt installs (PyJWT to mint the JWT).
Read top to bottom: settings, the STT1 hook, stacks, processes, load, measurements, report, CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

#### Settings

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent  # the repository
PEERS = BENCH / "peers"
OUT = BENCH / "out"  # logs, token files and the gateway's working directory (git-ignored)
# The gateway runs from here, at its defaults: `modules` is a symlink to the repository's
# modules/, and whatever the gateway writes beside itself (its keystore gateway.db, the
# first run's demo-credential.json) stays here instead of in the repository root.
GATEWAY_HOME = OUT / "gateway-home"
# Every server caches its bytecode here, as a deployed host would beside its sources, whatever
# PYTHONDONTWRITEBYTECODE the caller has set, and without writing outside bench/.
PYCACHE = OUT / "pycache"
LUA = BENCH / "auth.lua"
PYTHON = sys.executable

HOST = "127.0.0.1"
PATH = "/rest/add/"
BODY = b'{"a": 1, "b": 2}'
SERVER_CPU = "0"
LOAD_CPU = "1"

# How to switch STT1 off on the gateway's command line (`--auth off`: "benchmarks and trusted
# loopback only"). Everything else stays at the gateway's defaults, for both gateway stacks.
GATEWAY_SECURITY_OFF_ARGS: list[str] = ["--auth", "off"]

# A generous bound on one Python worker's req/s on this class of machine, used only to size
# the first STT1 warm-up's token supply before any gateway figure of this run is known.
TOKENS_PER_SECOND_GUESS = 20_000


#### The STT1 hook (for the lead engineer to fill in)


def stt1_tokens(n: int, origin: str) -> list[str] | None:
    """Mint ``n`` single-use STT1 request tokens for the benchmark call, or None if STT1 is not there.

    A None (the hook's answer before security.py had a middleware) reports the STT1 stack as
    "not available yet" while everything else still runs.

    The contract bench/run.py relies on:

    * ``stt1_tokens(0, origin)`` is called once per stack launch *before* the gateway starts:
      return ``[]`` if STT1 is available (do any enrolment here, e.g. make sure a tenant
      ``bench`` with a credential exists in the gateway's keystore), None if it is not.
    * Then, once the gateway answers /healthz and the clock has passed the next whole second
      (iat is whole seconds and must be >= the gateway's boot time), it is called for 1
      token (the body check), for the warm-up and for the measured run, each batch right
      before it is used: every token is fresh (|now - iat| <= 45 s) and used once at most.
    * Each token must be what goes after ``Authorization: STT1 `` for
      ``POST /rest/add/`` (the TARGET), content type ``application/json`` and body
      ``{"a": 1, "b": 2}`` (``BODY``), with AUD = ``origin`` (``http://127.0.0.1:<port>``,
      the gateway's default public origin on the port it was given).
    * The gateway runs from ``GATEWAY_HOME`` (bench/out/gateway-home) at its defaults except
      ``--port``, so its keystore is ``GATEWAY_HOME / "gateway.db"``; its very first start there
      enrols the tenant ``demo`` and writes ``GATEWAY_HOME / "demo-credential.json"``, whose
      ``url`` names the port of that first start: sign with ``origin`` as the audience instead.
    * Minting must be fast enough that a batch (the warm-up's: 1.5x the best rate seen x its
      duration; the run's: 2x the warm-up's rate x its duration) is minted well inside the 45 s
      window before the run that uses it ends.

    ``security.sign_request(credential, "POST", PATH.encode(), b"application/json", BODY,
    time.time())[0]`` mints one, given a credential whose ``url`` is ``origin``.
    """
    sys.path.insert(0, str(ROOT))
    import msgspec

    import security

    cred_path = OUT / "bench-credential.json"
    if n == 0:
        GATEWAY_HOME.mkdir(parents=True, exist_ok=True)
        keystore = security.Keystore(GATEWAY_HOME / "gateway.db")
        if not cred_path.exists() or not any(row["tid"] == "bench" for row in keystore.rows()):
            with contextlib.suppress(ValueError):
                keystore.revoke("bench")  # a stale tenant from an old run: start afresh
            keystore.close()
            (GATEWAY_HOME / "gateway.db").unlink(missing_ok=True)
            keystore = security.Keystore(GATEWAY_HOME / "gateway.db")
            kid, k = keystore.add_tenant("bench")
            security.write_credential(cred_path, security.Credential(
                stt=1, url=origin, tid="bench", kid=kid, k=security.b64encode(k)))
        keystore.close()
        return []
    credential = msgspec.structs.replace(security.read_credential(cred_path), url=origin)
    now = time.time()
    return [security.sign_request(credential, "POST", PATH.encode(), b"application/json", BODY, now)[0]
            for _ in range(n)]


#### Stacks


@dataclasses.dataclass(frozen=True)
class Stack:
    """One server under test: how to start it on a port and how its requests authenticate."""

    key: str
    label: str
    auth: str  # "none", "jwt" (one reusable Bearer token) or "stt1" (one token per request)
    command: Callable[[int], list[str]]  # port -> argv, without the taskset prefix
    control: bool = False  # shown beside the targets, never judged by them (see STACKS)

    @property
    def cwd(self) -> Path:
        return GATEWAY_HOME if self.key.startswith("gateway") else ROOT

    def __str__(self) -> str:
        return self.key


def _uvicorn(module: str, http: str = "auto") -> Callable[[int], list[str]]:
    """Stock uvicorn as its users run it: loop/http auto (uvloop, httptools), no access log.

    ``http="gateway_app:http_protocol"`` (the controls) swaps in the gateway's own HTTP layer,
    which also sends each answer's head and body in one write and leaves out ``server:``.
    """

    def command(port: int) -> list[str]:
        return [
            PYTHON, "-m", "uvicorn", f"{module}:app", "--app-dir", str(PEERS),
            "--host", HOST, "--port", str(port), "--loop", "auto", "--http", http,
            "--lifespan", "on", "--no-access-log", "--log-level", "warning",
            *(["--no-server-header"] if http != "auto" else []),
        ]  # fmt: skip

    return command


def _gunicorn(port: int) -> list[str]:
    return [
        PYTHON, "-m", "gunicorn", "--workers", "1", "--worker-class", "sync",
        "--bind", f"{HOST}:{port}", "--chdir", str(PEERS), "--log-level", "warning",
        "django_drf:application",
    ]  # fmt: skip


def _gateway(*extra: str, modules: str | None = None) -> Callable[[int], list[str]]:
    """``python gateway.py`` at its defaults (access log on, level info) except the port.

    It runs from GATEWAY_HOME, so its default ``--modules modules`` is the repository's.
    """

    def command(port: int) -> list[str]:
        return [PYTHON, str(ROOT / "gateway.py"), "--port", str(port), *extra] + (
            ["--modules", modules] if modules else []
        )

    return command


STACKS: tuple[Stack, ...] = (
    Stack("raw_asgi", "raw ASGI + msgspec (ceiling)", "none", _uvicorn("raw_asgi")),
    Stack("starlette", "Starlette + msgspec, no auth", "none", _uvicorn("starlette_plain")),
    Stack("starlette_jwt", "Starlette + PyJWT middleware", "jwt", _uvicorn("starlette_jwt")),
    Stack("fastapi_jwt", "FastAPI + pydantic + PyJWT", "jwt", _uvicorn("fastapi_jwt")),
    Stack("django_drf", "Django + DRF + PyJWT (gunicorn sync)", "jwt", _gunicorn),
    Stack("gateway_off", "gateway, security off", "none", _gateway(*GATEWAY_SECURITY_OFF_ARGS)),
    Stack("gateway_stt1", "gateway, STT1 on (default)", "stt1", _gateway()),
    # Controls. The gateway's HTTP layer (gateway_app.http_protocol) is its own: uvicorn's
    # httptools protocol plus limits, and one write per answer where stock uvicorn makes two.
    # The targets compare the peers as their users deploy them, on stock uvicorn; these two
    # rows run the same peers on the gateway's HTTP layer, to show how much of the gap is
    # that layer and how much the rest.
    Stack("starlette_jwt_gw_http", "control: Starlette + PyJWT on the gateway's HTTP layer", "jwt",
          _uvicorn("starlette_jwt", "gateway_app:http_protocol"), control=True),
    Stack("fastapi_jwt_gw_http", "control: FastAPI + PyJWT on the gateway's HTTP layer", "jwt",
          _uvicorn("fastapi_jwt", "gateway_app:http_protocol"), control=True),
)
BY_KEY = {stack.key: stack for stack in STACKS}

JWT_SECRET = secrets.token_hex(32)  # per run; handed to the JWT peers in BENCH_JWT_SECRET
JWT = ""  # the one token every JWT request carries, minted in main()


def jwt_token() -> str:
    """One HS256 JWT for the whole run: JWT peers accept the same token again and again."""
    import jwt

    now = int(time.time())
    return str(jwt.encode({"sub": "bench", "iat": now, "exp": now + 3600}, JWT_SECRET, algorithm="HS256"))


class NotAvailable(Exception):
    """A stack that cannot run yet (the STT1 hook said so); reported, not a failure."""


def header_values(stack: Stack, n: int, origin: str) -> list[str]:
    """The Authorization values for ``n`` requests, in the form auth.lua reads (see there).

    [] sends no header, one value is reused for every request, more are used once each.
    """
    if stack.auth == "none":
        return []
    if stack.auth == "jwt":
        return [f"Bearer {JWT}"]
    tokens = stt1_tokens(n, origin)
    if tokens is None:
        raise NotAvailable("stt1_tokens() in bench/run.py returned None")
    if len(tokens) != n:
        raise RuntimeError(f"stt1_tokens({n}) returned {len(tokens)} tokens")
    return [f"STT1 {token}" for token in tokens]


def require_available(stack: Stack, origin: str) -> None:
    """Ask the STT1 hook, before the gateway starts, whether it can mint (and let it enrol)."""
    if stack.auth == "stt1" and stt1_tokens(0, origin) is None:
        raise NotAvailable("stt1_tokens() in bench/run.py returns None: the hook is not filled in yet")


#### Processes


@dataclasses.dataclass
class Server:
    """A running stack: its process (group), port and the time it was spawned."""

    stack: Stack
    port: int
    proc: subprocess.Popen[bytes]
    spawned: float
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start(stack: Stack, port: int, command: list[str] | None = None) -> Server:
    """Spawn the stack pinned to the server CPU, in its own process group, logging to bench/out/."""
    OUT.mkdir(exist_ok=True)
    GATEWAY_HOME.mkdir(exist_ok=True)
    if not (GATEWAY_HOME / "modules").exists():
        (GATEWAY_HOME / "modules").symlink_to(ROOT / "modules", target_is_directory=True)
    log = OUT / f"{stack.key}.log"
    env = {**os.environ, "BENCH_JWT_SECRET": JWT_SECRET, "PYTHONPYCACHEPREFIX": str(PYCACHE)}
    if stack.control:  # uvicorn imports gateway_app:http_protocol by name
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    argv = ["taskset", "-c", SERVER_CPU, *(command or stack.command(port))]
    with log.open("ab") as sink:
        sink.write(f"\n==== {datetime.datetime.now().isoformat()} {' '.join(argv)}\n".encode())
        sink.flush()
        spawned = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=stack.cwd, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return Server(stack, port, proc, spawned, log)


def get_status(port: int, path: str = "/healthz") -> int | None:
    """The status of one GET, or None if nothing answers yet."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def wait_ready(server: Server, timeout: float = 60.0) -> float:
    """Poll GET /healthz every 5 ms; return the seconds from spawn to the first 200."""
    deadline = server.spawned + timeout
    while time.perf_counter() < deadline:
        if get_status(server.port) == 200:
            return time.perf_counter() - server.spawned
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.stack} exited with {server.proc.returncode}; see {log_tail(server.log)}")
        time.sleep(0.005)
    raise RuntimeError(f"{server.stack} did not answer /healthz within {timeout:g} s; see {log_tail(server.log)}")


def log_tail(log: Path, lines: int = 5) -> str:
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"{log}:\n  " + "\n  ".join(tail)


def stop(server: Server) -> None:
    """SIGTERM to the stack's own process group (uvicorn or gunicorn master and its worker)."""
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(5)


@contextlib.contextmanager
def running(stack: Stack, port: int, command: list[str] | None = None) -> Iterator[tuple[Server, float]]:
    """Start a stack, wait for its first 200, yield (server, cold start seconds), always stop it."""
    server = start(stack, port, command)
    try:
        yield server, wait_ready(server)
    finally:
        stop(server)


def serving_pid(server: Server) -> int:
    """The process that answers requests: the gunicorn worker, or the server process itself."""
    pid = server.proc.pid  # taskset execs the server, so this is the server's own pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if server.stack.key == "django_drf" and children else pid


def rss_mb(pid: int) -> float:
    """VmRSS from /proc/<pid>/status, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


#### Load


@dataclasses.dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int
    exhausted: int  # token lines that ran out (auth.lua); > 0 invalidates an STT1 run

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors + self.exhausted


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS_MS[unit]


def parse_wrk(output: str) -> WrkResult:
    """Read the figures from wrk --latency's text output (and auth.lua's done() line)."""

    def find(pattern: str, default: str | None = None) -> str:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            if default is None:
                raise RuntimeError(f"wrk output has no {pattern!r}:\n{output}")
            return default
        return match.group(1)

    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)")),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)")),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)")),
        requests=int(find(r"^\s+(\d+) requests in")),
        non2xx=int(find(r"Non-2xx or 3xx responses: (\d+)", "0")),
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        exhausted=int(find(r"^auth\.lua: values=\d+ used=\d+ exhausted=(\d+)")),
    )


def wrk(port: int, values: Sequence[str], seconds: float, connections: int, name: str) -> WrkResult:
    """One wrk run pinned to the load CPU, fed its Authorization values through auth.lua."""
    tokens = OUT / f"tokens-{name}.txt"
    tokens.write_text("".join(f"{value}\n" for value in values))
    argv = [
        "taskset", "-c", LOAD_CPU, "wrk", "--latency", "-t1", f"-c{connections}", f"-d{seconds:g}s",
        "-s", str(LUA), f"http://{HOST}:{port}{PATH}", "--", str(tokens), "1", BODY.decode(),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def check_body(server: Server, values: Sequence[str]) -> None:
    """One real request before any load: 200 and {"results": 3, "valid": true}, or stop here."""
    headers = {"content-type": "application/json"}
    if values:
        headers["authorization"] = values[0]
    conn = http.client.HTTPConnection(HOST, server.port, timeout=5)
    try:
        conn.request("POST", PATH, BODY, headers)
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status != 200 or answer != {"results": 3, "valid": True}:  # 3 == 3.0: the gateway's hints say float
        raise RuntimeError(f"{server.stack}: POST {PATH} answered {status} {body[:200]!r}")


#### Measurements


def run_soak(opts: argparse.Namespace, rate: float) -> dict[str, Any]:
    """bench/soak.py at its defaults (2 minutes of wrk load), its report beside this one.

    Tokens are minted for 1.25x the best STT1 rate of the rounds (soak.py adds 40 %), so a
    quiet machine cannot run the supply dry. soak.py mints on both CPUs, then pins itself.
    """
    path = opts.output.with_name("SOAK.md") if opts.output == BENCH / "RESULTS.md" else opts.output.with_suffix(
        ".soak.md"
    )
    summary = OUT / "soak.json"
    summary.unlink(missing_ok=True)
    argv = [
        "taskset", "-c", f"{SERVER_CPU},{LOAD_CPU}", PYTHON, str(BENCH / "soak.py"),
        "--rate", str(math.ceil(rate * 1.25)), "--output", str(path), "--json", str(summary),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if not summary.exists():
        raise RuntimeError(f"bench/soak.py failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return {**json.loads(summary.read_text()), "path": str(shown)}


def micro_stt1() -> dict[str, Any]:
    """bench/micro_stt1.py on the server CPU: the gateway's STT1 work per request, no network."""
    argv = ["taskset", "-c", SERVER_CPU, PYTHON, str(ROOT / "bench" / "micro_stt1.py"), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    return dict(json.loads(done.stdout))


@dataclasses.dataclass
class Run:
    """One stack's measured run in one round."""

    stack: str
    round: int
    wrk: WrkResult
    rss_mb: float
    master_rss_mb: float | None  # gunicorn's master, beside the worker that serves
    warmup_errors: int  # non-2xx and socket errors in the warm-up: counted with the run's
    steal: float  # share of CPU time the hypervisor gave elsewhere during the measured run


def cpu_times() -> list[int]:
    """The machine's CPU counters from /proc/stat: user nice system idle iowait irq softirq steal."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def steal_share(before: list[int], after: list[int]) -> float:
    """Of the CPU time that passed between two cpu_times(), the share stolen by the hypervisor:
    time a shared host ran someone else while this machine wanted to run."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return spent[7] / sum(spent) if sum(spent) else 0.0


def load_run(stack: Stack, round_no: int, opts: argparse.Namespace, rate_hint: float) -> Run:
    """Start, check one body, warm up, measure, read RSS, stop."""
    port = free_port()
    origin = f"http://{HOST}:{port}"
    require_available(stack, origin)
    with running(stack, port) as (server, _):
        if stack.auth == "stt1":
            # iat is whole seconds and must not be before the gateway's boot (memory replay
            # store): let the clock pass the next full second after the first 200.
            time.sleep(math.ceil(time.time()) - time.time() + 0.01)
        check_body(server, header_values(stack, 1, origin))
        # STT1 tokens are single-use and expire: mint each batch right before its run, sized
        # from the best rate seen so far (+50 %), so the supply never runs out mid-run.
        warm = wrk(port, header_values(stack, math.ceil(rate_hint * opts.warmup * 1.5), origin),
                   opts.warmup, opts.connections, f"{stack.key}-warmup")  # fmt: skip
        # The warm-up may be much slower than the run (a cold server), hence twice its rate: a
        # run that runs out of tokens counts as failed.
        count = math.ceil(max(warm.rps, 1.0) * opts.duration * 2) + 2 * opts.connections + 100
        values = header_values(stack, count, origin)
        before = cpu_times()
        result = wrk(port, values, opts.duration, opts.connections, stack.key)
        steal = steal_share(before, cpu_times())
        pid = serving_pid(server)
        rss = rss_mb(pid)
        master = rss_mb(server.proc.pid) if pid != server.proc.pid else None
    if warm.exhausted:  # not an error (nothing was sent twice), but the warm-up was cut short
        print(f"note: {stack.key} round {round_no}: the warm-up ran out of tokens after {warm.requests:,} requests")
    return Run(stack.key, round_no, result, rss, master, warm.non2xx + warm.socket_errors, steal)


@dataclasses.dataclass
class ColdStart:
    seconds: list[float]
    idle_rss_mb: float
    functions: int | None = None  # the gateway's /healthz count, for the generated-module runs

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def cold_starts(
    stacks: list[Stack], samples: int, modules: str | None = None, expect_functions: int | None = None
) -> dict[str, ColdStart]:
    """Spawn to first 200 on /healthz, ``samples`` times per stack, after one untimed start each.

    The untimed start fills the bytecode cache (bench/out/pycache), which the stacks share: so
    no stack pays for compiling what another would have found compiled. The stacks take turns,
    in alternating order like the load rounds: a slow moment of a shared machine then falls on
    every stack alike instead of on whichever was being started. Idle RSS: 1 s after each start
    (after the last one only, for generated modules), median.
    """
    seconds: dict[str, list[float]] = {stack.key: [] for stack in stacks}
    idle: dict[str, list[float]] = {stack.key: [] for stack in stacks}
    functions: dict[str, int] = {}
    for i in range(-1, samples):  # -1: the untimed start
        for stack in stacks if i % 2 == 0 else stacks[::-1]:
            port = free_port()  # main() asked require_available once per stack, before any start
            command = _gateway(*GATEWAY_SECURITY_OFF_ARGS, modules=modules)(port) if modules else None
            with running(stack, port, command) as (server, elapsed):
                if i < 0:
                    continue
                seconds[stack.key].append(elapsed)
                if modules:
                    functions[stack.key] = healthz_functions(port, expect_functions)
                if i == samples - 1 or not modules:
                    time.sleep(1.0)
                    idle[stack.key].append(rss_mb(serving_pid(server)))
            time.sleep(0.3)
    return {key: ColdStart(seconds[key], median(idle[key]), functions.get(key)) for key in seconds}


def healthz_functions(port: int, expected: int | None = None) -> int:
    """The function count /healthz reports; a refused module, or a count other than
    ``expected``, stops the run: a start that skipped modules is not the start measured."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        health = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    if health.get("refused"):
        raise RuntimeError(f"generated modules were refused: {health['refused'][:3]}")
    if expected is not None and health["functions"] != expected:
        raise RuntimeError(f"/healthz lists {health['functions']} functions, not the {expected} generated")
    return int(health["functions"])


GENERATED_MODULE = '''"""Generated module {i} for the cold-start benchmark: two typed functions, like math_tools."""

from typing import Annotated

from msgspec import Meta

__all_exposed__ = [{{"name": "add_{i}", "inline": True}}, "scale_{i}"]


def add_{i}(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


def scale_{i}(x: Annotated[float, Meta(ge=0)], factor: int = 2) -> float:
    """Scale a non-negative number."""
    return x * factor
'''


def generate_modules(folder: Path, count: int) -> None:
    for i in range(count):
        (folder / f"mod_{i:04d}.py").write_text(GENERATED_MODULE.format(i=i))


#### Report


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclasses.dataclass
class Summary:
    """A stack's figures over the rounds: medians, and errors summed (they must be 0)."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rss_mb: float
    master_rss_mb: float | None


def summarise(runs: list[Run]) -> Summary:
    masters = [r.master_rss_mb for r in runs if r.master_rss_mb is not None]
    return Summary(
        rps=median([r.wrk.rps for r in runs]),
        p50_ms=median([r.wrk.p50_ms for r in runs]),
        p99_ms=median([r.wrk.p99_ms for r in runs]),
        errors=sum(r.wrk.errors + r.warmup_errors for r in runs),
        rss_mb=median([r.rss_mb for r in runs]),
        master_rss_mb=median(masters) if masters else None,
    )


def machine() -> dict[str, str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown",
    )  # fmt: skip
    memory = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--",
         "gateway.py", "gateway_app.py", "security.py", "modules", "bench", "requirements.txt",
         "requirements-dev.txt", *OUTPUTS],
        capture_output=True, text=True,
    )  # fmt: skip
    return {
        "nproc": str(os.cpu_count()),
        "CPU": cpu,
        "memory": f"{int(memory) / 1024**2:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "wrk": (wrk_version.stdout + wrk_version.stderr).splitlines()[0].split(" Copyright")[0].strip(),
        "gateway commit": commit.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else ""),
    }


# What the run writes itself (the soak's report comes before this one is rendered): not a change.
OUTPUTS = (":(exclude)bench/RESULTS.md", ":(exclude)bench/SOAK.md")

VERSIONED = (
    "uvicorn", "uvloop", "httptools", "starlette", "msgspec", "cryptography", "pyseto", "fastapi", "pydantic",
    "PyJWT", "Django", "djangorestframework", "gunicorn",
)  # fmt: skip


def versions() -> str:
    """The pinned packages, and the OpenSSL that cryptography carries: STT1's cost depends on it."""
    from cryptography.hazmat.backends.openssl.backend import backend

    packages = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in VERSIONED)
    return f"{packages} ({backend.openssl_version_text()})"


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return {True: "**PASS**", False: "**FAIL**", None: "n/a"}[ok]


class Report:
    """Builds RESULTS.md from everything measured in this run."""

    def __init__(
        self,
        opts: argparse.Namespace,
        runs: dict[str, list[Run]],
        unavailable: dict[str, str],
        starts: dict[str, ColdStart],
        module_starts: dict[int, ColdStart],
        started_at: datetime.datetime,
        loads: tuple[str, str],
        micro: dict[str, Any] | None = None,
        steal: float = 0.0,
        soak: dict[str, Any] | None = None,
    ) -> None:
        self.opts, self.runs, self.unavailable, self.micro = opts, runs, unavailable, micro
        self.starts, self.module_starts = starts, module_starts
        self.started_at, self.loads, self.steal, self.soak = started_at, loads, steal, soak
        self.summary = {key: summarise(rs) for key, rs in runs.items() if rs}

    def rps(self, key: str) -> float | None:
        return self.summary[key].rps if key in self.summary else None

    def ratio(self, key: str, base: str) -> float | None:
        a, b = self.rps(key), self.rps(base)
        return a / b if a is not None and b else None

    def targets(self) -> list[str]:
        """The issue's targets as PASS / FAIL / n/a lines, each with the figures it was judged on."""
        s, lines = self.summary, []

        def line(ok: bool | None, text: str, figures: str) -> None:
            lines.append(f"- {verdict(ok)} {text}: {figures}")

        def missing(*keys: str) -> str | None:
            """Why a target cannot be judged: a stack not measured, or a run with errors."""
            absent = [k for k in keys if k not in s]
            if absent:
                reasons = [f"{BY_KEY[k].label} {self.unavailable.get(k, 'not selected')}" for k in absent]
                return "not measured: " + ", ".join(reasons)
            dirty = [k for k in keys if s[k].errors]
            return f"invalid: errors in {', '.join(dirty)}" if dirty else None

        def throughput(key: str, base: str, factor: float, text: str) -> None:
            why = missing(key, base)
            if why:
                line(None, text, why)
                return
            r = s[key].rps / s[base].rps
            shown = f"{r:.1%}" if factor < 1 else f"{r:.3f}x"  # enough digits to see a near miss
            line(r >= factor, text, f"{fmt(s[key].rps)} vs {fmt(s[base].rps)} req/s = {shown}")

        throughput("gateway_off", "starlette", 0.9, "gateway security-off >= 90 % of plain Starlette req/s")
        throughput("gateway_stt1", "fastapi_jwt", 2.5, "gateway STT1-on >= 2.5x FastAPI+PyJWT req/s")
        throughput("gateway_stt1", "starlette_jwt", 1.2, "gateway STT1-on >= 1.2x Starlette+PyJWT req/s")
        text = "gateway STT1-on p99 no worse than Starlette+PyJWT"
        why = missing("gateway_stt1", "starlette_jwt")
        if why:
            line(None, text, why)
        else:
            g, p = s["gateway_stt1"].p99_ms, s["starlette_jwt"].p99_ms
            line(g <= p, text, f"{g:.2f} vs {p:.2f} ms")

        for key in ("gateway_off", "gateway_stt1"):
            text = f"cold start with the example modules <= 1.3x plain Starlette's ({BY_KEY[key].label})"
            if key in self.starts and "starlette" in self.starts:
                g, p = self.starts[key].median, self.starts["starlette"].median
                line(g <= 1.3 * p, text, f"{g * 1000:.0f} vs {p * 1000:.0f} ms = {g / p:.3f}x")
            else:
                line(None, text, self.unavailable.get(key, "not measured"))
        if 1000 in self.module_starts:
            m = self.module_starts[1000].median
            line(m < 1.0, "cold start with 1,000 modules < 1 s", f"{m * 1000:.0f} ms")
        else:
            line(None, "cold start with 1,000 modules < 1 s", "not measured")
        for key in ("gateway_off", "gateway_stt1"):
            text = f"idle RSS <= 45 MB ({BY_KEY[key].label}, example modules)"
            if key in self.starts:
                line(self.starts[key].idle_rss_mb <= 45, text, f"{self.starts[key].idle_rss_mb:.1f} MB")
            else:
                line(None, text, self.unavailable.get(key, "not measured"))
        text = "verify + replay + sign <= 25 us per request (bench/micro_stt1.py: the token work, memory store)"
        if self.micro:
            us = self.micro["memory"]["median"]
            ref = self.micro["reference"]
            floor = next(v for k, v in ref.items() if k.endswith("(floor)"))
            paseto = [v for k, v in ref.items() if k.startswith("pyseto")]
            line(
                us <= 25,
                text,
                f"{us:.1f} us (median of 7 runs; min {self.micro['memory']['min']:.1f} us; the whole middleware "
                f"{self.micro['middleware']['median']:.1f} us). Here the primitives "
                f"alone cost {floor:.1f} us, and pyseto's v3.local {min(paseto):.1f}-{max(paseto):.1f} us per token "
                "(the issue: about 20 us)",
            )
        else:
            line(None, text, "not measured")
        text = "RSS after 2 minutes of sustained authenticated load stays bounded (bench/soak.py)"
        if self.soak:
            k = self.soak
            per = k["per_entry"] or {}
            line(
                k["passed"],
                text,
                f"{k['requests']:,} requests, {k['errors']} errors; RSS {k['warmup_rss']:.1f} MB after the warm-up, "
                f"growth {k['growth']:+.2%} after it, {k['growth_beyond_store']:+.2%} beyond the replay store's own "
                f"(limit +10%); the replay store held at most {k['max_entries']:,} "
                f"jtis, {per.get('store_bytes_per_jti', math.nan):.0f} bytes per jti",
            )
        else:
            line(None, text, "not measured (--no-soak, --quick, or no STT1 stack in this run)")
        bad = [k for k, v in s.items() if v.errors]
        line(not bad, "every measured run had 0 errors", ", ".join(f"{k}: {s[k].errors}" for k in bad) or "0 errors")
        return lines

    def headline(self) -> list[str]:
        pairs = [
            ("gateway_off", "starlette", "gateway (security off) vs plain Starlette"),
            ("gateway_off", "raw_asgi", "gateway (security off) vs raw ASGI, the ceiling"),
            ("gateway_stt1", "starlette_jwt", "gateway (STT1 on) vs Starlette + PyJWT"),
            ("gateway_stt1", "fastapi_jwt", "gateway (STT1 on) vs FastAPI + PyJWT"),
            ("gateway_stt1", "django_drf", "gateway (STT1 on) vs Django + DRF + PyJWT"),
            ("gateway_stt1", "gateway_off", "STT1 on vs security off (the cost of STT1)"),
            ("gateway_stt1", "starlette_jwt_gw_http",
             "control: gateway (STT1 on) vs Starlette + PyJWT, both on the gateway's HTTP layer"),
            ("gateway_stt1", "fastapi_jwt_gw_http",
             "control: gateway (STT1 on) vs FastAPI + PyJWT, both on the gateway's HTTP layer"),
        ]
        lines = []
        for a, b, text in pairs:
            r = self.ratio(a, b)
            shown = f"**{r:.2f}x** req/s" if r is not None else "n/a (" + "; ".join(
                f"{BY_KEY[k].label}: {self.unavailable.get(k, 'not measured')}" for k in (a, b) if k not in self.summary
            ) + ")"  # fmt: skip
            lines.append(f"- {text}: {shown}")
        return lines

    def table(self) -> list[str]:
        rows = [
            "| stack | req/s | vs Starlette | p50 ms | p99 ms | errors | RSS after run MB | idle RSS MB "
            "| cold start ms |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for stack in STACKS:
            cold = self.starts.get(stack.key)
            cold_text = (fmt(cold.median * 1000), fmt(cold.idle_rss_mb, 1)) if cold else ("–", "–")
            if stack.key in self.summary:
                s = self.summary[stack.key]
                ratio = self.ratio(stack.key, "starlette")
                rss = fmt(s.rss_mb, 1) + (" ¹" if s.master_rss_mb is not None else "")
                rows.append(
                    f"| {stack.label} | {fmt(s.rps)} | {fmt(ratio, 2) + 'x' if ratio else '–'} | {fmt(s.p50_ms, 2)} "
                    f"| {fmt(s.p99_ms, 2)} | {s.errors} | {rss} | {cold_text[1]} | {cold_text[0]} |"
                )
            else:
                reason = self.unavailable.get(stack.key, "not selected")
                rows.append(f"| {stack.label} | {reason} | | | | | | {cold_text[1]} | {cold_text[0]} |")
        return rows

    def module_table(self) -> list[str]:
        rows = [
            "| generated modules | functions | cold start ms (median) | samples ms | idle RSS MB |",
            "|--:|--:|--:|--|--:|",
        ]
        for count, cold in sorted(self.module_starts.items()):
            samples = ", ".join(f"{s * 1000:.0f}" for s in cold.seconds)
            functions = fmt(cold.functions) if cold.functions is not None else "–"
            rows.append(
                f"| {count:,} | {functions} | {fmt(cold.median * 1000)} | {samples} | {fmt(cold.idle_rss_mb, 1)} |"
            )
        return rows

    def per_round(self) -> list[str]:
        rows = [
            "| round | stack | req/s | p50 ms | p99 ms | requests | errors | RSS MB | CPU stolen |",
            "|--:|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        flat = sorted((r for rs in self.runs.values() for r in rs), key=lambda r: (r.round, r.stack))
        for r in flat:
            rows.append(
                f"| {r.round} | {BY_KEY[r.stack].label} | {fmt(r.wrk.rps)} | {fmt(r.wrk.p50_ms, 2)} | "
                f"{fmt(r.wrk.p99_ms, 2)} | {r.wrk.requests:,} | {r.wrk.errors}"
                + (f" (+{r.warmup_errors} in the warm-up)" if r.warmup_errors else "")
                + f" | {fmt(r.rss_mb, 1)} | {r.steal:.1%} |"
            )
        return rows

    def micro_section(self) -> list[str]:
        if not self.micro:
            return []
        rows = [
            "## STT1 per request, without the network",
            "",
            "`python bench/micro_stt1.py` on the server CPU, 7 runs of 20,000 tokens each. The token work (the",
            "target's figure): parse, assertion, open (MAC, then AES), the replay store's insert and the answer's",
            "mint, as the middleware calls them. The whole middleware adds its ASGI work around them: headers and",
            "body read, the clock and key checks, the caller, the answer buffered and re-sent with its token.",
            "",
            "| what | median us | min us | max us |",
            "|---|--:|--:|--:|",
        ]
        for what, name in (
            ("token work, memory replay store", "memory"),
            ("token work, SQLite replay store", "sqlite"),
            ("the whole middleware, memory replay store", "middleware"),
        ):
            if name in self.micro:
                f = self.micro[name]
                rows.append(f"| {what} | {f['median']:.1f} | {f['min']:.1f} | {f['max']:.1f} |")
        rows += ["", "What this machine's primitives cost, best of 5, to read the absolute figures against:", ""]
        reference = self.micro["reference"]
        rows += [f"- {what}: {us:.2f} us" for what, us in reference.items()]
        paseto = sum(us for what, us in reference.items() if what.startswith("pyseto"))
        if paseto:  # pyseto's figures are best of 5: read against our min, and our median for the verdict's figure
            rows += [
                "",
                "Against the issue's own reference, pyseto's v3.local encrypt + decrypt on this machine: the token "
                f"work costs {self.micro['memory']['min'] / paseto:.2f} of it at its min and "
                f"{self.micro['memory']['median'] / paseto:.2f} at its median (the target's figure); the 25 us "
                "budget is 25 / (2 x 20) = 0.63 of the issue's figures for them. This ratio is not the target: the "
                "verdict above is on the absolute median.",
            ]
        return [*rows, ""]

    def soak_section(self) -> list[str]:
        if not self.soak:
            return []
        return [
            "## Sustained load: 2 minutes",
            "",
            f"`python bench/soak.py`, run by this command; its full report with the samples is `{self.soak['path']}`.",
            "",
            *self.soak["lines"],
            f"- RSS before the load: {self.soak['rss_before_mb']:.1f} MB",
            "",
        ]

    def render(self) -> str:
        o = self.opts
        command = "python bench/run.py" + (
            " --quick" if o.quick else f" --rounds {o.rounds} --duration {o.duration:g} --connections {o.connections}"
        )
        if o.stacks:
            command += f" --stacks {o.stacks}"
        m = machine()
        masters = [s.master_rss_mb for s in self.summary.values() if s.master_rss_mb is not None]
        lines = [
            "# Benchmark results",
            "",
            f"Generated by `{command}` (see bench/README.md); rerun it to regenerate this file, do not edit it.",
            "",
            f"- date: {self.started_at:%Y-%m-%d %H:%M} UTC",
            f"- machine: nproc {m['nproc']}, {m['CPU']}, {m['memory']}, Linux {m['kernel']}; "
            f"load average {self.loads[0]} at the start, {self.loads[1]} at the end; {self.steal:.1%} of the CPU "
            "time during the run was stolen by the hypervisor (other tenants of the host; per run below)",
            f"- versions: Python {m['Python']}, {versions()}; {m['wrk']}; gateway at {m['gateway commit']}",
            f"- load: `wrk --latency -t1 -c{o.connections}`, {o.warmup:g} s warm-up then {o.duration:g} s measured, "
            f"{o.rounds} round(s) in alternating order, figures are medians over the rounds (errors are summed); "
            f"server on CPU {SERVER_CPU}, wrk on CPU {LOAD_CPU} (`taskset`).",
            "",
            "## Headline: ratios in this run",
            "",
            *self.headline(),
            "",
            "## Targets",
            "",
            *self.targets(),
            "",
            "## All stacks",
            "",
            f"`POST {PATH}` with `{BODY.decode()}`, one server process with one worker each.",
            "",
            *self.table(),
            "",
        ]
        if masters:
            lines += [
                f"¹ the gunicorn worker that serves; its master process holds another {fmt(median(masters), 1)} MB.",
                "",
            ]
        lines += [
            "- **req/s**: wrk's Requests/sec; **vs Starlette**: req/s over the plain Starlette peer's in this run.",
            "- **p50 / p99**: wrk's latency distribution (closed loop: 32 connections, each waits for its answer).",
            "- **errors**: non-2xx answers plus socket errors (and, for STT1, tokens that ran out); must be 0.",
            "- **RSS after run**: VmRSS of the serving process right after the measured run; **idle RSS**: 1 s "
            "after a fresh start that answered one /healthz, median over the cold starts; **cold start**: spawn "
            f"to the first 200 from `GET /healthz`, median of {o.samples}, the stacks starting in turns, after "
            "one untimed start each that fills the bytecode cache (`bench/out/pycache`), as on a host that has "
            "started the stack before.",
            "- The gateway runs at its defaults except `--port`: log level `info` with its per-request access log "
            "ON (batched); every peer runs with its access log off and log level `warning`.",
            "- The gateway serves HTTP through its own layer: uvicorn's httptools protocol with limits on the "
            "request head and body, each answer sent in one write (stock uvicorn makes two: head, then body), "
            "no `server` header. The peers run on stock uvicorn, as their users deploy them, and the targets "
            "are judged against them. The two **control** rows run Starlette + PyJWT and FastAPI + PyJWT on "
            "the gateway's layer instead, to show how much of the difference is that layer.",
            "- The peers validate `a` and `b` as floats, as the gateway's type hints do, so all answer "
            '`{"results": 3.0, "valid": true}`.',
            "- gunicorn's sync worker closes the connection after every response, so the Django stack pays a TCP "
            "connect per request: that is how that stack is deployed.",
            "",
            "## Gateway cold start by module count",
            "",
            "`python gateway.py --modules <temp dir>` (security off), each generated module exposing two typed "
            "functions; after one untimed start that compiles them; idle RSS after the last start.",
            "",
            *self.module_table(),
            "",
            *self.micro_section(),
            *self.soak_section(),
            "## Every measured run",
            "",
            *self.per_round(),
            "",
        ]
        return "\n".join(lines)


#### CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every stack, in alternating order (3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run (10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each run (3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--samples", type=int, default=5, help="cold starts per stack, median reported (5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="for development: 1 round, 2 s runs, 1 s warm-up, 1 cold-start sample, writes bench/out/RESULTS-quick.md",
    )
    parser.add_argument("--stacks", default="", help=f"comma-separated subset of: {', '.join(BY_KEY)}")
    parser.add_argument(
        "--output", type=Path, help="the report (bench/RESULTS.md; --quick: bench/out/RESULTS-quick.md)"
    )
    parser.add_argument("--check-lua", action="store_true", help="only test auth.lua against the plain Starlette peer")
    parser.add_argument(
        "--no-soak", dest="soak", action="store_false", help="skip the 2 minutes of sustained load (bench/soak.py)"
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration, opts.warmup, opts.samples, opts.soak = 1, 2.0, 1.0, 1, False
    opts.output = opts.output or (OUT / "RESULTS-quick.md" if opts.quick else BENCH / "RESULTS.md")
    if opts.output == BENCH / "RESULTS.md" and (opts.rounds < 2 or opts.samples < 3 or not opts.soak or opts.stacks):
        # The kept results are what the issue judges: every stack and the soak, at least two
        # rounds and a median of at least three cold starts.
        parser.error("bench/RESULTS.md takes every stack, the soak, --rounds >= 2 and --samples >= 3; "
                     "write a partial run elsewhere with --output")  # fmt: skip
    unknown = set(filter(None, opts.stacks.split(","))) - set(BY_KEY)
    if unknown:
        parser.error(f"unknown stacks: {', '.join(sorted(unknown))}")
    return opts


def check_lua(opts: argparse.Namespace) -> int:
    """auth.lua against the plain Starlette peer (it ignores the header) with dummy values.

    Checks the three paths: a file of distinct values (one per request, never exhausted, 0
    errors), a single value (reused), and a supply too small (reported as exhausted).
    """
    stack = BY_KEY["starlette"]
    failures = 0
    with running(stack, free_port()) as (server, _):
        for name, values, expect_exhausted in (
            ("distinct", [f"Dummy value-{i}" for i in range(200_000)], False),
            ("single", ["Bearer dummy"], False),
            ("too-few", [f"Dummy value-{i}" for i in range(100)], True),
        ):
            result = wrk(server.port, values, 2.0, opts.connections, f"check-{name}")
            ok = (result.exhausted > 0) == expect_exhausted and (expect_exhausted or result.errors == 0)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:9} values={len(values):>7,} requests={result.requests:>7,} "
                  f"errors={result.errors} exhausted={result.exhausted} req/s={result.rps:,.0f}")  # fmt: skip
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    global JWT
    opts = parse_args(argv)
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # keep this script's own work off the server's CPU
    OUT.mkdir(exist_ok=True)
    JWT = jwt_token()
    if opts.check_lua:
        return check_lua(opts)
    selected = [BY_KEY[k] for k in opts.stacks.split(",") if k] if opts.stacks else list(STACKS)
    started_at = datetime.datetime.now(datetime.UTC)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu_start = cpu_times()

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    unavailable: dict[str, str] = {}
    for stack in selected:
        try:
            require_available(stack, f"http://{HOST}:{free_port()}")
        except NotAvailable as exc:
            unavailable[stack.key] = "not available yet"
            say(f"cold start {stack.key}: not available yet ({exc})")
    starts = cold_starts([s for s in selected if s.key not in unavailable], opts.samples)
    for key, cold in starts.items():
        say(f"cold start {key}: {cold.median * 1000:.0f} ms, idle RSS {cold.idle_rss_mb:.1f} MB")

    module_starts: dict[int, ColdStart] = {}
    if any(s.key.startswith("gateway") for s in selected):
        for count in (1, 100, 1000):
            with tempfile.TemporaryDirectory(prefix="gateway-bench-modules-") as folder:
                generate_modules(Path(folder), count)
                module_starts[count] = cold_starts(
                    [BY_KEY["gateway_off"]], opts.samples, modules=folder, expect_functions=2 * count
                )["gateway_off"]
            say(f"cold start with {count:,} generated modules: {module_starts[count].median * 1000:.0f} ms")

    runs: dict[str, list[Run]] = {stack.key: [] for stack in selected}
    for round_no in range(1, opts.rounds + 1):
        order = selected if round_no % 2 else selected[::-1]
        for stack in order:
            if stack.key in unavailable:
                continue
            # Sizes the STT1 warm-up's token supply: this stack's best rate so far, else anyone's.
            seen = [r.wrk.rps for r in runs[stack.key]] or [r.wrk.rps for rs in runs.values() for r in rs]
            hint = max(seen) if seen else TOKENS_PER_SECOND_GUESS
            try:
                run = load_run(stack, round_no, opts, hint)
            except NotAvailable as exc:
                unavailable[stack.key] = "not available yet"
                say(f"round {round_no} {stack.key}: not available yet ({exc})")
                continue
            runs[stack.key].append(run)
            w = run.wrk
            say(f"round {round_no} {stack.key}: {w.rps:,.0f} req/s, p50 {w.p50_ms:.2f} ms, p99 {w.p99_ms:.2f} ms, "
                f"errors {w.errors}, RSS {run.rss_mb:.1f} MB")  # fmt: skip
            time.sleep(1.0)

    micro = None
    if any(s.key == "gateway_stt1" for s in selected):
        micro = micro_stt1()
        say(f"verify + replay + sign, in process: median {micro['memory']['median']:.1f} us")

    soak = None
    if opts.soak and runs.get("gateway_stt1"):
        say("soak: 2 minutes of STT1 load (bench/soak.py) ...")
        soak = run_soak(opts, max(r.wrk.rps for r in runs["gateway_stt1"]))
        say(f"soak: {'PASS' if soak['passed'] else 'FAIL'}, written to {soak['path']}")

    loads = (load_start, " ".join(f"{x:.2f}" for x in os.getloadavg()))
    steal = steal_share(cpu_start, cpu_times())
    report = Report(opts, runs, unavailable, starts, module_starts, started_at, loads, micro, steal, soak)
    opts.output.write_text(report.render())
    say(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
