"""The Dockerfile, checked without a Docker engine: its stages agree with the package and the
server's settings, and the runtime image's ENTRYPOINT + ENV, run as-is here, serve and pass the
image's HEALTHCHECK."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
SERVER_STAGES = ("runtime", "gpu")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
        return env

    @property
    def exposed(self) -> set[int]:
        return {int(p.split("/")[0]) for args in self.all("EXPOSE") for p in args.split()}

    def exec_form(self, keyword: str) -> list[str]:
        raw = self.last(keyword)
        assert raw is not None and raw.startswith("["), f"{self.name}: {keyword} not in exec form"
        return list(json.loads(raw))

    @property
    def healthcheck(self) -> str:
        """The HEALTHCHECK's command (shell form), options removed."""
        raw = self.last("HEALTHCHECK")
        assert raw is not None, f"{self.name}: no HEALTHCHECK"
        _, sep, command = raw.partition(" CMD ")
        assert sep, f"{self.name}: HEALTHCHECK has no CMD"
        return command.strip()


def parse_dockerfile(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Stages by name (in order), each with its (KEYWORD, arguments) instructions; line
    continuations joined, comments and parser directives dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name, words[0])
        elif current is not None:
            current.instructions.append((keyword, args))
    return stages


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and every stage it copies from, transitively."""
    seen: list[Stage] = []
    todo = [name]
    while todo:
        stage = stages[todo.pop()]
        if stage in seen:
            continue
        seen.append(stage)
        for args in stage.all("COPY"):
            todo += [w.split("=", 1)[1] for w in args.split() if w.startswith("--from=")]
    return seen


def _installs(stages: dict[str, Stage], name: str) -> str:
    return " ".join(a for s in _chain(stages, name) for a in s.all("RUN") if "pip install" in a)


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile()


def test_targets_runtime_is_the_default_gpu_and_export_exist(stages):
    assert list(stages)[-1] == "runtime", "the last stage is what a plain `docker build` makes"
    for name in ("runtime", "gpu", "export"):
        assert name in stages


def test_runtime_installs_server_extra_only_gpu_the_gpu_extra_export_tensorflow(stages):
    runtime = _installs(stages, "runtime")
    assert '"seqserve[server]"' in runtime
    assert "export" not in runtime and "tensorflow" not in runtime.lower()
    gpu = _installs(stages, "gpu")
    assert '"seqserve[gpu]"' in gpu and "[server]" not in gpu and "export" not in gpu
    assert stages["gpu"].base == "${CUDA_IMAGE}"
    assert '"seqserve[export]"' in _installs(stages, "export")
    assert stages["export"].exec_form("ENTRYPOINT") == ["seqserve-export"]


def test_wheel_stage_copies_every_package_folder(stages):
    """The image is built from the folders the wheel stage copies: each package's folder (the
    bundled models included) and the files pyproject.toml reads must be among them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {a.split()[0] for a in stages["wheel"].all("COPY")}
    copied |= {w for a in stages["wheel"].all("COPY") for w in a.split()[:-1]}
    needed = set(project["tool"]["setuptools"]["package-dir"].values())
    needed |= {"pyproject.toml", project["project"]["readme"]}
    assert needed <= copied, f"not copied into the build: {sorted(needed - copied)}"


@pytest.mark.parametrize("name", [*SERVER_STAGES, "export"])
def test_images_run_as_the_same_non_root_user(stages, name):
    user = stages[name].last("USER")
    assert user not in (None, "root", "0")
    assert user == stages["runtime"].last("USER"), "the models volume is shared by uid"


@pytest.mark.parametrize("name", SERVER_STAGES)
def test_server_image_env_ports_and_paths_agree_with_the_settings(stages, name):
    from seqserve.server.settings import Settings, parse_settings

    stage = stages[name]
    env = stage.env
    fields = {f"SEQSERVE_{f.upper()}" for f in Settings.__dataclass_fields__}
    seqserve_env = {k: v for k, v in env.items() if k.startswith("SEQSERVE_")}
    assert set(seqserve_env) <= fields, f"not settings: {set(seqserve_env) - fields}"
    settings = parse_settings([], environ=seqserve_env)
    assert stage.exposed == {settings.port, settings.http_port, settings.metrics_port}
    assert settings.model_dir == "", "the bundled default model unless a directory is mounted"
    assert settings.model_repository == "", "nor a repository"
    # The snapshot's folder exists in the image and belongs to the user the server runs as.
    state_dir = str(Path(settings.snapshot_path).parent)
    for folder in (state_dir, "/models"):  # "/models": where a model directory is mounted
        assert any(
            "mkdir -p" in a and "chown" in a and f" {folder} " in f"{a} " for a in stage.all("RUN")
        ), f"{folder} is not made for the server's user"
    # The console scripts come from the virtualenv the build made.
    assert env["PATH"].startswith("/opt/seqserve/bin:")
    assert any("venv /opt/seqserve" in a for s in _chain(stages, name) for a in s.all("RUN"))
    assert stage.exec_form("ENTRYPOINT") == ["seqserve-server"]
    assert settings.device == ("cuda" if name == "gpu" else "cpu")


def test_gpu_image_differs_from_runtime_only_in_device(stages):
    runtime, gpu = stages["runtime"], stages["gpu"]
    assert {**gpu.env, "SEQSERVE_DEVICE": "cpu"} == {**runtime.env, "SEQSERVE_DEVICE": "cpu"}
    for keyword in ("EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "USER"):
        assert gpu.all(keyword) == runtime.all(keyword), keyword


def test_healthcheck_is_the_grpc_health_command_and_never_exits_2(stages):
    command = stages["runtime"].healthcheck
    assert command.startswith("seqserve ") and " health" in command
    assert "${SEQSERVE_PORT}" in command, "follows the port the server is told to use"
    assert command.endswith("|| exit 1"), "docker reserves exit code 2"


def test_wheel_from_the_copied_folders_bakes_in_the_default_model(stages, tmp_path):
    """Build the wheel as the wheel stage does, from only what it copies (no build isolation:
    the setuptools of this virtualenv), and look inside."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for args in stages["wheel"].all("COPY"):
        *sources, dest = args.split()
        for source in sources:
            target = src / (source if dest in ("./", ".") else dest)
            if (ROOT / source).is_dir():
                shutil.copytree(
                    ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                target.write_bytes((ROOT / source).read_bytes())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("seqserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for part in ("model.json", "step.onnx", "sequence.onnx"):
        assert f"seqserve/models/basicmotions/{part}" in names
    for script in ("seqserve-server", "seqserve", "seqserve-export"):
        assert f"{script} = " in entry_points


def _image_environ(stage: Stage, **overrides: str) -> dict[str, str]:
    """The image's ENV as the entrypoint sees it, PATH pointing at this virtualenv instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env.update({k: v for k, v in stage.env.items() if k != "PATH"})
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env.update(overrides)
    return env


def _healthcheck(stage: Stage, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", stage.healthcheck], env=env, capture_output=True, text=True, timeout=20
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("model", ["basicmotions", "japanesevowels", "repository"])
def test_runtime_entrypoint_as_is_serves_and_passes_its_healthcheck(stages, tmp_path, model):
    """The bundled default model (SEQSERVE_MODEL_DIR empty, as the image sets it), a model
    directory mounted elsewhere and named by SEQSERVE_MODEL_DIR, or a model repository named by
    SEQSERVE_MODEL_REPOSITORY (as docker-compose.yml documents)."""
    pytest.importorskip("onnxruntime")
    stage = stages["runtime"]
    port, metrics_port = free_port(), free_port()
    env = _image_environ(
        stage,
        SEQSERVE_HOST="127.0.0.1",
        SEQSERVE_PORT=str(port),
        SEQSERVE_METRICS_PORT=str(metrics_port),
        SEQSERVE_SNAPSHOT_PATH=str(tmp_path / "sessions.npz"),
    )
    served = model
    if model == "repository":
        served = "japanesevowels"
        shutil.copytree(ROOT / "models" / served, tmp_path / "mnt" / served / "2")
        env["SEQSERVE_MODEL_REPOSITORY"] = str(tmp_path / "mnt")
        env["SEQSERVE_DEFAULT_MODEL"] = served
    elif model != "basicmotions":
        if not (ROOT / "models" / model / "model.json").exists():
            pytest.skip(f"no models/{model} to mount")
        mounted = tmp_path / "mnt" / model
        shutil.copytree(ROOT / "models" / model, mounted)
        env["SEQSERVE_MODEL_DIR"] = str(mounted)
    # Nothing listening yet: unhealthy with exit code 1.
    assert _healthcheck(stage, env).returncode == 1
    command = stage.exec_form("ENTRYPOINT") + stage.exec_form("CMD")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 45
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            check = _healthcheck(stage, env)
            if check.returncode == 0:
                break
            assert check.returncode == 1, check
            assert time.monotonic() < deadline, f"never healthy: {check.stderr}"
            time.sleep(0.3)
        assert check.stdout.strip() == "SERVING"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"seqserve_live_sessions" in r.read()
        server.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert server.wait(timeout=30) == 0
        version = "2" if model == "repository" else ""
        assert f"serving {served} v{version}" in (tmp_path / "server.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        log.close()
