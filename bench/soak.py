"""Sustained authenticated load on the gateway, judged: zero errors, RSS growth under 10% after a
warm-up that reaches the steady state, and a replay store that stays within its window.

    .venv/bin/python bench/soak.py                    # 2 min of wrk load; rewrites bench/SOAK.md
    .venv/bin/python bench/soak.py --seconds 600      # longer (--warmup stays 60 s)
    .venv/bin/python bench/soak.py --load python --speed 10 --seconds 30 --warmup 12 --connections 4   # CI

The gateway serves the example modules with STT1 on and the memory replay store, built as
`python gateway.py` builds it at its defaults (log level info, access log on), by
`bench/soak.py serve`, which adds one thread: every second it appends the store's entry count,
the server's clock and the process's RSS to a file. Every request is `POST /rest/add/` with its
own token.

- `--load wrk` (default): the server on CPU 0, wrk on CPU 1. wrk cannot mint, so the tokens are
  minted before the server starts, in segments of 10 s whose tokens carry the iat of their
  segment's middle (a token is good 45 s either side of its iat).
- `--load python`: threads of this process, each request minted as it is sent and its answer's
  token verified. Slower than wrk, but needs no wrk and works with --speed.
- `--speed S`: the server's clock (token windows, replay-store expiry, time-step keys) runs S
  times faster than real time from a shared epoch, and the load mints with the same clock, so
  the store's 50 s window passes in 50/S s and its steady state comes S times sooner. Nothing
  else changes: the same code paths, the same store, a real server process.

The verdict, printed as PASS or FAIL and returned as the exit status (0 or 1):
1. errors: every answer is a 200 with the right body (and, python load, a token that verifies);
2. RSS: no sample after the warm-up is 10% or more above the highest the warm-up reached,
   once the replay store's own growth since then is taken off (its entries are bounded by
   criterion 3); and the warm-up must reach the steady state: by its end the first jtis are
   past their expiry, so the store has dropped them (criterion 3 checks it). (The store is a
   Python set. CPython rebuilds its table as purged jtis leave dummy slots, at twice the jtis it
   holds then, rounded up to a power of two: around 2**19 jtis, about 10,000 req/s, one rebuild
   makes it 32 MB and the next may make it 16 MB again. Two runs at 4926546 and 59de32f showed
   that step after the warm-up, +16.7 MB of RSS with +12.8 MB of the store's own, and at
   59de32f the step back. Growth beyond the store is what a leak elsewhere would show; the
   raw growth is reported beside it.)
3. replay store: at every sample during the load its entry count lies between the requests it
   must still remember (answered, iat + 50 >= now) and those it may (sent, iat >= now - 50 -
   SLACK): it holds one window of requests, never more, and forgets nothing early.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run  # noqa: E402 (bench/run.py: wrk, its output, /healthz, RSS)

import security  # noqa: E402

GROWTH_LIMIT = 0.10
# A jti is remembered until iat + REPLAY_TTL and dropped by the first purge after that; purges
# come with inserts, at most once a (server) second. SLACK server seconds cover a pause of the
# load (between wrk segments, a stalled load thread) during which nothing is purged.
SLACK = 10
# The count is read just after ``at``: a GIL switch or two later at worst (5 ms each).
GRACE = 0.05
SEGMENT_SECONDS = 10  # wrk: one token file, one iat, per segment
LEAD = 15  # wrk: seconds, beyond the minting's own, before the load (the server starts in them)
REPORT_EVERY = 1.0  # real seconds between two samples of the server


#### Clock


class Clock:
    """Real time, or real time ``speed`` times faster from ``epoch``: the server and the load
    build the same one from the same two numbers, so their clocks agree."""

    def __init__(self, speed: float = 1.0, epoch: float | None = None) -> None:
        self.speed = speed
        self.epoch = time.time() if epoch is None else epoch

    def __call__(self) -> float:
        return self.epoch + (time.time() - self.epoch) * self.speed


#### Criteria


@dataclasses.dataclass(frozen=True)
class Sample:
    """What the server reported about itself: read in this order, real time ``at``, the count of
    ``entries`` its replay store remembers, its clock ``now``; then its RSS."""

    at: float
    now: float
    entries: int
    rss_mb: float
    store_bytes: int = 0  # the replay store's own memory: see _store_bytes


@dataclasses.dataclass
class Batch:
    """Requests whose tokens share one iat: ``sent`` of them, the first at ``first_sent``, and
    ``ok`` answered 200 correctly, the last by ``last_done`` (real times)."""

    iat: int
    sent: int = 0
    ok: int = 0
    first_sent: float = math.inf
    last_done: float = 0.0


@dataclasses.dataclass
class Verdict:
    requests: int
    errors: int
    seconds: float  # of load
    warmup_rss: float
    end_rss: float
    max_rss: float
    growth: float  # max RSS after the warm-up over the max RSS up to its end, minus 1
    growth_beyond_store: float  # the same, each sample less the replay store's own growth since the warm-up
    steady: bool  # the warm-up outlasted the first jtis' window: the store was at its steady state
    warmup_entries: int  # the store's peak up to the end of the warm-up
    max_entries: int
    max_allowed: int  # the upper bound at that sample: requests sent within the window
    store_failures: list[str]

    @property
    def passed(self) -> bool:
        return (
            self.requests > 0
            and self.errors == 0
            and self.steady
            and self.growth_beyond_store < GROWTH_LIMIT
            and not self.store_failures
        )

    def lines(self) -> list[str]:
        return [
            f"- verdict: **{'PASS' if self.passed else 'FAIL'}** (zero errors; RSS growth after warm-up, beyond "
            f"the replay store's own, < {GROWTH_LIMIT:.0%}; replay store within its window)",
            f"- requests: {self.requests:,} in {self.seconds:.0f} s ({self.requests / self.seconds:,.0f} req/s), "
            f"errors: {self.errors}",
            f"- RSS: {self.warmup_rss:.1f} MB by the end of the warm-up, {self.max_rss:.1f} MB at most after it, "
            f"{self.end_rss:.1f} MB at the end: growth {self.growth:+.2%}, "
            f"{self.growth_beyond_store:+.2%} beyond the replay store's own"
            + ("" if self.steady else " (NOT at the steady state: the first jtis outlived the warm-up)"),
            f"- replay store: at most {self.max_entries:,} jtis ({self.warmup_entries:,} by the end of the warm-up), "
            f"against {self.max_allowed:,} sent within the window then"
            + "".join(f"; {failure}" for failure in self.store_failures[:3]),
        ]


def judge(samples: Sequence[Sample], batches: Sequence[Batch], errors: int, warmup_end: float) -> Verdict:
    """Apply the three criteria of the module's docstring to one run."""
    load_start = min(batch.first_sent for batch in batches)
    load_end = max(batch.last_done for batch in batches)
    during = [s for s in samples if load_start <= s.at <= load_end]
    after = [s for s in during if s.at >= warmup_end]
    if not after:
        raise ValueError("no sample of the server after the warm-up: the load was shorter than the warm-up")
    warm = after[0]
    store_failures = []
    max_entries, max_allowed = 0, 0
    for sample in during:
        now = int(sample.now)
        may = sum(
            b.sent for b in batches if b.first_sent <= sample.at + GRACE and b.iat >= now - security.REPLAY_TTL - SLACK
        )
        must = sum(b.ok for b in batches if b.last_done <= sample.at and b.iat + security.REPLAY_TTL >= now)
        if sample.entries > may:
            store_failures.append(f"{sample.entries:,} jtis at t={sample.at - load_start:.0f} s, over the {may:,} sent")
        if sample.entries < must:
            store_failures.append(f"{sample.entries:,} jtis at t={sample.at - load_start:.0f} s: {must:,} unexpired")
        if sample.entries >= max_entries:
            max_entries, max_allowed = sample.entries, may
    # The reference is the highest RSS the warm-up reached: a set rebuilding its table holds the
    # old and the new one for a moment, so one sample can dip or peak by the table's size.
    warmup_rss = max(s.rss_mb for s in during if s.at <= warm.at)
    max_rss = max(s.rss_mb for s in after)
    warmup_store_mb = max(s.store_bytes for s in during if s.at <= warm.at) / 1e6
    beyond_store = max(s.rss_mb - max(0.0, s.store_bytes / 1e6 - warmup_store_mb) for s in after)
    return Verdict(
        requests=sum(b.ok for b in batches),
        errors=errors,
        seconds=load_end - load_start,
        warmup_rss=warmup_rss,
        end_rss=after[-1].rss_mb,
        max_rss=max_rss,
        growth=max_rss / warmup_rss - 1,
        growth_beyond_store=beyond_store / warmup_rss - 1,
        # The first jtis were past their expiry: the load's inserts have purged them (the store
        # checks above see to that), so the store is at its plateau, or in its sawtooth.
        steady=int(warm.now) > min(b.iat for b in batches) + security.REPLAY_TTL + 1,
        warmup_entries=max(s.entries for s in during if s.at <= warm.at),
        max_entries=max_entries,
        max_allowed=max_allowed,
        store_failures=store_failures,
    )


#### The server: `bench/soak.py serve`


def serve(opts: argparse.Namespace) -> None:
    """The gateway as `python gateway.py` builds it at its defaults, on ``opts.speed``'s clock,
    plus the reporting thread."""
    import gateway_app as gateway

    clock = Clock(opts.speed, opts.epoch)
    settings = gateway.Settings(port=opts.port, db=str(opts.db), modules=str(opts.modules))
    gateway._configure_logging(settings.log_level)
    store = security.MemoryReplayStore(clock=clock)
    keystore = security.Keystore(settings.db)
    guard = security.Security(keystore, store, settings.audience, clock=clock)
    app = gateway.create_app(settings.modules, settings=settings, security=guard)
    threading.Thread(target=_report, args=(store, clock, opts.stats), daemon=True).start()
    gateway.serve(app)


def _report(store: security.MemoryReplayStore, clock: Clock, path: Path) -> None:
    with path.open("a") as out:
        while True:
            at = time.time()  # then the count, then the clock: see Sample
            entries = len(store)
            sample = Sample(at, clock(), entries, run.rss_mb(os.getpid()), _store_bytes(store))
            out.write(json.dumps(dataclasses.asdict(sample)) + "\n")
            out.flush()
            time.sleep(REPORT_EVERY)


def _store_bytes(store: security.MemoryReplayStore) -> int:
    """The memory the store's own structures hold: its set's table, one bytes object per key (every
    key is cut to 16 bytes: 49 bytes, 64 with the allocator's 16-byte rounding) and the expiry
    buckets' dict and lists. Under the store's lock, so that no insert moves them meanwhile."""
    key_bytes = (sys.getsizeof(bytes(16)) + 15) // 16 * 16
    with store._lock:
        buckets = list(store._buckets.values())
        held = sys.getsizeof(store._seen) + len(store._seen) * key_bytes + sys.getsizeof(store._buckets)
        return held + sum(sys.getsizeof(bucket) for bucket in buckets)


def read_samples(path: Path) -> list[Sample]:
    return [Sample(**json.loads(line)) for line in path.read_text().splitlines() if line]


def enrol(home: Path, origin: str) -> security.Credential:
    """A fresh keystore in ``home`` with one tenant, ``soak``, and its credential for ``origin``."""
    home.mkdir(parents=True, exist_ok=True)
    for old in home.glob("gateway.db*"):
        old.unlink()
    keystore = security.Keystore(home / "gateway.db")
    kid, k = keystore.add_tenant("soak")
    keystore.close()
    return security.Credential(stt=1, url=origin, tid="soak", kid=kid, k=security.b64encode(k))


@contextlib.contextmanager
def serving(port: int, home: Path, clock: Clock, pin: bool) -> Iterator[Path]:
    """Run `bench/soak.py serve` until the block ends; yield the file its samples go to."""
    stats = home / "soak-samples.jsonl"
    stats.unlink(missing_ok=True)
    argv = [
        sys.executable, str(Path(__file__).resolve()), "serve", "--port", str(port), "--db", str(home / "gateway.db"),
        "--stats", str(stats), "--speed", repr(clock.speed), "--epoch", repr(clock.epoch),
    ]  # fmt: skip
    if pin:
        argv = ["taskset", "-c", run.SERVER_CPU, *argv]
    log = home / "soak-server.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while run.get_status(port) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the soak server did not start; see {run.log_tail(log)}")
            time.sleep(0.05)
        # The memory store refuses tokens from the server's boot second (PROTOCOL.md 3.3): the
        # first ones the load mints must come from a later second.
        ready = clock()
        while clock() < math.ceil(ready):
            time.sleep(0.01)
        yield stats
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


#### Load: Python threads


@dataclasses.dataclass
class Load:
    batches: list[Batch]
    errors: int
    first_error: str = ""


def python_load(port: int, credential: security.Credential, clock: Clock, until: float, connections: int) -> Load:
    """`POST /rest/add/` from ``connections`` threads until real time ``until``, each request
    minted as it is sent (iat from ``clock``); an answer counts only if it is 200, carries
    ``{"results": 3.0, "valid": true}`` and a gateway token that verifies for that request."""
    k = security.b64decode(credential.k)
    c2s = security.DirectionKey(k, "c2s", credential.tid, credential.kid)
    s2c = security.DirectionKey(k, "s2c", credential.tid, credential.kid)
    implicit = security.request_assertion(credential.url, "POST", run.PATH.encode(), b"application/json", run.BODY)
    lock = threading.Lock()
    load = Load([], 0)
    batches: dict[int, Batch] = {}

    def worker() -> None:
        mine: dict[int, Batch] = {}
        errors, first_error = 0, ""
        conn = http.client.HTTPConnection(run.HOST, port, timeout=10)
        while time.time() < until:
            iat = int(clock())
            jti = security.new_jti()
            token = security.mint(c2s, iat, security.RequestClaims(jti=jti), implicit)
            batch = mine.setdefault(iat, Batch(iat))
            batch.sent += 1
            batch.first_sent = min(batch.first_sent, time.time())
            try:
                headers = {"Content-Type": "application/json", "Authorization": f"STT1 {token}"}
                conn.request("POST", run.PATH, run.BODY, headers)
                response = conn.getresponse()
                body = response.read()
                answer = security.response_assertion(credential.url, jti, response.status, b"application/json", body)
                if response.status != 200 or json.loads(body) != {"results": 3, "valid": True}:
                    raise ValueError(f"answered {response.status} {body[:200]!r}")
                security.open_token(s2c, response.getheader("STT1-Response") or "", answer)
            except (OSError, http.client.HTTPException, ValueError, security.InvalidToken) as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(run.HOST, port, timeout=10)
                continue
            batch.ok += 1
            batch.last_done = time.time()
        conn.close()
        with lock:
            load.errors += errors
            load.first_error = load.first_error or first_error
            for iat, batch in mine.items():
                total = batches.setdefault(iat, Batch(iat))
                total.sent += batch.sent
                total.ok += batch.ok
                total.first_sent = min(total.first_sent, batch.first_sent)
                total.last_done = max(total.last_done, batch.last_done)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load.batches = sorted(batches.values(), key=lambda batch: batch.iat)
    return load


#### Load: wrk


def _mint(args: tuple[security.Credential, int, int]) -> str:
    credential, iat, count = args
    key = security.DirectionKey(security.b64decode(credential.k), "c2s", credential.tid, credential.kid)
    implicit = security.request_assertion(credential.url, "POST", run.PATH.encode(), b"application/json", run.BODY)
    return "".join(
        f"STT1 {security.mint(key, iat, security.RequestClaims(jti=security.new_jti()), implicit)}\n"
        for _ in range(count)
    )


def mint_segments(credential: security.Credential, seconds: float, rate: float, out: Path) -> tuple[float, list[Path]]:
    """The load's start, and one token file per segment, every token with the iat of its segment's
    middle. The start leaves time to mint them all (timed on a sample) and to start the server."""
    starts = range(0, math.ceil(seconds), SEGMENT_SECONDS)
    segments = [min(SEGMENT_SECONDS, seconds - at) for at in starts]
    counts = [math.ceil(rate * length * 1.4) + 1000 for length in segments]
    began = time.perf_counter()
    _mint((credential, int(time.time()), 2000))
    per_token = (time.perf_counter() - began) / 2000
    start = time.time() + sum(counts) * per_token / 2 * 1.5 + LEAD
    files = []
    with multiprocessing.Pool(2) as pool:
        for i, (length, count) in enumerate(zip(segments, counts, strict=True)):
            iat = int(start + i * SEGMENT_SECONDS + length / 2)
            chunks = pool.map(_mint, [(credential, iat, count // 8 + 1)] * 8)
            path = out / f"soak-tokens-{i}.txt"
            path.write_text("".join(chunks))
            files.append(path)
    return start, files


def wrk_load(port: int, files: list[Path], start: float, seconds: float, connections: int) -> Load:
    """The segments back to back, each its own wrk run on the load CPU."""
    load = Load([], 0)
    for i, path in enumerate(files):
        length = min(SEGMENT_SECONDS, seconds - i * SEGMENT_SECONDS)
        argv = ["taskset", "-c", run.LOAD_CPU, "wrk", "--latency", "-t1", f"-c{connections}", f"-d{length:g}s",
                "-s", str(run.LUA), f"http://{run.HOST}:{port}{run.PATH}", "--", str(path), "1",
                run.BODY.decode()]  # fmt: skip
        began = time.time()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=length + 120, check=False)
        result = run.parse_wrk(done.stdout)
        # wrk counts answered requests; up to one per connection was still in flight when it
        # stopped and may have reached the store: counted as sent.
        iat = int(start + i * SEGMENT_SECONDS + length / 2)
        ok = result.requests - result.non2xx
        load.batches.append(Batch(iat, result.requests + connections, ok, began, time.time()))
        load.errors += result.errors
        if result.errors and not load.first_error:
            load.first_error = f"segment {i}: {result}"
    return load


#### Report and CLI


def report(
    opts: argparse.Namespace, verdict: Verdict, load: Load, samples: Sequence[Sample], load_start: float, zero: float
) -> str:
    """The markdown of one run; ``zero``: the server's clock when the load started."""
    git = ["git", "-C", str(run.ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "gateway.py", "gateway_app.py", "security.py", "modules", "bench",
         *run.OUTPUTS],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    load_text = (
        f"wrk -t1 -c{opts.connections} in segments of {SEGMENT_SECONDS} s; server on CPU 0, wrk on CPU 1"
        if opts.load == "wrk"
        else f"{opts.connections} Python threads, each request minted as sent and its answer verified"
    )
    speed = "" if opts.speed == 1 else f"; the server's clock at {opts.speed:g}x real time"
    during = [s for s in samples if s.at >= load_start]
    step = 1 if len(during) <= 40 else 5
    shown = during[::step] if during[-1] in during[::step] else [*during[::step], during[-1]]
    lines = [
        "# Soak: sustained authenticated load",
        "",
        f"Generated by `{' '.join(['python bench/soak.py', *sys.argv[1:]])}`; rerun it to regenerate this file.",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; gateway at {commit.stdout.strip()}"
        + (" (+ uncommitted changes)" if dirty.stdout.strip() else ""),
        f"- load: {opts.seconds:g} s of `POST /rest/add/`, each request with its own STT1 token ({load_text}){speed}; "
        f"warm-up {opts.warmup:g} s",
        *verdict.lines(),
        *([f"- first error: {load.first_error}"] if load.first_error else []),
        f"- RSS before the load: {samples[0].rss_mb:.1f} MB",
        *_per_entry(samples, verdict),
        "",
        f"Samples{'' if step == 1 else f' (one in {step})'}; t and the server's clock from the start of the load.",
        "",
        "| t (s) | server clock (s) | replay store (jtis) | replay store (MB) | RSS (MB) |",
        "|--:|--:|--:|--:|--:|",
        *[
            f"| {s.at - load_start:.0f} | {s.now - zero:.0f} | {s.entries:,} | {s.store_bytes / 1e6:.1f} "
            f"| {s.rss_mb:.1f} |"
            for s in shown
        ],
        "",
    ]
    return "\n".join(lines)


def per_entry(samples: Sequence[Sample], verdict: Verdict) -> dict[str, float] | None:
    """Bytes per remembered jti: the store's own (at its fullest sample), and all the RSS the load
    added by the end of the warm-up over the jtis held then (an upper bound: everything counts)."""
    fullest = max(samples, key=lambda s: s.entries)
    if not fullest.entries:
        return None
    return {
        "store_bytes_per_jti": fullest.store_bytes / fullest.entries,
        "store_mb": fullest.store_bytes / 1e6,
        "jtis": fullest.entries,
        "rss_bytes_per_jti": (verdict.warmup_rss - samples[0].rss_mb) * 1e6 / max(verdict.warmup_entries, 1),
    }


def _per_entry(samples: Sequence[Sample], verdict: Verdict) -> list[str]:
    figures = per_entry(samples, verdict)
    if figures is None:
        return []
    return [
        f"- replay store memory: {figures['store_bytes_per_jti']:.0f} bytes per jti "
        f"({figures['store_mb']:.1f} MB for {figures['jtis']:,} jtis: set table, 16-byte keys, expiry "
        f"buckets); the RSS the load added by the end of the warm-up is {figures['rss_bytes_per_jti']:.0f} bytes "
        "per jti held then",
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--seconds", type=float, default=120, help="of load, warm-up included")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before RSS is the reference")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--load", choices=["wrk", "python"], default="wrk")
    parser.add_argument("--speed", type=float, default=1.0, help="the server's clock runs this many times faster")
    parser.add_argument("--rate", type=float, default=8000, help="wrk: req/s to mint tokens for (x1.4)")
    parser.add_argument("--home", type=Path, default=run.OUT / "soak", help="keystore, samples and server log")
    parser.add_argument("--output", type=Path, default=run.BENCH / "SOAK.md")
    parser.add_argument("--json", type=Path, help="also write the verdict here")
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["serve"]:
        serve_parser = argparse.ArgumentParser()
        for name, kind in (("--port", int), ("--db", Path), ("--stats", Path), ("--speed", float), ("--epoch", float)):
            serve_parser.add_argument(name, type=kind, required=True)
        serve_parser.add_argument("--modules", type=Path, default=run.ROOT / "modules")
        serve(serve_parser.parse_args(sys.argv[2:]))
        return 0
    opts = _parser().parse_args(argv)
    if opts.load == "wrk" and opts.speed != 1:
        raise SystemExit("--speed needs --load python: wrk's tokens are minted before the load starts")
    port = run.free_port()
    credential = enrol(opts.home, f"http://{run.HOST}:{port}")
    clock = Clock(opts.speed)
    files: list[Path] = []
    if opts.load == "wrk":
        began = time.time()
        load_start, files = mint_segments(credential, opts.seconds, opts.rate, opts.home)
        print(f"minted {sum(1 for f in files for _ in f.open()):,} tokens in {time.time() - began:.0f} s")
        os.sched_setaffinity(0, {int(run.LOAD_CPU)})
    with serving(port, opts.home, clock, pin=opts.load == "wrk") as stats:
        if opts.load == "wrk":
            if time.time() > load_start + 5:  # the tokens' iats were set for a start that has passed
                raise SystemExit(f"minting and start-up overran the lead by {time.time() - load_start:.0f} s: rerun")
            time.sleep(max(0.0, load_start - time.time()))
            load = wrk_load(port, files, load_start, opts.seconds, opts.connections)
        else:
            load_start = time.time()
            load = python_load(port, credential, clock, load_start + opts.seconds, opts.connections)
        time.sleep(REPORT_EVERY)  # the server's last sample of the load
    samples = read_samples(stats)
    for path in files:
        path.unlink(missing_ok=True)
    verdict = judge(samples, load.batches, load.errors, load_start + opts.warmup)
    text = report(opts, verdict, load, samples, load_start, clock.epoch + (load_start - clock.epoch) * clock.speed)
    opts.output.write_text(text)
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    **dataclasses.asdict(verdict),
                    "passed": verdict.passed,
                    "lines": verdict.lines() + _per_entry(samples, verdict),
                    "rss_before_mb": samples[0].rss_mb,
                    "per_entry": per_entry(samples, verdict),
                }
            )
        )
    print("\n".join(text.splitlines()[4:10]))
    print("PASS" if verdict.passed else "FAIL")
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
