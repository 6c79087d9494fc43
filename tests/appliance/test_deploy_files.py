"""The deploy/ files stay true to the code.

The Kubernetes manifests validate against the Kubernetes API's own schemas (kubernetes-validate
bundles them: offline, strict, so a misspelt field fails), and against what the appliance needs:
the data directory the pod's config points to is on the StatefulSet's volume claim, /dev/shm holds
every shared-memory ring the config allows, the probes hit /health and /live on the REST port, and
every APP_* variable is a real config key. The container file builds from wheels in an earlier
stage and its ignore file lets every copied path through.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from appliance.config import AppConfig, build_config
from transport.shm.ring import HEADER_BYTES

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
# The oldest Kubernetes minor the manifests promise (docs/setup.md) and the newest bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# A start-up replay the startup probe must wait for before the kubelet restarts the container.
LONG_REPLAY_S = 30 * 60
# What a clean stop needs beyond server.graceful_shutdown_s: log drain and the final checkpoint.
FINAL_CHECKPOINT_S = 60


# --- Kubernetes manifests -------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file, object) for every object of every file the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        found.extend((name, doc) for doc in yaml.safe_load_all((K8S / name).read_text()) if doc)
    return found


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _manifests() if doc["kind"] == kind]


def _statefulset() -> dict[str, Any]:
    (statefulset,) = _of_kind("StatefulSet")
    return statefulset


def _container() -> dict[str, Any]:
    (container,) = _statefulset()["spec"]["template"]["spec"]["containers"]
    return container


def _pod_config() -> AppConfig:
    """The config the pod runs with: the ConfigMap's Config.toml plus the container's APP_* env.

    build_config raises ConfigError on a variable that names no config key or has a bad value.
    """
    (configmap,) = _of_kind("ConfigMap")
    env = {var["name"]: var["value"] for var in _container().get("env", ())}
    return build_config(tomllib.loads(configmap["data"]["Config.toml"]), env)


def _quantity(text: str | int) -> int:
    """Bytes of a Kubernetes quantity such as 576Mi, 21Gi or 12G."""
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text))
    assert match, f"unsupported quantity {text!r}"
    number, suffix = int(match.group(1)), match.group(2) or ""
    power = " KMGT".index(suffix[:1] or " ")
    return number * (1024 if suffix.endswith("i") else 1000) ** power


def _mount_volume(path: str) -> str:
    """The volume mounted at the longest mount path that contains `path`."""
    best = max(
        (
            m
            for m in _container()["volumeMounts"]
            if PurePosixPath(path).is_relative_to(m["mountPath"])
        ),
        key=lambda m: len(m["mountPath"]),
    )
    return best["name"]


def test_the_kustomization_lists_every_manifest_and_no_deployment_is_left() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)
    assert not _of_kind("Deployment"), "the appliance runs as a StatefulSet (it keeps data)"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    for name, doc in _manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.absolute_path)
            pytest.fail(f"{name}: {doc['kind']} {where}: {exc.message} (Kubernetes {version})")


def test_the_configmap_carries_the_shipped_config_toml() -> None:
    text = (K8S / "configmap.yaml").read_text()
    block = text.split("Config.toml: |\n", 1)[1].split("\nkind: ConfigMap", 1)[0]
    embedded = "\n".join(line.removeprefix("    ") for line in block.split("\n"))
    assert embedded.rstrip() == (REPO / "Config.toml").read_text().rstrip(), (
        "deploy/k8s/configmap.yaml is stale: run deploy/k8s/make-configmap.sh"
    )


def test_the_pod_reads_the_configmap_and_its_env_names_real_config_keys() -> None:
    (configmap,) = _of_kind("ConfigMap")
    container = _container()
    config_path = container["args"][container["args"].index("--config") + 1]
    volume = _mount_volume(config_path)
    volumes = {v["name"]: v for v in _statefulset()["spec"]["template"]["spec"]["volumes"]}
    assert volumes[volume]["configMap"]["name"] == configmap["metadata"]["name"]
    assert PurePosixPath(config_path).name in configmap["data"]
    config = _pod_config()  # raises on an APP_* variable that is not a config key
    defaults = build_config(tomllib.loads(configmap["data"]["Config.toml"]), {})
    assert config != defaults


def test_one_replica_governed_by_a_headless_service_and_selected_by_the_client_service() -> None:
    spec = _statefulset()["spec"]
    assert spec["replicas"] == 1, "one pod owns the store; scaling out is cluster mode"
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    services = {s["metadata"]["name"]: s for s in _of_kind("Service")}
    assert services[spec["serviceName"]]["spec"]["clusterIP"] == "None"
    port_names = {p["name"] for p in _container()["ports"]}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    clients = [s for s in services.values() if s["spec"].get("clusterIP") != "None"]
    assert clients, "a ClusterIP Service for the clients"


def test_the_data_directory_is_on_the_volume_claim_not_an_empty_dir() -> None:
    config = _pod_config()
    assert config.durability.enabled
    data_dir = PurePosixPath(_container()["workingDir"]) / config.durability.dir
    volume = _mount_volume(str(data_dir))
    claims = {c["metadata"]["name"]: c for c in _statefulset()["spec"]["volumeClaimTemplates"]}
    assert volume in claims, f"{data_dir} is on volume {volume!r}, not a volume claim"
    pod_volumes = {v["name"] for v in _statefulset()["spec"]["template"]["spec"]["volumes"]}
    assert volume not in pod_volumes, "a pod volume of that name would shadow the claim"
    claim = claims[volume]["spec"]
    assert set(claim["accessModes"]) <= {"ReadWriteOnce", "ReadWriteOncePod"}
    assert _quantity(claim["resources"]["requests"]["storage"]) >= 10 * 1024**3
    retention = _statefulset()["spec"].get("persistentVolumeClaimRetentionPolicy", {})
    assert retention.get("whenDeleted", "Retain") == "Retain"
    assert retention.get("whenScaled", "Retain") == "Retain"


def test_probes_startup_and_readiness_on_health_liveness_on_live_on_the_rest_port() -> None:
    container = _container()
    rest_port = _pod_config().server.port
    port_by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert port_by_name.get(get["port"], get["port"]) == rest_port, probe
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/health",
        "readinessProbe": "/health",
        "livenessProbe": "/live",
    }
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= LONG_REPLAY_S


def test_the_ingest_ports_are_listed_and_bound_on_the_pod_ip() -> None:
    zmq = _pod_config().transport.zmq
    ports = {p["containerPort"] for p in _container()["ports"]}
    for endpoint in (zmq.router_endpoint, zmq.pull_endpoint):
        assert endpoint.startswith("tcp://0.0.0.0:")
        assert int(endpoint.rsplit(":", 1)[1]) in ports


def test_dev_shm_is_memory_backed_and_holds_every_ring_the_config_allows() -> None:
    shm = _pod_config().transport.shm
    volumes = {v["name"]: v for v in _statefulset()["spec"]["template"]["spec"]["volumes"]}
    empty_dir = volumes[_mount_volume("/dev/shm/ring")]["emptyDir"]
    assert empty_dir["medium"] == "Memory"
    largest_ring = HEADER_BYTES + shm.max_slots * shm.max_slot_bytes
    assert largest_ring >= HEADER_BYTES + shm.slots * shm.slot_bytes > 64 * 1024**2
    assert _quantity(empty_dir["sizeLimit"]) >= shm.max_rings * largest_ring


def test_memory_limit_covers_the_hot_tier_and_the_memory_backed_volumes() -> None:
    config = _pod_config()
    resources = _container()["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"
    tmpfs = sum(
        _quantity(v["emptyDir"]["sizeLimit"])
        for v in _statefulset()["spec"]["template"]["spec"]["volumes"]
        if v.get("emptyDir", {}).get("medium") == "Memory"
    )
    raw_values = 8 * config.store.max_symbols * config.store.max_data_retention
    assert _quantity(resources["limits"]["memory"]) >= raw_values + tmpfs


def test_termination_grace_covers_the_drain_and_the_final_checkpoint() -> None:
    grace = _statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= _pod_config().server.graceful_shutdown_s + FINAL_CHECKPOINT_S


# --- container ------------------------------------------------------------------------------


def _stages() -> list[str]:
    """The Containerfile split at each FROM (comments and continuations joined)."""
    lines, current = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            lines.append(current.strip())
            current = ""
    text = "\n".join(line for line in lines if line)
    return re.split(r"^(?=FROM )", text, flags=re.M)[1:]


def _default_ports() -> set[int]:
    zmq = AppConfig().transport.zmq
    ports = {AppConfig().server.port}
    for endpoint in (zmq.router_endpoint, zmq.pull_endpoint, zmq.control_endpoint):
        ports.add(int(endpoint.rsplit(":", 1)[1]))
    return ports


def test_the_container_exposes_and_binds_every_default_port_on_all_interfaces() -> None:
    text = CONTAINERFILE.read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == _default_ports()
    for name in ("ROUTER", "PULL", "CONTROL"):
        assert re.search(rf"APP_TRANSPORT__ZMQ__{name}_ENDPOINT=tcp://0\.0\.0\.0:\d+", text)


def test_the_image_installs_from_wheels_built_in_an_earlier_stage_only() -> None:
    *builders, final = _stages()
    bases = {stage.split()[1] for stage in (*builders, final)}
    assert len(bases) == 1, "every stage on the same base image (the wheels must fit it)"
    (wheels,) = [
        s for s in builders if re.search(r"^RUN .*\bpip wheel --wheel-dir /wheels", s, re.M)
    ]
    stage_name = wheels.split()[3]  # FROM base AS name
    installs = re.findall(r"pip install [^\n&]*", final)
    assert installs and all("--no-index --find-links /wheels" in i for i in installs), installs
    assert f"from={stage_name},source=/wheels" in final
    assert "--no-index --find-links /wheelhouse" in wheels  # the offline wheelhouse


def test_the_image_runs_as_non_root_with_the_data_directory_as_a_volume() -> None:
    final = _stages()[-1]
    assert re.search(r"^USER (?!root\b|0\b)\S+", final, re.M)
    data_dir = re.search(r"APP_DURABILITY__DIR=(\S+)", final).group(1)
    assert f'VOLUME ["{data_dir}"]' in final
    workdir = re.search(r"^WORKDIR (\S+)", final, re.M).group(1)
    assert PurePosixPath(workdir) / AppConfig().durability.dir == PurePosixPath(data_dir)


def test_the_healthcheck_waits_for_a_long_replay_on_health() -> None:
    healthcheck = re.search(r"^HEALTHCHECK .*$", _stages()[-1], re.M).group(0)
    assert "/health'" in healthcheck
    start_period = re.search(r"--start-period=(\d+)m\b", healthcheck)
    assert start_period and int(start_period.group(1)) * 60 >= LONG_REPLAY_S


def test_the_ignore_file_lets_every_copied_path_through() -> None:
    ignore = (DEPLOY / "container" / "Containerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "deny everything, then let through what the image installs"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    copied = [
        source.rstrip("/")
        for stage in _stages()
        for line in re.findall(r"^COPY (?!--from)(.+)$", stage, re.M)
        for source in line.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
        assert (REPO / source).exists(), source


# --- cluster mode: deploy/k8s/cluster (NATS StatefulSet + appliance StatefulSet) -----------

CLUSTER = K8S / "cluster"


def _cluster_manifests() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        found.extend((name, doc) for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc)
    return found


def _cluster_objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _cluster_manifests() if d["kind"] == kind}


def _nats_conf() -> str:
    return _cluster_objects("ConfigMap")["hft-nats-config"]["data"]["nats.conf"]


def _env_of(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """A container's env as the pod named `pod_name` sees it (fieldRef metadata.name resolved)."""
    env = {}
    for var in container.get("env", ()):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", var
            env[var["name"]] = pod_name
    return env


def _cluster_pod_config(ordinal: int = 0) -> AppConfig:
    """The appliance node's config: built-in defaults plus its APP_* env (no config file)."""
    sts = _cluster_objects("StatefulSet")["hft-appliance-cluster"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert "--config" not in container["args"], "env only: no ConfigMap to keep in step"
    return build_config({}, _env_of(container, f"hft-appliance-cluster-{ordinal}"))


def test_cluster_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in CLUSTER.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)
    assert set(_cluster_objects("StatefulSet")) == {"hft-nats", "hft-appliance-cluster"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_cluster_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    for name, doc in _cluster_manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.absolute_path)
            pytest.fail(f"cluster/{name}: {doc['kind']} {where}: {exc.message} ({version})")


def test_nats_three_servers_route_to_each_other_by_headless_dns_with_jetstream_on_a_claim() -> None:
    sts = _cluster_objects("StatefulSet")["hft-nats"]
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel", "OrderedReady deadlocks the meta election"
    headless = _cluster_objects("Service")[spec["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    conf = _nats_conf()
    cluster_port = int(re.search(r"cluster \{[^}]*listen: 0\.0\.0\.0:(\d+)", conf).group(1))
    routes = re.findall(r"nats://(\S+):(\d+)", conf.split("routes:", 1)[1])
    want = {(f"hft-nats-{i}.{spec['serviceName']}", str(cluster_port)) for i in range(3)}
    assert set(routes) == want
    assert "server_name: $POD_NAME" in conf
    (container,) = spec["template"]["spec"]["containers"]
    assert _env_of(container, "hft-nats-1")["POD_NAME"] == "hft-nats-1"
    store_dir = re.search(r"store_dir: (\S+)", conf).group(1)
    mount = max(
        (m for m in container["volumeMounts"] if store_dir.startswith(m["mountPath"])),
        key=lambda m: len(m["mountPath"]),
    )
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    assert mount["name"] in claims, "the JetStream store is on the volume claim"
    max_file = _quantity(re.search(r"max_file_store: (\S+)", conf).group(1))
    assert max_file < _quantity(claims[mount["name"]]["spec"]["resources"]["requests"]["storage"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["cluster"] == cluster_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/healthz")
        assert container[probe]["httpGet"]["port"] == "monitor"


def test_cluster_appliance_env_is_a_valid_cluster_config_pointing_at_every_nats_server() -> None:
    nats_sts = _cluster_objects("StatefulSet")["hft-nats"]["spec"]
    (nats_container,) = nats_sts["template"]["spec"]["containers"]
    client_port = {p["name"]: p["containerPort"] for p in nats_container["ports"]}["client"]
    config = _cluster_pod_config(ordinal=2)  # raises on a bad or unknown APP_* variable
    cluster = config.cluster
    assert cluster.enabled
    assert cluster.node_id == "hft-appliance-cluster-2", "node_id is the pod name"
    assert not config.durability.enabled, "the replicated log is JetStream's"
    assert cluster.replicas == nats_sts["replicas"] == 3
    want = {
        f"nats://hft-nats-{i}.{nats_sts['serviceName']}:{client_port}"
        for i in range(nats_sts["replicas"])
    }
    assert set(cluster.nats_urls) == want
    assert _cluster_pod_config(0).cluster.node_id != cluster.node_id


def test_cluster_appliance_three_nodes_behind_services_with_probes_and_memory() -> None:
    sts = _cluster_objects("StatefulSet")["hft-appliance-cluster"]
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert not spec.get("volumeClaimTemplates"), "no local log: the data is in NATS"
    pod_labels = spec["template"]["metadata"]["labels"]
    (container,) = spec["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    services = {
        n: s
        for n, s in _cluster_objects("Service").items()
        if s["spec"]["selector"].items() <= pod_labels.items()
    }
    assert services[spec["serviceName"]]["spec"]["clusterIP"] == "None"
    assert any(s["spec"].get("clusterIP") != "None" for s in services.values())
    for service in services.values():
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    config = _cluster_pod_config()
    paths = {p: container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe")}
    assert set(paths.values()) == {"/health"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert by_name["http"] == config.server.port
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"
    raw_values = 8 * config.store.max_symbols * config.store.max_data_retention
    assert _quantity(resources["limits"]["memory"]) >= raw_values
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= config.server.graceful_shutdown_s + config.cluster.request_timeout_s


def test_nats_is_reachable_only_from_the_appliance_and_itself() -> None:
    (policy,) = _cluster_objects("NetworkPolicy").values()
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "hft-nats"}
    sources = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
    }
    assert sources == {"hft-nats", "hft-appliance-cluster"}
