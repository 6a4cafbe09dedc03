"""Run one Atheris harness for a set time on its seed corpus, and say how it went.

    .venv/bin/python fuzz/run.py token --seconds 600
    .venv/bin/python fuzz/run.py request --seconds 600 --out /tmp/fuzz-out

New inputs go to ``<out>/<harness>/corpus`` (the committed seeds in ``fuzz/corpus/<harness>``
are only read), crashes and hangs to ``<out>/<harness>/crash-*`` / ``timeout-*``. The exit status
is libFuzzer's: 0 when the time ran out with no finding. Replay one input with
``.venv/bin/python fuzz/fuzz_<harness>.py <file>``. Anything after ``--`` goes to libFuzzer.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("token", "request")
PER_INPUT_TIMEOUT = 10  # seconds: libFuzzer's hang detector; the request harness has its own 5 s bound


def command(harness: str, seconds: int, out: Path, extra: list[str]) -> list[str]:
    """The libFuzzer command line for one run (the work corpus first: libFuzzer writes there)."""
    work = out / harness / "corpus"
    work.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        str(HERE / f"fuzz_{harness}.py"),
        str(work),
        str(HERE / "corpus" / harness),
        f"-max_total_time={seconds}",
        f"-timeout={PER_INPUT_TIMEOUT}",
        "-rss_limit_mb=2048",
        "-max_len=8192",
        "-print_final_stats=1",
        f"-artifact_prefix={out / harness}/",
    ]
    dictionary = HERE / f"{harness}.dict"
    if dictionary.exists():
        args.append(f"-dict={dictionary}")
    return args + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("harness", choices=HARNESSES)
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="work corpus and findings (default fuzz/out)")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    opts = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args = command(opts.harness, opts.seconds, opts.out, extra)
    print("+", " ".join(args), flush=True)
    started = time.monotonic()
    lines = []
    state = opts.out / opts.harness / "state"  # the harness's keystore; libFuzzer exits without cleaning up
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FUZZ_STATE_DIR": str(state)}
    try:
        with subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
        ) as proc:  # streamed as it comes: a long run shows its progress
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    elapsed = time.monotonic() - started
    output = "".join(lines)
    runs = re.search(r"stat::number_of_executed_units: (\d+)", output)
    executed = int(runs.group(1)) if runs else 0
    findings = sorted(p.name for p in (opts.out / opts.harness).glob("*-*") if p.is_file())
    print(
        f"\n{opts.harness}: {executed} inputs in {elapsed:.0f} s ({executed / max(elapsed, 1e-9):.0f}/s overall), "
        f"exit {proc.returncode}, findings: {', '.join(findings) or 'none'}"
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
