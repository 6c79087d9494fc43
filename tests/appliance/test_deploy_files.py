"""The deploy/ files stay true to the code: the k8s ConfigMap carries the shipped Config.toml, and
the container and k8s manifests expose every port the default transports listen on."""

from __future__ import annotations

import re
from pathlib import Path

from appliance.config import AppConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def test_the_configmap_carries_the_shipped_config_toml() -> None:
    text = (DEPLOY / "k8s" / "configmap.yaml").read_text()
    block = text.split("Config.toml: |\n", 1)[1].split("\nkind: ConfigMap", 1)[0]
    embedded = "\n".join(line.removeprefix("    ") for line in block.split("\n"))
    assert embedded.rstrip() == (REPO / "Config.toml").read_text().rstrip(), (
        "deploy/k8s/configmap.yaml is stale: run deploy/k8s/make-configmap.sh"
    )


def _default_ports() -> set[int]:
    zmq = AppConfig().transport.zmq
    ports = {AppConfig().server.port}
    for endpoint in (zmq.router_endpoint, zmq.pull_endpoint, zmq.control_endpoint):
        ports.add(int(endpoint.rsplit(":", 1)[1]))
    return ports


def test_the_container_exposes_and_binds_every_default_port_on_all_interfaces() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == _default_ports()
    for name in ("ROUTER", "PULL", "CONTROL"):
        assert re.search(rf"APP_TRANSPORT__ZMQ__{name}_ENDPOINT=tcp://0\.0\.0\.0:\d+", text)


def test_the_k8s_deployment_lists_the_ingest_ports() -> None:
    text = (DEPLOY / "k8s" / "deployment.yaml").read_text()
    ports = {int(p) for p in re.findall(r"containerPort: (\d+)", text)}
    zmq = AppConfig().transport.zmq
    for endpoint in (zmq.router_endpoint, zmq.pull_endpoint):
        assert int(endpoint.rsplit(":", 1)[1]) in ports
