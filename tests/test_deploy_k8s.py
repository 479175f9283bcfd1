"""deploy/k8s, read as manifests (no cluster needed): Envoy ring-hashes the seqserve-route header
onto the replicas of a headless Service over HTTP/2 and keeps streams open; the replicas share
one Redis; names, labels and ports agree across the files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from seqserve.client import ROUTE_HEADER
from seqserve.server.settings import Settings, parse_settings

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install pyyaml)")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
DEFAULTS = Settings()


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """``(kind, name) -> manifest`` of every file the kustomization lists (and only those)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = kustomization["resources"]
    assert sorted(files) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in files:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} twice"
            assert doc["apiVersion"]
            found[key] = doc
    return found


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    assert match, f"{duration!r}: Envoy durations are seconds, e.g. '3600s'"
    return float(match[1])


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _selects(service: dict[str, Any], deployment: dict[str, Any]) -> bool:
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    return selector.items() <= pods.items() and (
        deployment["spec"]["selector"]["matchLabels"].items() <= pods.items()
    )


def _service_port(service: dict[str, Any], deployment: dict[str, Any], name: str) -> int:
    """The Service port that reaches the deployment's container port ``name``."""
    container = _container(deployment)
    (port,) = [
        p for p in service["spec"]["ports"] if p["targetPort"] in (name, _port(container, name))
    ]
    return int(port["port"])


@pytest.fixture(scope="module")
def envoy(objects) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        objects[("ConfigMap", "seqserve-envoy")]["data"]["envoy.yaml"]
    )
    return config


def _connection_manager(envoy: dict[str, Any]) -> dict[str, Any]:
    (listener,) = envoy["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    config: dict[str, Any] = hcm["typed_config"]
    return config


def _route(envoy: dict[str, Any]) -> dict[str, Any]:
    (vhost,) = _connection_manager(envoy)["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    assert route["match"] == {"prefix": "/"}
    action: dict[str, Any] = route["route"]
    return action


def test_envoy_ring_hashes_the_route_header_over_http2(envoy):
    route = _route(envoy)
    assert route["hash_policy"] == [{"header": {"header_name": ROUTE_HEADER}}]
    (cluster,) = envoy["static_resources"]["clusters"]
    assert route["cluster"] == cluster["name"]
    assert cluster["lb_policy"] in ("RING_HASH", "MAGLEV")
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert _connection_manager(envoy)["codec_type"] == "HTTP2"
    assert any("grpc_health_check" in check for check in cluster["health_checks"])


def test_envoy_keeps_streams_and_retries_only_calls_that_reached_no_replica(envoy):
    route = _route(envoy)
    assert _seconds(route["timeout"]) == 0, "the 15 s default would end every stream"
    idle = _seconds(_connection_manager(envoy)["stream_idle_timeout"])
    assert idle > DEFAULTS.session_idle_timeout
    assert set(route["retry_policy"]["retry_on"].split(",")) <= {
        "connect-failure",
        "refused-stream",
    }


def test_envoy_finds_every_replica_through_the_headless_service(objects, envoy):
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    (endpoints,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = endpoints["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = objects[("Service", address["address"].split(".")[0])]
    replicas = objects[("Deployment", "seqserve")]
    assert headless["spec"]["clusterIP"] == "None"
    assert _selects(headless, replicas)
    assert address["port_value"] == _service_port(headless, replicas, "grpc") == DEFAULTS.port


def test_clients_reach_envoy_on_the_listener_port(objects, envoy):
    front = objects[("Deployment", "seqserve-envoy")]
    service = objects[("Service", "seqserve")]
    assert _selects(service, front)
    (listener,) = envoy["static_resources"]["listeners"]
    container = _container(front)
    assert _port(container, "grpc") == listener["address"]["socket_address"]["port_value"]
    assert _service_port(service, front, "grpc") == DEFAULTS.port
    # the ConfigMap is mounted where envoy is told to read it
    (mount,) = container["volumeMounts"]
    (volume,) = front["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == "seqserve-envoy" and volume["name"] == mount["name"]
    args = container["args"]
    assert args[args.index("-c") + 1] == f"{mount['mountPath']}/envoy.yaml"


def test_replicas_share_one_redis_and_name_themselves(objects):
    replicas = objects[("Deployment", "seqserve")]
    container = _container(replicas)
    args = container["args"]
    store = args[args.index("--store") + 1]
    match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", store)
    assert match, store
    redis_service = objects[("Service", match[1])]
    redis = objects[("Deployment", "redis")]
    assert _selects(redis_service, redis)
    assert int(match[2]) == _service_port(redis_service, redis, "redis")
    env = {e["name"]: e for e in container["env"]}
    assert env["SEQSERVE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    fields = {"SEQSERVE_" + f.upper() for f in Settings.__dataclass_fields__}
    assert set(env) <= fields, set(env) - fields
    values = {k: e["value"] for k, e in env.items() if "value" in e}
    settings = parse_settings(args, environ={**values, "SEQSERVE_REPLICA_ID": "seqserve-0"})
    assert settings.store == store and settings.replica_id == "seqserve-0"
    assert env["SEQSERVE_SNAPSHOT_PATH"]["value"] == ""


def test_replicas_drain_before_kubernetes_kills_them_and_leave_while_draining(objects):
    replicas = objects[("Deployment", "seqserve")]
    container = _container(replicas)
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = float(env.get("SEQSERVE_DRAIN_GRACE") or DEFAULTS.drain_grace)
    spec = replicas["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= grace + min(grace, 5.0) + 10
    assert container["readinessProbe"]["grpc"]["port"] == _port(container, "grpc")
    assert _port(container, "grpc") == DEFAULTS.port
    assert _port(container, "metrics") == DEFAULTS.metrics_port
    assert _port(container, "http") == DEFAULTS.http_port
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user
