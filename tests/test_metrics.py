"""GET /metrics: off unless asked for; then Prometheus text that a Prometheus parser reads, with
numbers that match what was sent, labels that stay bounded, and totals that add up over workers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from test_cli import start, stop, wait_healthy

import client as stt1_client
import gateway_app as gateway
import security
from conftest import FIXTURES, free_port, secured_server


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the answer, keyed by (sample name, sorted labels)."""
    answer = httpx.get(f"{url}/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests(samples: dict, function: str, status: str, tenant: str) -> float:  # type: ignore[type-arg]
    key = ("gateway_requests_total", (("function", function), ("status", status), ("tenant", tenant)))
    return samples.get(key, 0.0)


def test_metrics_are_off_unless_asked_for(serve) -> None:  # type: ignore[no-untyped-def]
    gw = serve(gateway.create_app(FIXTURES / "e2e", auth="off", reload=False))
    answer = gw.client.get("/metrics")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_requests_failures_latency_and_the_replay_store_are_counted(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    shutil.copytree(FIXTURES / "e2e", modules)
    with secured_server(modules, tmp_path, metrics=True) as server, stt1_client.Client(server.cred) as api:
        url = server.settings.audience
        assert [api.call("add", 1, b=2), api.call("add", 2, b=2)] == [3, 4]
        try:
            api.call("add", 1)
        except stt1_client.InvalidArguments:
            pass
        token, _ = security.sign_request(
            security.read_credential(server.cred), "POST", b"/rest/add/", b"application/json", b'{"a":1,"b":1}',
            time.time(),
        )  # fmt: skip
        headers = {"Authorization": f"STT1 {token}", "Content-Type": "application/json"}
        assert httpx.post(f"{url}/rest/add/", content=b'{"a":1,"b":1}', headers=headers).status_code == 200
        assert httpx.post(f"{url}/rest/add/", content=b'{"a":1,"b":1}', headers=headers).status_code == 401  # again
        assert httpx.post(f"{url}/rest/add/", content=b'{"a":1,"b":2}', headers=headers).status_code == 401  # altered
        assert httpx.post(f"{url}/rest/add/", json={"a": 1, "b": 1}).status_code == 401  # no token
        assert httpx.post(f"{url}/rest/x{'y' * 40}/", json={}).status_code == 401  # a name no function has

        samples = scrape(url)
        assert requests(samples, "add", "200", "acme") == 3
        assert requests(samples, "add", "422", "acme") == 1
        assert requests(samples, "add", "401", "-") == 3  # refused before a tenant was verified
        assert requests(samples, "-", "401", "-") == 1  # an unknown name never becomes a label
        failures = {dict(labels)["reason"]: value for (name, labels), value in samples.items()
                    if name == "gateway_token_failures_total"}
        assert failures == {reason: 0.0 for reason in security.FAILURE_REASONS} | {
            "replayed": 1.0, "signature": 1.0, "missing": 2.0}
        # The histogram: one observation per answer, cumulative buckets ending in +Inf.
        count = samples[("gateway_request_seconds_count", (("function", "add"),))]
        assert count == 7
        buckets = sorted(
            (float(dict(labels)["le"]), value) for (name, labels), value in samples.items()
            if name == "gateway_request_seconds_bucket" and dict(labels)["function"] == "add"
        )  # fmt: skip
        assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1] == (float("inf"), count)
        assert samples[("gateway_replay_store_entries", ())] == 4  # each verified token id, until it expires
        assert samples[("gateway_functions", ())] == len(server.app.catalog.functions)
        assert (samples[("gateway_refused_modules", ())], samples[("gateway_reloads_total", ())]) == (0, 0)

        (modules / "broken.py").write_text("def oops(:\n")  # the watcher reloads, and refuses it
        deadline = time.monotonic() + 10
        while scrape(url)[("gateway_reloads_total", ())] < 1:
            assert time.monotonic() < deadline, "no reload seen"
            time.sleep(0.05)
        assert scrape(url)[("gateway_refused_modules", ())] == 1


def test_totals_add_up_over_workers(processes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "whoami.py").write_text("import os\n__all_exposed__ = ['pid']\n\n\ndef pid() -> int:\n"
                                        "    return os.getpid()\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.append(process := start("--port", str(port), "--modules", str(tmp_path), "--workers", "2",
                                      "--metrics", "--no-reload"))
    wait_healthy(url, process, seconds=40)
    pids, calls = set(), 0
    while len(pids) < 2 or calls < 20:  # fresh connections, until both workers have answered
        pids.add(httpx.post(f"{url}/rest/pid").json()["results"])
        calls += 1
        assert calls < 500, "one worker answered everything"
    for _ in range(6):  # whichever worker answers the scrape, it counts every worker's calls
        assert requests(scrape(url), "pid", "200", "-") == calls
    stop(process)
