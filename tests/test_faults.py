"""Faults through real processes: a server killed with SIGKILL loses at most what came after its
last periodic snapshot, and says so, naming the last durable position."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import free_port, probs, solo_run, step_request

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc


def _serve(model_dir: Path, port: int, snapshot: Path, interval: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "seqserve.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--model-dir",
            str(model_dir),
            "--snapshot-path",
            str(snapshot),
            "--snapshot-interval",
            str(interval),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
    return proc


def _stop(proc: subprocess.Popen[str], sig: int, timeout: float) -> int:
    """Signal the server, wait for it, and close the pipe of its stderr."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        assert proc.stderr is not None
        proc.stderr.close()


def test_kill_9_loses_at_most_the_frames_after_the_last_snapshot(tmp_path, model_dir, samples):
    port, snapshot = free_port(), tmp_path / "sessions.npz"
    xs = [samples["x"][i * 10][:60] for i in range(4)]
    proc = _serve(model_dir, port, snapshot, interval=3.0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SeqServeStub(channel)
            outputs = {}
            for i, x in enumerate(xs):
                outputs[i] = [probs(stub.Step(step_request(f"k{i}", 0, x[:30], start=True)))]
            deadline = time.monotonic() + 15
            while not snapshot.exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # the first periodic snapshot (3 s after start) holds 30 frames
            for i, x in enumerate(xs):
                stub.Step(step_request(f"k{i}", 30, x[30:40]))  # acknowledged, then the crash
    finally:
        _stop(proc, signal.SIGKILL, 10)

    proc = _serve(model_dir, port, snapshot, interval=3.0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SeqServeStub(channel)
            for i, x in enumerate(xs):
                info = stub.GetSession(pb.SessionRef(session_id=f"k{i}"))
                durable = info.position
                assert durable == 30, "restored from the last snapshot, never from zero state"
                assert info.rolled_back  # a client that asks is told frames may be lost
                # The client resumes where it was; the server names the last durable position.
                with pytest.raises(grpc.RpcError) as info:
                    stub.Step(step_request(f"k{i}", 40, x[40:41]))
                meta = dict(info.value.trailing_metadata())
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert meta["seqserve-reason"] == "rolled_back"
                assert meta["seqserve-expected-position"] == "30"
                rest = stub.Step(step_request(f"k{i}", durable, x[durable:]))
                expected = solo_run(model_dir, x)
                assert np.abs(probs(rest) - expected[durable:]).max() <= 1e-5
                assert np.abs(outputs[i][0] - expected[:30]).max() <= 1e-5
                assert not stub.GetSession(pb.SessionRef(session_id=f"k{i}")).rolled_back
    finally:
        assert _stop(proc, signal.SIGTERM, 30) == 0


def test_sigterm_under_load_then_restart_loses_and_doubles_nothing(tmp_path, model_dir, samples):
    """16 sessions stream paced frames through the client library; the server is sent SIGTERM
    mid-stream (it drains and snapshots), a new one starts on the same port and snapshot, and the
    clients resume by themselves: every frame answered once, outputs identical to solo runs."""
    import asyncio

    from seqserve.client import AsyncClient, Backoff

    port, snapshot = free_port(), tmp_path / "sessions.npz"
    n_sessions, frames = 16, 100
    xs = [samples["x"][i % len(samples["x"])][:frames] for i in range(n_sessions)]
    procs = [_serve(model_dir, port, snapshot, interval=0.0)]

    async def restart(when: asyncio.Event) -> None:
        await when.wait()
        assert await asyncio.to_thread(_stop, procs[0], signal.SIGTERM, 30) == 0
        assert snapshot.exists()
        procs.append(await asyncio.to_thread(_serve, model_dir, port, snapshot, 0.0))

    async def run() -> tuple[list[np.ndarray], int]:
        halfway = asyncio.Event()
        replays = 0
        async with AsyncClient(
            f"127.0.0.1:{port}", retry=Backoff(initial=0.05, maximum=0.5, max_elapsed=60)
        ) as client:
            sessions = [await client.open_session(f"t{i}") for i in range(n_sessions)]

            async def feed(i: int) -> np.ndarray:
                nonlocal replays
                out = []
                for t in range(frames):
                    p = await sessions[i].send(xs[i][t])
                    replays += p.replayed
                    out.append(p.probabilities[0])
                    if t == frames // 2:
                        halfway.set()
                    await asyncio.sleep(0.003)
                return np.stack(out)

            restarter = asyncio.create_task(restart(halfway))
            outputs = await asyncio.wait_for(
                asyncio.gather(*(feed(i) for i in range(n_sessions))), 120
            )
            await restarter
            positions = [(await client.get_session(f"t{i}")).position for i in range(n_sessions)]
        assert positions == [frames] * n_sessions, "no frame lost or applied twice"
        return outputs, replays

    try:
        outputs, replays = asyncio.run(run())
    finally:
        for proc in procs:
            if proc.returncode is None:
                _stop(proc, signal.SIGTERM, 30)
    assert len(procs) == 2
    print(
        f"SIGTERM under load: {n_sessions * frames} frames, 0 lost, 0 doubled, "
        f"{replays} answered by replay after the restart"
    )
    for i, out in enumerate(outputs):
        assert out.shape == (frames, 4)
        assert np.abs(out - solo_run(model_dir, xs[i])).max() <= 1e-5
