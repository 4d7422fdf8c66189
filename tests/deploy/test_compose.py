"""deploy/compose.yaml run for real with podman-compose: netswap built from the Dockerfile,
Prometheus scraping it with the alert rules, every server query of the Grafana dashboard
answered, and Grafana's provisioning checked against the running stack (Grafana itself is in
no registry these machines reach: docs/container.md)."""

from __future__ import annotations

import json
import shlex
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from netswap.client import AuthenticationFailed, InvalidRequest
from netswap.client.sync import SwapClient
from tests.deploy.engine import CA_BUNDLE, NO_LAYERS, RUN_ID, VENV_BIN, Podman, run
from tests.helpers import PS, free_port

pytestmark = [pytest.mark.container, pytest.mark.root, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
GRAFANA_RATE_INTERVAL = "60s"  # Grafana's $__rate_interval for a 15 s scrape interval: 4 x 15 s


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def as_grafana_fills(expr: str, jobs: list[str]) -> str:
    """A dashboard query with its variables as Grafana fills them, all jobs selected."""
    selected = "|".join(jobs)
    return expr.replace("$__rate_interval", GRAFANA_RATE_INTERVAL).replace('"$job"', f'"{selected}"')


def test_compose_stack(podman: Podman, base_image: str, prometheus_image: str, tmp_path: Path) -> None:
    project = f"netswap-test-{RUN_ID}"
    image = f"localhost/netswap-test/netswap-compose:{RUN_ID}"
    ports = {k: free_port() for k in ("NETSWAP_GRPC_PORT", "NETSWAP_METRICS_PORT", "PROMETHEUS_PORT")}
    env = podman.env | {
        "NETSWAP_IMAGE": image,
        "NETSWAP_BASE_IMAGE": base_image,
        "NETSWAP_PROMETHEUS_IMAGE": prometheus_image,
        "GRAFANA_PORT": str(free_port()),  # not started, but no fixed port even on paper
        **{k: str(v) for k, v in ports.items()},
    }
    compose = [
        str(VENV_BIN / "podman-compose"), "-p", project,
        "-f", "deploy/compose.yaml", "-f", "tests/deploy/compose.local.yaml",
    ]  # fmt: skip
    # As the docs' `up -d --build`, with the build's machine-specific additions (engine.build_args:
    # the base comes from compose.local.yaml) and without Grafana.
    build_extra = shlex.join(
        [NO_LAYERS, "--format", "docker", "--pull=never", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    )
    api = f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}/api/v1"
    volumes: set[str] = set()
    try:
        run(
            [*compose, f"--podman-build-args={build_extra}", "up", "-d", "--build", "netswap", "prometheus"],
            env, cwd=ROOT, timeout=600,
        )  # fmt: skip
        listed = podman(
            "ps", "-a", "--filter", f"label=io.podman.compose.project={project}", "--format", "{{.Names}}"
        )
        for container in listed.stdout.split():
            mounts = podman("container", "inspect", "--format", "{{json .Mounts}}", container).stdout
            volumes |= {m["Name"] for m in json.loads(mounts) if m["Type"] == "volume"}
        deadline = time.monotonic() + 60
        while podman("healthcheck", "run", f"{project}_netswap_1", check=False).returncode != 0:
            assert time.monotonic() < deadline, podman("logs", f"{project}_netswap_1", check=False).stderr
            time.sleep(0.5)

        # The docs' commands: the dev token from the running service, then the demo.
        token = run([*compose, "exec", "netswap", "cat", "/etc/netswap/tokens/dev.token"], env, cwd=ROOT)
        (tmp_path / "dev.token").write_text(token.stdout)
        grpc = f"127.0.0.1:{ports['NETSWAP_GRPC_PORT']}"
        demo = run(
            [str(VENV_BIN / "netswap"), "--server", grpc, "--token-file", "dev.token", "demo", "--size", "16MiB"],
            env, cwd=tmp_path,
        )  # fmt: skip
        assert "verified: all 4096 pages read back byte-identical" in demo.stdout, demo
        # Refusals, so the dashboard's error panels have something to show.
        with SwapClient(grpc, "not-a-token", timeout=30) as stranger, pytest.raises(AuthenticationFailed):
            stranger.list_areas()
        with SwapClient(grpc, token.stdout.strip(), timeout=30) as client:
            area = client.swapon("refused", PS)
            with pytest.raises(InvalidRequest):
                area.swap_out([5], bytes(PS))
            area.swapoff()

        # Prometheus (deploy/prometheus/prometheus.yml, 15 s scrapes) finds netswap by its service name.
        def query(expr: str) -> list[Any]:
            reply = get_json(f"{api}/query?query={urllib.parse.quote(expr)}")
            assert reply["status"] == "success", (expr, reply)
            result: list[Any] = reply["data"]["result"]
            return result

        board = json.loads((DEPLOY / "grafana" / "netswap-dashboard.json").read_text())
        server_queries = [
            (panel["title"], t["expr"]) for panel in board["panels"] for t in panel["targets"]
            if '"$job"' in t["expr"]
        ]  # fmt: skip
        assert server_queries
        deadline = time.monotonic() + 120
        while True:
            try:
                targets = get_json(f"{api}/targets")["data"]["activeTargets"]
                # $job as Grafana's label_values(netswap_areas, job) lists it
                jobs = get_json(f"{api}/label/job/values?match[]=netswap_areas")["data"]
                empty = [f"{t}: {e}" for t, e in server_queries if not query(as_grafana_fills(e, jobs))]
            except OSError as e:
                empty = [f"Prometheus not answering: {e}"]
            if not empty:
                break
            assert time.monotonic() < deadline, "dashboard queries without data:\n" + "\n".join(empty)
            time.sleep(2)
        (netswap,) = [t for t in targets if t["labels"]["job"] == "netswap"]
        assert netswap["labels"]["instance"] == "netswap:9108" and netswap["health"] == "up", netswap
        assert jobs == ["netswap"]
        (pages,) = query('sum(netswap_swap_out_pages_total{job="netswap"})')
        assert float(pages["value"][1]) >= 4096  # the demo's pages, as Prometheus scraped them
        rules = get_json(f"{api}/rules")["data"]["groups"]
        alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
        assert {r["name"] for g in rules for r in g["rules"]} == {
            r["alert"] for g in alerts["groups"] for r in g["rules"]
        }

        # Grafana's provisioning, against the stack it would join.
        stack = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
        grafana_mounts = dict(v.split(":")[:2] for v in stack["services"]["grafana"]["volumes"])
        assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"  # Grafana's default
        provisioning = DEPLOY / "grafana" / "provisioning"
        (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())["datasources"]
        (provider,) = yaml.safe_load((provisioning / "dashboards/netswap.yaml").read_text())["providers"]
        assert provider["options"]["path"] == grafana_mounts["./grafana"]  # where the dashboard lands
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["query"] == source["type"] == "prometheus"
        network = f"{project}_default"
        fetch = (
            "import json, sys, urllib.request;"
            "print(json.load(urllib.request.urlopen(sys.argv[1] + '/api/v1/status/buildinfo', timeout=10))['status'])"
        )
        seen = podman("run", "--rm", "--network", network, image, "python3", "-c", fetch, source["url"])
        assert seen.stdout.strip() == "success", seen
    finally:
        run([*compose, "down", "-v"], env, cwd=ROOT, check=False, timeout=300)
        for volume in volumes:  # down -v leaves the anonymous ones (the image's VOLUME)
            podman("volume", "rm", "--force", volume, check=False)
        podman("rmi", "--force", image, check=False)
