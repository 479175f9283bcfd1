"""Faults through real processes: a server killed with SIGKILL loses at most what came after its
last periodic snapshot, and says so, naming the last durable position."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import probs, solo_run, step_request

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(model_dir: Path, port: int, snapshot: Path, interval: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "seqserve.server", "--host", "127.0.0.1", "--port",
         str(port), "--metrics-port", "-1", "--model-dir", str(model_dir), "--snapshot-path",
         str(snapshot), "--snapshot-interval", str(interval), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
    return proc


def test_kill_9_loses_at_most_the_frames_after_the_last_snapshot(tmp_path, model_dir, samples):
    port, snapshot = _free_port(), tmp_path / "sessions.npz"
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
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    proc = _serve(model_dir, port, snapshot, interval=3.0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SeqServeStub(channel)
            for i, x in enumerate(xs):
                durable = stub.GetSession(pb.SessionRef(session_id=f"k{i}")).position
                assert durable == 30, "restored from the last snapshot, never from zero state"
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
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
