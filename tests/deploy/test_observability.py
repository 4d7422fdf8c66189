"""Metrics as operators get them: promtool on live scrapes, and every dashboard query run by a
real Prometheus against a real server and frontend under load."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from netswap.client import InvalidRequest, SwapClient
from tests.frontend import Frontend
from tests.helpers import PS, TOKENS, ServerProcess, free_port
from tests.nbdenv import require_tools, run

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "netswap-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def require_prometheus() -> None:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        raise RuntimeError("prometheus/promtool missing: `make test` installs Debian's prometheus package")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], t["expr"]) for panel in board["panels"] for t in panel["targets"]]


def concrete(expr: str) -> str:
    """Grafana's variables, as Grafana would fill them for this test's jobs."""
    return (
        expr.replace("$__rate_interval", "15s")
        .replace('"$job"', '"netswap"')
        .replace('"$client_job"', '"netswap-client"')
    )


def test_dashboard_shape() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("throughput", "latency", "batch", "errors", "capacity", "areas", "pool", "in-flight"):
        assert topic in titles, topic


async def test_promtool_and_every_dashboard_query_on_live_data(tmp_path: Path) -> None:
    require_tools()
    require_prometheus()
    server = ServerProcess(tmp_path, tmp_path / "store", "--metrics-listen", "127.0.0.1:0")
    await server.astart()
    nbd = Frontend(tmp_path, server.address, "vm1", "64MiB")
    prom: subprocess.Popen[bytes] | None = None
    try:
        await nbd.start()
        server_metrics = re.findall(r"metrics=(http://\S+)", server.log.read_text())[-1]
        client_metrics = re.findall(r"metrics at (http://\S+)", nbd.log.read_text())[-1]

        # promtool on live scrapes of both
        for url in (server_metrics, client_metrics):
            check = subprocess.run(
                ["promtool", "check", "metrics"], input=get(url), capture_output=True, text=True
            )
            assert check.returncode == 0, f"{url}: {check.stdout}{check.stderr}"

        # a real Prometheus scraping both every second, with the alert rules loaded
        port = free_port()
        rules = tmp_path / "alerts.yml"
        shutil.copy(ALERTS, rules)
        config = tmp_path / "prometheus.yml"

        def target(url: str) -> str:
            return urllib.parse.urlparse(url).netloc

        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{rules}']\n"
            "scrape_configs:\n"
            f"  - {{job_name: netswap, static_configs: [{{targets: ['{target(server_metrics)}']}}]}}\n"
            f"  - {{job_name: netswap-client, static_configs: [{{targets: ['{target(client_metrics)}']}}]}}\n"
        )
        with (tmp_path / "prometheus.log").open("wb") as log:
            prom = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        api = f"http://127.0.0.1:{port}/api/v1"

        def query(expr: str) -> list[Any]:
            reply = json.loads(get(f"{api}/query?query={urllib.parse.quote(expr)}"))
            assert reply["status"] == "success", (expr, reply)
            result: list[Any] = reply["data"]["result"]
            return result

        deadline = time.monotonic() + 60
        while True:
            try:
                if len(query("up == 1")) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            await asyncio.sleep(0.5)

        # load: block I/O through the frontend, and some refusals for the error panels
        fio = asyncio.ensure_future(
            run("fio", "--name=load", "--ioengine=nbd", f"--uri={nbd.uri}", "--rw=randrw", "--bsrange=4k-64k",
                "--iodepth=16", "--size=64M", "--time_based", "--runtime=25", cwd=tmp_path, timeout=120)
        )  # fmt: skip
        await run("qemu-io", "-f", "raw", nbd.uri, "-c", "discard 0 1M")
        async with await SwapClient.connect(server.address, TOKENS["alice"]) as client:
            area = await client.swapon("extra", 1 << 20)
            for _ in range(3):
                with pytest.raises(InvalidRequest):
                    await area.swap_out([999], bytes(PS))
            area.detach()
        async with await SwapClient.connect(server.address, "wrong-token") as stranger:
            with pytest.raises(Exception, match="UNAUTHENTICATED"):
                await stranger.list_areas()
        await asyncio.sleep(12)  # several scrapes of all of it

        empty = []
        for title, expr in dashboard_queries():
            if not query(concrete(expr)):
                empty.append(f"{title}: {expr}")
        await fio
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        rules_loaded = json.loads(get(f"{api}/rules"))["data"]["groups"]
        assert {r["name"] for g in rules_loaded for r in g["rules"]} >= {
            "NetswapServerDown",
            "NetswapClientRetrying",
        }
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        await nbd.stop()
        server.stop_quietly()
