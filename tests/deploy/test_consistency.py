"""The deployment files agree with each other and with the server: labels select what they
should, ports and probes point where the server listens, grace periods nest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from netswap.server.config import config_from_args

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def test_selectors_and_labels_agree() -> None:
    docs = manifests()
    (sts,) = [d for k, d in docs.items() if k.startswith("StatefulSet/")]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    selects = {
        "StatefulSet": sts["spec"]["selector"]["matchLabels"],
        "Service": docs["Service/netswap"]["spec"]["selector"],
        "PodDisruptionBudget": next(d for k, d in docs.items() if k.startswith("PodDisruptionBudget/"))[
            "spec"
        ]["selector"]["matchLabels"],
        "NetworkPolicy": next(d for k, d in docs.items() if k.startswith("NetworkPolicy/"))["spec"][
            "podSelector"
        ]["matchLabels"],
    }
    for who, selector in selects.items():
        assert selector and selector.items() <= pod_labels.items(), (
            f"{who} selects {selector}, pods have {pod_labels}"
        )
    assert sts["spec"]["serviceName"] == "netswap"
    monitor = next(d for k, d in docs.items() if k.startswith("ServiceMonitor/"))
    service_labels = docs["Service/netswap"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    service_ports = {p["name"] for p in docs["Service/netswap"]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports


def test_ports_and_probes_match_the_servers_configuration() -> None:
    docs = manifests()
    env = {k: str(v) for k, v in docs["ConfigMap/netswap-config"]["data"].items()}
    config = config_from_args([], env)  # the server accepts this configuration as it stands
    sts = next(d for k, d in docs.items() if k.startswith("StatefulSet/"))
    pod = sts["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "netswap"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": port_of(config.listen),
        "metrics": port_of(config.metrics_listen),
        "health": port_of(config.health_listen),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == ports["health"], probe
        assert grpc_probe.get("service", "") in ("", "netswap.v1.SwapService"), probe
    for p in docs["Service/netswap"]["spec"]["ports"]:
        assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]
    assert pod["terminationGracePeriodSeconds"] > config.grace_seconds
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(config.store_path).startswith("/var/lib/netswap") and "/var/lib/netswap" in mounts
    assert config.tokens is not None and any(str(config.tokens).startswith(m) for m in mounts)
    assert config.tls_cert is not None and any(str(config.tls_cert).startswith(m) for m in mounts)


def test_dockerfile_and_compose_agree_with_the_server() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE).group(1).split()}  # type: ignore[union-attr]
    docs = manifests()
    env = {k: str(v) for k, v in docs["ConfigMap/netswap-config"]["data"].items()}
    config = config_from_args([], env)
    assert exposed == {port_of(config.listen), port_of(config.metrics_listen), port_of(config.health_listen)}
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    netswap_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "netswap")
    (target,) = netswap_job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert host in compose["services"] and int(port) == port_of(config.metrics_listen)


def test_the_fleet_keeps_one_copy_of_every_mirror() -> None:
    docs = manifests()
    sts = docs["StatefulSet/netswap"]
    assert sts["spec"]["replicas"] >= 3  # two copies of an area, and a third server to rebuild one on
    spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    by_node = next(c for c in spread if c["topologyKey"] == "kubernetes.io/hostname")
    assert by_node["whenUnsatisfiable"] == "DoNotSchedule" and by_node["maxSkew"] == 1
    assert (
        by_node["labelSelector"]["matchLabels"].items()
        <= sts["spec"]["template"]["metadata"]["labels"].items()
    )
    pdb = docs["PodDisruptionBudget/netswap"]["spec"]
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb  # never both copies of a mirror
    service = docs["Service/netswap"]["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS names every pod...
    assert any(
        p["name"] == "grpc" and p["protocol"] == "TCP" for p in service["ports"]
    )  # ...as _grpc._tcp SRV
