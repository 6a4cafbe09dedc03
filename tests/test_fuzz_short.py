"""The short CI run of the Atheris harnesses: each fuzzes for a few seconds from its seed corpus.

Both run at once, each in its own process through ``fuzz/run.py`` (the documented command), so
the whole costs about SECONDS plus start-up. Replaying the seeds (the regressions included)
comes first in every run; then libFuzzer mutates. A finding, a hang (libFuzzer's -timeout) or a
harness that fails to start is a non-zero exit with the input saved under ``out``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SECONDS = 10


def test_each_harness_runs_clean_from_its_seed_corpus(tmp_path: Path) -> None:
    runs = {
        harness: subprocess.Popen(
            [sys.executable, str(ROOT / "fuzz" / "run.py"), harness, "--seconds", str(SECONDS), "--out", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for harness in ("token", "request")
    }
    for harness, proc in runs.items():
        output, _ = proc.communicate(timeout=SECONDS + 60)
        tail = output[-3000:]
        assert proc.returncode == 0, f"{harness} harness failed:\n{tail}"
        seeds = len(list((ROOT / "fuzz" / "corpus" / harness).iterdir()))
        assert re.search(rf"INFO: +{seeds} files found in .*corpus/{harness}", output), tail  # it read the seeds
        executed = int(re.search(r"stat::number_of_executed_units: (\d+)", output).group(1))  # type: ignore[union-attr]
        assert executed > seeds, f"{harness} ran only {executed} inputs:\n{tail}"
        assert not [p for p in (tmp_path / harness).iterdir() if p.name != "corpus"], f"{harness} left a finding"
