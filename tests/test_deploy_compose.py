"""docker-compose.yml, deploy/prometheus.yml and the Grafana provisioning, parsed and checked
against each other, the Dockerfile and the server's settings (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from test_deploy_image import Stage, parse_dockerfile

yaml = pytest.importorskip(
    "yaml", reason="PyYAML not installed (pip install pyyaml): it reads the compose file"
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LONG_RUNNING = ("seqserve", "prometheus", "grafana")
REPLICAS = ("replica-1", "replica-2")
CLUSTER = ("redis", *REPLICAS, "nginx")  # profile `cluster`


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with nothing set in the environment."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume or a ./ path) of each short-syntax volume."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        mounts[target] = source
    return mounts


def _mounted_from(mounts: dict[str, str], path: str) -> str | None:
    """The source of the mount that holds ``path`` in the container."""
    p = PurePosixPath(path)
    holders = [t for t in mounts if p == PurePosixPath(t) or PurePosixPath(t) in p.parents]
    return mounts[max(holders, key=len)] if holders else None


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def _flags(command: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in command if a.startswith("--") and "=" in a)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def server_settings(compose, stages) -> Any:
    """What the seqserve service runs with: the image's ENV, then the compose environment."""
    from seqserve.server.settings import parse_settings

    target = compose["services"]["seqserve"]["build"]["target"]
    image_env = {k: v for k, v in stages[target].env.items() if k.startswith("SEQSERVE_")}
    return parse_settings(
        [], environ={**image_env, **_environment(compose["services"]["seqserve"])}
    )


def test_services_and_their_build_targets(compose, stages):
    services = compose["services"]
    assert set(services) >= {*LONG_RUNNING, "export"}
    for name in ("seqserve", "export"):
        build = services[name]["build"]
        assert (ROOT / build["context"] / "Dockerfile").samefile(ROOT / "Dockerfile")
        assert build["target"] in stages, f"{name}: no stage {build['target']!r}"
    assert services["seqserve"]["build"]["target"] == "runtime"
    assert stages[services["export"]["build"]["target"]].exec_form("ENTRYPOINT") == [
        "seqserve-export"
    ]


def test_every_seqserve_variable_is_a_real_setting(compose):
    from seqserve.server.settings import Settings

    fields = {f"SEQSERVE_{f.upper()}" for f in Settings.__dataclass_fields__}
    for name, service in compose["services"].items():
        unknown = {k for k in _environment(service) if k.startswith("SEQSERVE_")} - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not seqserve-server settings"


def test_seqserve_ports_are_the_ones_it_listens_on_and_exposes(compose, stages, server_settings):
    service = compose["services"]["seqserve"]
    exposed = stages[service["build"]["target"]].exposed
    ports = _container_ports(service)
    assert ports == {server_settings.port, server_settings.http_port, server_settings.metrics_port}
    assert ports <= exposed


def test_seqserve_volumes_hold_its_snapshot_and_models(compose, server_settings):
    service = compose["services"]["seqserve"]
    mounts = _mounts(service)
    state = _mounted_from(mounts, server_settings.snapshot_path)
    assert state in compose["volumes"], "sessions must survive a new container: a named volume"
    assert "/models" in mounts and mounts["/models"] in compose["volumes"]
    if server_settings.model_dir:
        assert _mounted_from(mounts, server_settings.model_dir) is not None
    assert server_settings.model_repository == "", "the bundled models unless told otherwise"


def test_the_models_volume_is_a_repository_the_server_and_replicas_poll(compose, stages):
    """What the header documents: SEQSERVE_MODEL_REPOSITORY=/models serves the models volume as
    a repository (polled for new versions), on the single server and both replicas alike."""
    from seqserve.server.settings import parse_settings

    services = compose["services"]
    image_env = {k: v for k, v in stages["runtime"].env.items() if k.startswith("SEQSERVE_")}
    model_keys = {k for k in _environment(services["seqserve"]) if "MODEL" in k or "REPOS" in k}
    assert model_keys >= {"SEQSERVE_MODEL_REPOSITORY", "SEQSERVE_DEFAULT_MODEL"}
    for name in ("seqserve", *REPLICAS):
        service = services[name]
        env = _environment(service)
        assert {k: env[k] for k in model_keys} == {
            k: _environment(services["seqserve"])[k] for k in model_keys
        }, name
        told = {**env, "SEQSERVE_MODEL_REPOSITORY": "/models"}
        settings = parse_settings(service.get("command") or [], environ={**image_env, **told})
        assert settings.repository_poll > 0, "new versions are found without a restart"
        mounts = _mounts(service)
        assert _mounted_from(mounts, settings.model_repository) == mounts["/models"], name
        assert mounts["/models"] == _mounts(services["seqserve"])["/models"]


def test_restart_policies_and_stop_grace_outlast_the_drain(compose, server_settings):
    services = compose["services"]
    for name in (*LONG_RUNNING, *CLUSTER):
        assert services[name].get("restart") in ("unless-stopped", "always"), name
    assert str(services["export"].get("restart")) == "no", "a finished job must not restart"
    # On SIGTERM: up to drain_grace for accepted requests, then streams end (<= 5 s), then the
    # snapshot is written; leave at least 10 s more for that and the interpreter's exit.
    grace = server_settings.drain_grace
    for name in ("seqserve", *REPLICAS):
        stop = _seconds(services[name]["stop_grace_period"])
        assert stop >= grace + min(grace, 5.0) + 10, (name, stop, grace)


def test_plain_up_starts_what_it_did_and_the_cluster_needs_its_profile(compose):
    services = compose["services"]
    assert {n for n, s in services.items() if not s.get("profiles")} == set(LONG_RUNNING)
    for name in CLUSTER:
        assert services[name]["profiles"] == ["cluster"], name
    # both can run at once: no host port twice
    published = [str(p).split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def _options(command: list[str]) -> dict[str, str]:
    """``--flag value`` / ``--flag=value`` pairs of a command."""
    options, i = {}, 0
    while i < len(command):
        arg = command[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            options[key] = value
        elif arg.startswith("--") and i + 1 < len(command):
            options[arg], i = command[i + 1], i + 1
        i += 1
    return options


def test_cluster_replicas_run_the_server_image_on_one_redis(compose, stages):
    from seqserve.server.settings import parse_settings

    services = compose["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert _mounted_from(_mounts(redis), "/data") in compose["volumes"]
    for name in REPLICAS:
        replica = services[name]
        assert replica["build"] == services["seqserve"]["build"]
        assert replica["image"] == services["seqserve"]["image"]
        assert "ports" not in replica, "reached through nginx only"
        options = _options(replica["command"])
        assert options["--store"] == "redis://redis:6379/0"
        assert options["--replica-id"] == name
        assert "redis" in replica["depends_on"]
        env = _environment(replica)
        assert env["SEQSERVE_SNAPSHOT_PATH"] == "", "sessions live in Redis, not in one replica"
        image_env = {k: v for k, v in stages["runtime"].env.items() if k.startswith("SEQSERVE_")}
        settings = parse_settings(replica["command"], environ={**image_env, **env})
        assert settings.store.startswith("redis://redis:") and settings.replica_id


def test_cluster_nginx_runs_the_deployed_config_on_the_replicas(compose, server_settings):
    from test_deploy_proxy import _find, _one, parse_nginx

    nginx = compose["services"]["nginx"]
    (conf_target,) = [
        t
        for t, src in _mounts(nginx).items()
        if (ROOT / src).resolve() == DEPLOY / "nginx" / "seqserve.conf"
    ]
    assert PurePosixPath(conf_target).parent == PurePosixPath("/etc/nginx/conf.d")
    assert conf_target.endswith(".conf")
    site = parse_nginx((DEPLOY / "nginx" / "seqserve.conf").read_text())
    servers = {d[0][1] for d in _find(site, "upstream", "server")}
    assert servers == {f"{name}:{server_settings.port}" for name in REPLICAS}
    listen = _one(site, "server", "listen")[0]
    assert _container_ports(nginx) == {int(listen.rsplit(":", 1)[-1])}
    for name in REPLICAS:
        assert nginx["depends_on"][name]["condition"] == "service_healthy"


def test_export_job_writes_into_the_models_volume_the_server_reads(compose):
    pytest.importorskip("seqserve.export.cli")
    from seqserve.export.cli import _parser

    job = compose["services"]["export"]
    assert job["profiles"] == ["export"], "only with --profile export"
    args = _parser().parse_args(job["command"])
    output = str(args.output)
    job_volume = _mounted_from(_mounts(job), output)
    assert job_volume in compose["volumes"]
    assert _mounts(compose["services"]["seqserve"])["/models"] == job_volume
    # It writes a version folder of the repository that volume is: /models/<model>/<version>.
    version = PurePosixPath(output)
    assert version.name.isdigit() and int(version.name) >= 1, output
    assert version.parent.parent == PurePosixPath("/models"), output
    assert not any(v.endswith(":ro") for v in job["volumes"] if v.startswith(job_volume + ":"))


def test_prometheus_scrapes_the_seqserve_service(compose, server_settings):
    service = compose["services"]["prometheus"]
    flags = _flags(service["command"])
    config_source = _mounts(service)[flags["config.file"]]
    assert (ROOT / config_source).resolve() == DEPLOY / "prometheus.yml"
    assert _mounted_from(_mounts(service), flags["storage.tsdb.path"]) in compose["volumes"]
    config = _load(DEPLOY / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "seqserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"seqserve:{server_settings.metrics_port}"]
    assert "seqserve" in compose["services"]


def test_grafana_provisions_the_datasource_and_dashboard(compose):
    service = compose["services"]["grafana"]
    mounts = _mounts(service)
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    assert provisioning.resolve() == DEPLOY / "grafana" / "provisioning"
    (datasource,) = _load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    prometheus = compose["services"]["prometheus"]
    listen = _flags(prometheus["command"]).get("web.listen-address", "0.0.0.0:9090")
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    scrape = _load(DEPLOY / "prometheus.yml")["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs it"
    (provider,) = _load(provisioning / "dashboards" / "seqserve.yml")["providers"]
    folder = ROOT / mounts[provider["options"]["path"]]
    dashboards = sorted(folder.glob("*.json"))
    assert [d.name for d in dashboards] == ["seqserve.json"]
    home = _environment(service)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == PurePosixPath(provider["options"]["path"])
    assert (folder / PurePosixPath(home).name).exists()
    dashboard = json.loads(dashboards[0].read_text())
    for panel in dashboard["panels"]:
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
    for variable in dashboard["templating"]["list"]:  # $model, $version
        assert variable["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}


def test_docker_compose_validates_the_file_with_every_profile():
    """docker-compose's own schema and interpolation check (``config`` needs no engine; 1.29
    lists every service whatever the profiles)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose not installed (Debian package docker-compose; "
            "scripts/system-deps.sh installs it)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQSERVE_", "COMPOSE_"))}
    run = subprocess.run(
        [
            binary,
            "--project-directory",
            str(ROOT),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--profile",
            "export",
            "--profile",
            "cluster",
            "config",
            "--services",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert set(run.stdout.split()) == {*LONG_RUNNING, "export", *CLUSTER}
