"""Operations: metrics, health, reflection, drain -> snapshot -> restart, settings, CLI."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import probs, solo_run, step_request

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

TOL = 1e-5


async def test_metrics_endpoint_counts_what_happened(server, stub, samples):
    app, _ = server
    x = samples["x"][0][:7]
    call = stub.Stream(iter([step_request("m", t, x[t : t + 1], start=t == 0) for t in range(7)]))
    async for _ in call:
        pass
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Step(step_request("m", 99, x[:1]))
    body = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    )
    m = 'model="basicmotions"'
    assert f'seqserve_steps_total{{{m},version="1"}} 7.0' in body
    assert (
        f'seqserve_requests_total{{code="OK",{m},protocol="native",rpc="Stream",version="1"}} 7.0'
        in body
    )
    assert (
        f'seqserve_requests_total{{code="FAILED_PRECONDITION",{m},protocol="native",rpc="Step",'
        'version=""} 1.0' in body
    )
    assert (
        f'seqserve_request_duration_seconds_bucket{{le="5e-05",{m},protocol="native",rpc="Stream",'
        'version="1"}' in body
    )
    assert f'seqserve_live_sessions{{{m},version="1"}} 1.0' in body
    assert f'seqserve_state_bytes{{{m},version="1"}} 2048.0' in body
    assert f'seqserve_model_version_state{{{m},state="ready",version="1"}} 1.0' in body
    for name in (
        "seqserve_queue_wait_seconds_bucket",
        "seqserve_inference_seconds_bucket",
        "seqserve_batch_size_bucket",
        f'seqserve_session_events_total{{event="opened",{m},version="1"}} 1.0',
        "seqserve_model_load_seconds{",
    ):
        assert name in body
    assert "session_id" not in body  # never a per-session label


async def test_health_serving_then_not_serving_while_draining(start_server):
    app, port = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "seqserve.v1.SeqServe"):
            r = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(app.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


@pytest.mark.parametrize("enabled", [True, False])
async def test_reflection_can_be_switched_off(start_server, enabled):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, port = await start_server(reflection=enabled)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        if enabled:
            reply = await call.read()
            names = {s.name for s in reply.list_services_response.service}
            assert "seqserve.v1.SeqServe" in names
        else:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_drain_snapshot_restart_resume_identical(start_server, samples, model_dir, settings):
    xs = [samples["x"][i][:40] for i in range(6)]
    app, port = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        first = [
            await stub.Step(step_request(f"d{i}", 0, x[:25], start=True)) for i, x in enumerate(xs)
        ]
        # A stream left open across the drain is ended with UNAVAILABLE, not cut mid-request.
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await queue.get()) is not None:
                yield item

        stream = stub.Stream(requests())
        queue.put_nowait(step_request("d0", 25, xs[0][25:26]))
        assert not (await stream.read()).HasField("error")
        await app.stop()
        assert await stream.code() == grpc.StatusCode.UNAVAILABLE
        md = dict(await stream.trailing_metadata())
        assert md.get("seqserve-reason") == "draining"
        queue.put_nowait(None)
    assert Path(settings.snapshot_path).exists()

    app2, port2 = await start_server()  # same snapshot path
    assert len(app2.engine.table) == len(xs)
    assert not Path(settings.snapshot_path).exists(), "a restored snapshot must not load twice"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port2}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        # d0's frame 25 was applied before the drain: a client that missed the reply resends it.
        replay = await stub.Step(step_request("d0", 25, xs[0][25:26]))
        assert replay.replayed
        # A drain loses nothing, so nothing is reported rolled back, and a gap is just a gap.
        info = await stub.GetSession(pb.SessionRef(session_id="d1"))
        assert (info.position, info.rolled_back) == (25, False)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Step(step_request("d1", 30, xs[1][30:31]))
        assert dict(err.value.trailing_metadata())["seqserve-reason"] == "position_gap"
        for i, x in enumerate(xs):
            start = 26 if i == 0 else 25
            r = await stub.Step(step_request(f"d{i}", start, x[start:]))
            whole = np.concatenate(
                [probs(first[i])] + ([probs(replay)] if i == 0 else []) + [probs(r)]
            )
            assert np.abs(whole - solo_run(model_dir, x)).max() <= TOL


async def test_new_work_is_refused_while_draining(start_server, samples):
    app, port = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        app.engine.draining = True
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Step(step_request("late", 0, samples["x"][0][:1], start=True))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.OpenSession(pb.OpenSessionRequest())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign_model", "empty"])
async def test_bad_snapshot_is_refused_whole(start_server, settings, samples, damage):
    from seqserve.server.errors import SnapshotError

    app, port = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        for i in range(3):
            await stub.Step(step_request(f"s{i}", 0, samples["x"][0][:5], start=True))
    await app.stop()
    path = Path(settings.snapshot_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a snapshot at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from seqserve.server.model import load_model_spec
        from seqserve.server.sessions import SessionTable
        from seqserve.server.snapshot import save_snapshot
        from seqserve.server.states import StateBank

        spec = load_model_spec(settings.model_dir)
        foreign = type(spec)(
            **{
                **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                "name": "other",
                "fingerprint": "0" * 64,
            }
        )
        table = SessionTable(
            StateBank(foreign, 10, settings.replay_window), max_sessions=10, idle_timeout=60
        )
        table.create("x")
        save_snapshot(path, foreign, table)
    with pytest.raises(SnapshotError) as info:
        await start_server()
    assert str(path) in str(info.value)
    assert path.exists(), "a refused snapshot is kept for inspection"
    app2, _ = await start_server(ignore_bad_snapshot=True)
    assert len(app2.engine.table) == 0


def test_settings_from_flags_and_environment():
    from seqserve.server.settings import parse_settings

    s = parse_settings(
        ["--max-sessions", "7", "--no-reflection"],
        environ={
            "SEQSERVE_MAX_BATCH": "9",
            "SEQSERVE_MAX_SESSIONS": "3",
            "SEQSERVE_ORT_SPINNING": "true",
        },
    )
    assert (s.max_sessions, s.max_batch, s.reflection, s.ort_spinning) == (7, 9, False, True)
    with pytest.raises(SystemExit):
        parse_settings([], environ={"SEQSERVE_MAX_BATCH": "lots"})
    with pytest.raises(SystemExit):
        parse_settings(["--max-batch", "0"], environ={})
    with pytest.raises(SystemExit):
        parse_settings(["--device", "tpu"], environ={})


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "seqserve.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_server_help_lists_every_setting():
    import dataclasses

    from seqserve.server.settings import Settings

    out = _cli("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for f in dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in out.stdout
        assert "SEQSERVE_" + f.name.upper() in out.stdout
    # Every flag's real default is shown, right before its environment variable.
    shown = {
        env: value
        for value, env in re.findall(r"\(default: ([^)]*)\) \[(SEQSERVE_[A-Z_]+)\]", text)
    }
    expected = {
        "SEQSERVE_" + f.name.upper(): (
            ("on" if f.default else "off")
            if isinstance(f.default, bool)
            else f"{f.default:g}"
            if isinstance(f.default, float)
            else str(f.default) or "empty"
        )
        for f in dataclasses.fields(Settings)
    }
    assert shown == expected
    assert shown["SEQSERVE_PORT"] == "50051" and shown["SEQSERVE_SESSION_IDLE_TIMEOUT"] == "600"
    # Where state goes is said up front.
    assert "only --snapshot-path (a file) or --store (Redis) keeps them" in text


async def test_by_default_nothing_is_written_and_a_snapshot_file_has_one_server(
    start_server, tmp_path, monkeypatch, samples
):
    """The defaults write no file (sessions live in memory); a snapshot file, when given, is
    locked by its server, so a second server given the same file refuses to start instead of
    restoring the same sessions and overwriting the first one's saves."""
    from seqserve.server import Settings
    from seqserve.server.errors import SnapshotError

    assert Settings().snapshot_path == ""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    app, port = await start_server(snapshot_path="", snapshot_interval=0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await pb_grpc.SeqServeStub(channel).Step(
            step_request("m", 0, samples["x"][0][:2], start=True)
        )
    await asyncio.sleep(0.2)  # several snapshot intervals
    await app.stop()
    assert list(workdir.iterdir()) == []

    shared = str(tmp_path / "state" / "sessions.npz")
    first, _ = await start_server(snapshot_path=shared)
    with pytest.raises(SnapshotError, match=r"in use by another seqserve server \(pid "):
        await start_server(snapshot_path=shared)
    await first.stop()  # the lock goes with the server
    again, _ = await start_server(snapshot_path=shared)
    await again.stop()


def test_a_second_server_process_on_one_snapshot_file_exits_with_a_clear_message(tmp_path):
    import fcntl

    shared = tmp_path / "sessions.npz"
    with open(f"{shared}.lock", "w") as held:  # what a running server holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242\n")
        held.flush()
        out = _cli("--snapshot-path", str(shared), "--port", "0", "--metrics-port", "-1")
    assert out.returncode == 2
    assert f"snapshot file {shared} is in use by another seqserve server (pid 4242" in out.stderr


def test_server_refuses_bad_model_dir_and_cuda_without_gpu(tmp_path, model_dir):
    out = _cli(
        "--model-dir", str(tmp_path), "--port", "0", "--metrics-port", "-1", "--http-port", "-1"
    )
    assert out.returncode == 2
    assert "model.json not found" in out.stderr
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        out = _cli(
            "--device",
            "cuda",
            "--model-dir",
            str(model_dir),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--snapshot-path",
            "",
        )
        assert out.returncode == 2
        assert "CUDAExecutionProvider" in out.stderr


def test_model_dir_checks(tmp_path, model_dir):
    import json
    import shutil

    from seqserve.server.errors import ModelError
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime

    target = tmp_path / "m"
    shutil.copytree(model_dir, target)
    meta = json.loads((target / "model.json").read_text())
    meta["graphs"]["step"]["file"] = "../../etc/passwd"
    (target / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="outside"):
        load_model_spec(target)
    shutil.copy(model_dir / "model.json", target / "model.json")
    (target / "step.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelError, match="checksum"):
        load_model_spec(target)
    shutil.copy(model_dir / "step.onnx", target / "step.onnx")
    meta = json.loads((target / "model.json").read_text())
    meta["states"][0]["input"] = "no_such_input"
    (target / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="no_such_input"):
        Runtime(load_model_spec(target))


@pytest.mark.timeout(90)  # a server that never says it serves fails here instead of hanging
@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_the_cli_serves_on_the_event_loop_asked_for_and_drains_on_sigterm(loop, samples, model_dir):
    """``--loop auto`` runs on uvloop (installed with seqserve[server]); ``--loop asyncio`` on
    the standard library's loop. Either way the process serves a stream exactly as in process
    (solo_run) and drains on SIGTERM with exit status 0."""
    import signal

    expected = "uvloop" if loop == "auto" else "asyncio"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-P", "-m", "seqserve.server", "--host", "127.0.0.1", "--port"),
            *("0", "--model-dir", str(model_dir), "--metrics-port", "-1", "--http-port", "-1"),
            *("--snapshot-path", "", "--loop", loop),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # the start-up line names the port and the loop
            lines.append(line)
            if " serving " in line:
                break
        started = lines[-1]
        assert f"; {expected} event loop)" in started, "".join(lines)
        port = int(re.search(r" on 127\.0\.0\.1:(\d+) ", started).group(1))  # type: ignore[union-attr]
        x = samples["x"][0][:5]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SeqServeStub(channel)
            answers = list(
                stub.Stream(
                    iter([step_request("l", t, x[t : t + 1], start=t == 0) for t in range(5)]),
                    timeout=30,
                )
            )
        got = np.concatenate([probs(a) for a in answers])
        np.testing.assert_allclose(got, solo_run(model_dir, x), atol=TOL)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
        assert proc.returncode == 0, rest
        assert "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_loop_uvloop_without_uvloop_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    from seqserve.server.app import loop_factory

    fake = tmp_path / "uvloop"  # a uvloop that cannot be imported, as where it is not installed
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no uvloop here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = _cli(
        "--loop", "uvloop", "--port", "0", "--metrics-port", "-1", "--http-port", "-1", env=env
    )
    assert out.returncode == 2
    assert "--loop uvloop: uvloop is not installed" in out.stderr
    # Where it is missing, auto means asyncio's own loop (None: asyncio.Runner's default).
    assert loop_factory("auto") is not None  # installed here, with seqserve[server]
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is None and loop_factory("asyncio") is None
