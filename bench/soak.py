"""Sustained authenticated load on the gateway, watching its memory: does the replay store stay
bounded? Run: .venv/bin/python bench/soak.py [--seconds 120] [--connections 32]

The gateway runs at its defaults (STT1 on, memory replay store) pinned to CPU 0; wrk on CPU 1
sends `POST /rest/add/`, every request with its own token. A token is good for 45 s either side
of its iat, so the load is split into segments of at most 60 s whose tokens carry an iat in the
middle of their segment; all tokens are minted before the gateway starts (with both CPUs), so
nothing else runs during the load. RSS is read every 5 s. Writes bench/SOAK.md.

Expected shape: RSS climbs for about 95 s (every jti is remembered until iat + 50, and iats
span +-45 s), then levels off, since the store purges what has expired. Reused helpers come
from bench/run.py.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run  # noqa: E402 (bench/run.py: processes, wrk, parsing)

import security  # noqa: E402

SEGMENT_SECONDS = 60  # a token's window is 90 s: a segment's tokens must all stay valid through it
LEAD = 40  # seconds between minting and the start of the load (the gateway's start fits in it)


def _mint(args: tuple[str, str, int, int]) -> str:
    cred_path, origin, iat, count = args
    import msgspec

    credential = msgspec.structs.replace(security.read_credential(cred_path), url=origin)
    target, body = run.PATH.encode(), run.BODY
    return "".join(
        f"STT1 {security.sign_request(credential, 'POST', target, b'application/json', body, iat)[0]}\n"
        for _ in range(count)
    )


def mint_segments(origin: str, start: float, seconds: int, rate: float) -> list[Path]:
    """One token file per segment, every token with the iat of its segment's middle."""
    run.stt1_tokens(0, origin)  # makes sure the tenant "bench" and its credential exist
    cred = str(run.OUT / "bench-credential.json")
    files = []
    segments = math.ceil(seconds / SEGMENT_SECONDS)
    with multiprocessing.Pool(2) as pool:
        for i in range(segments):
            length = min(SEGMENT_SECONDS, seconds - i * SEGMENT_SECONDS)
            iat = int(start + i * SEGMENT_SECONDS + length / 2)
            count = math.ceil(rate * length * 1.4) + 1000
            chunks = pool.map(_mint, [(cred, origin, iat, count // 8 + 1)] * 8)
            path = run.OUT / f"soak-tokens-{i}.txt"
            path.write_text("".join(chunks))
            files.append(path)
    return files


def bytes_per_entry(n: int = 200_000) -> float:
    """What one remembered jti costs in the memory replay store (tracemalloc)."""
    store = security.MemoryReplayStore()
    tracemalloc.start()
    now = int(time.time())
    for i in range(n):
        store.check_and_insert(os.urandom(32), now + 50 + i // 5000)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return used / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=8000, help="req/s to mint tokens for (x1.4)")
    parser.add_argument("--output", type=Path, default=run.BENCH / "SOAK.md")
    opts = parser.parse_args()
    run.OUT.mkdir(exist_ok=True)
    run.JWT = run.jwt_token()
    stack = run.BY_KEY["gateway_stt1"]
    port = run.free_port()
    origin = f"http://{run.HOST}:{port}"
    started_at = datetime.datetime.now(datetime.UTC)
    load_start = time.time() + LEAD
    files = mint_segments(origin, load_start, opts.seconds, opts.rate)
    print(f"minted {sum(1 for f in files for _ in f.open())} tokens in {time.time() - (load_start - LEAD):.0f} s")
    os.sched_setaffinity(0, {int(run.LOAD_CPU)})
    samples: list[tuple[float, float]] = []
    results = []
    with run.running(stack, port) as (server, _):
        pid = run.serving_pid(server)
        idle = run.rss_mb(pid)
        time.sleep(max(0.0, load_start - time.time()))
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(5):
                samples.append((time.time() - load_start, run.rss_mb(pid)))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for i, path in enumerate(files):
            length = min(SEGMENT_SECONDS, opts.seconds - i * SEGMENT_SECONDS)
            argv = ["taskset", "-c", run.LOAD_CPU, "wrk", "--latency", "-t1", f"-c{opts.connections}",
                    f"-d{length}s", "-s", str(run.LUA), f"{origin}{run.PATH}", "--", str(path), "1",
                    run.BODY.decode()]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, timeout=length + 120, check=False)
            results.append(run.parse_wrk(done.stdout))
        stop.set()
        watcher.join()
        final = run.rss_mb(pid)
    per_entry = bytes_per_entry()
    after_warmup = [rss for t, rss in samples if t >= 20]
    plateau = [rss for t, rss in samples if t >= 100]
    total = sum(r.requests for r in results)
    errors = sum(r.errors for r in results)
    lines = [
        "# Soak: sustained authenticated load",
        "",
        f"Generated by `python bench/soak.py --seconds {opts.seconds} --connections {opts.connections}`; "
        "rerun it to regenerate this file.",
        "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC; gateway at {run.machine()['gateway commit']}",
        f"- load: {opts.seconds} s of `POST /rest/add/`, each request with its own STT1 token, "
        f"wrk -t1 -c{opts.connections}; server on CPU 0, wrk on CPU 1",
        f"- requests: {total:,}, errors: {errors}, mean {total / opts.seconds:,.0f} req/s "
        f"(segments: {', '.join(f'{r.rps:,.0f}' for r in results)} req/s; "
        f"p99 {', '.join(f'{r.p99_ms:.2f}' for r in results)} ms)",
        f"- RSS: idle {idle:.1f} MB; after 20 s {after_warmup[0] if after_warmup else float('nan'):.1f} MB; "
        f"end {final:.1f} MB; growth after warm-up "
        f"{(final / after_warmup[0] - 1) * 100 if after_warmup else float('nan'):+.1f}%",
        f"- plateau (t >= 100 s, once the first jtis expire): min {min(plateau, default=float('nan')):.1f}, "
        f"median {statistics.median(plateau) if plateau else float('nan'):.1f}, "
        f"max {max(plateau, default=float('nan')):.1f} MB",
        f"- memory replay store: {per_entry:.0f} bytes per remembered jti (tracemalloc over 200k inserts); "
        f"at {total / opts.seconds:,.0f} req/s at most ~95 s of jtis are live: "
        f"~{total / opts.seconds * 95 * per_entry / 1e6:.0f} MB",
        "",
        "| t (s) | RSS (MB) |",
        "|--:|--:|",
        *[f"| {t:.0f} | {rss:.1f} |" for t, rss in samples],
        "",
    ]
    opts.output.write_text("\n".join(lines))
    print("\n".join(lines[4:10]))
    for path in files:
        path.unlink(missing_ok=True)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
