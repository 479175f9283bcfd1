"""The loopback cluster harness itself (tests/cluster.py): Redis answers, replicas get their
arguments, stop, crash, hang and come back on the same ports, and nginx runs the deployed
config with only its addresses changed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cluster import NGINX_SITE, _serving, nginx_site

from seqserve.client import AsyncClient, SessionNotFound


def test_redis_answers_and_replicas_get_their_arguments(cluster, tmp_path):
    c = cluster(
        replicas=2,
        redis=True,
        nginx=False,
        args=("--snapshot-path", f"{tmp_path}/{{name}}.npz", "--max-sessions", "77"),
    )
    assert c.redis is not None and c.nginx is None
    assert c.redis.command("PING") == b"PONG"
    assert c.redis.command("SET", "k", "v") == b"OK"
    assert c.redis.command("GET", "k") == b"v"
    assert c.redis.url == f"redis://127.0.0.1:{c.redis.port}/0"
    for replica in c.replicas:
        assert replica.args[-4:] == (
            "--snapshot-path",
            f"{tmp_path}/{replica.name}.npz",
            "--max-sessions",
            "77",
        )
        assert replica.terminate() == 0  # SIGTERM drains and saves to its own file
        assert (tmp_path / f"{replica.name}.npz").exists()


async def test_a_replica_is_killed_paused_and_restarted_on_its_ports(cluster):
    c = cluster(replicas=1, nginx=False)
    replica = c.replica("replica-1")
    target, metrics_port = replica.target, replica.metrics_port
    async with AsyncClient(target, timeout=5) as client:
        await client.open_session("before")
    replica.pause()
    assert not _serving(target)  # the health check times out: nobody answers
    replica.resume()
    assert _serving(target)
    replica.kill()
    assert not replica.alive and not _serving(target)
    replica.restart()
    assert (replica.target, replica.metrics_port) == (target, metrics_port)
    assert replica.metric("seqserve_live_sessions") == 0
    async with AsyncClient(target, timeout=5) as client:
        with pytest.raises(SessionNotFound):  # kill -9: nothing saved, nothing restored
            await client.get_session("before")


def test_nginx_site_changes_only_the_addresses():
    original = NGINX_SITE.read_text()
    site = nginx_site("127.0.0.1:1", ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"])
    removed = [line for line in original.splitlines() if line not in site.splitlines()]
    added = [line for line in site.splitlines() if line not in original.splitlines()]
    assert [line.split()[:2] for line in removed] == [
        ["server", "replica-1:50051"],
        ["server", "replica-2:50051"],
        ["listen", "50051"],
    ]
    params = original.split("server replica-1:50051")[1].split(";")[0]
    assert [line.strip() for line in added] == [
        "server 127.0.0.1:2" + params + ";",
        "server 127.0.0.1:3" + params + ";",
        "server 127.0.0.1:4" + params + ";",
        "listen 127.0.0.1:1 http2;",
    ]


def _group(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_killing_nginx_takes_its_workers_along(cluster):
    c = cluster(replicas=1)
    assert c.nginx is not None
    group = c.nginx.pid
    assert len(_group(group)) >= 2  # master and worker
    c.nginx.kill()
    # SIGKILL reached the whole group; a dying worker may take a moment to be gone (on a loaded
    # machine), so wait for it, within a bound: a worker that survives fails the test.
    deadline = time.monotonic() + 10
    while _group(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group(group) == []
