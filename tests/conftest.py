"""Shared fixtures: the real server, in-process on 127.0.0.1:0, reached through real channels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Test modules import window_models and also name it in pytest_plugins (for its fixture): marked
# here, before any of them is collected, its asserts are rewritten on that first import instead
# of pytest warning that it was imported too early to rewrite.
pytest.register_assert_rewrite("window_models")

MODELS = Path(__file__).resolve().parent.parent / "models"
# SEQSERVE_TEST_MODEL_DIR runs the server tests against another model directory.
DEFAULT_MODEL = Path(os.environ.get("SEQSERVE_TEST_MODEL_DIR", MODELS / "basicmotions"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (DEFAULT_MODEL / "model.json").exists():
        pytest.skip("bundled model not exported yet")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def samples(model_dir: Path) -> dict[str, np.ndarray]:
    with np.load(model_dir / "samples.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> dict[str, np.ndarray]:
    with np.load(model_dir / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def settings(tmp_path: Path, model_dir: Path) -> Any:
    pytest.importorskip("onnxruntime")
    from seqserve.server import Settings

    return Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http_port=0,
        model_dir=str(model_dir),
        snapshot_path=str(tmp_path / "sessions.npz"),
        snapshot_interval=0.0,
        drain_grace=5.0,
        log_level="debug",
    )


@pytest.fixture
async def start_server(settings: Any) -> AsyncIterator[Callable[..., Any]]:
    """``await start_server(**overrides) -> (app, port)``; every server is stopped at the end."""
    from prometheus_client import CollectorRegistry

    from seqserve.server import create_server

    running: list[Any] = []

    async def start(**overrides: Any) -> tuple[Any, int]:
        app, port = create_server(settings.replace(**overrides), registry=CollectorRegistry())
        await app.start()
        running.append(app)
        return app, port

    yield start
    for app in running:
        with contextlib.suppress(Exception):
            await app.stop()


@pytest.fixture
async def server(start_server: Callable[..., Any]) -> tuple[Any, int]:
    return await start_server()


@pytest.fixture
async def stub(server: tuple[Any, int]) -> AsyncIterator[Any]:
    import grpc

    from seqserve.proto import seqserve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        yield pb_grpc.SeqServeStub(channel)


@pytest.fixture
def cluster(tmp_path: Path, model_dir: Path) -> Iterator[Callable[..., Any]]:
    """``cluster(replicas=2, redis=False, nginx=True, args=()) -> cluster.Cluster``: real
    seqserve replicas as subprocesses on loopback, optionally Redis and nginx in front
    (deploy/nginx/seqserve.conf), all SIGKILLed when the test ends. ``args`` go to every
    replica, with ``{name}`` and ``{redis}`` filled in. Skips without redis-server / nginx."""
    pytest.importorskip("onnxruntime")
    from cluster import Cluster, start_cluster

    made: list[Cluster] = []

    def start(**options: Any) -> Cluster:
        workdir = tmp_path / f"cluster-{len(made)}"
        workdir.mkdir()
        made.append(Cluster(workdir))
        return start_cluster(workdir, model_dir, cluster=made[-1], **options)

    yield start
    for c in made:
        c.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server on a free loopback port (``cluster.Redis``), killed when the test
    ends."""
    from cluster import Redis

    server = Redis("redis", tmp_path / "redis.log")
    server.start(tmp_path / "redis")
    yield server
    server.kill()
