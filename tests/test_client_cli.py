"""The ``seqserve`` command as a user runs it: subprocesses against a real ``seqserve-server``
subprocess (the in-process server lives in a test's event loop, a CLI needs one of its own)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, solo_run

from seqserve.client import Client, SeqServeError
from seqserve.client.inputs import bundled_samples

IDLE_TIMEOUT = 1.0  # seconds: short, so one test can watch a session expire


@pytest.fixture(scope="module")
def cli_server(model_dir: Path) -> Iterator[str]:
    pytest.importorskip("onnxruntime")
    port = free_port()
    target = f"127.0.0.1:{port}"
    process = subprocess.Popen(
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
            "--snapshot-path",
            "",
            "--model-dir",
            str(model_dir),
            "--session-idle-timeout",
            str(IDLE_TIMEOUT),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                with Client(target, timeout=2.0) as client:
                    if client.health() == "SERVING":
                        break
            except SeqServeError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become healthy within 60s")
            time.sleep(0.2)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def env(model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    samples = model_dir / "samples.npz"
    if samples.resolve() != bundled_samples().resolve():
        env["SEQSERVE_SAMPLES"] = str(samples)  # testing another model than the bundled one
    return env


def seqserve(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "seqserve.client", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("seqserve: error: ")
    return lines[0]


def test_health_and_model(cli_server, env, samples):
    health = seqserve(env, "--target", cli_server, "health")
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    text = seqserve({**env, "SEQSERVE_TARGET": cli_server}, "model")  # target from the env
    assert text.returncode == 0, text.stderr
    info = json.loads(seqserve(env, "--target", cli_server, "model", "--json").stdout)
    assert info["features"] == samples["x"].shape[2]
    assert all(label in text.stdout for label in info["labels"])


def test_stream_one_sample_prints_a_line_per_step_and_a_summary(
    cli_server, env, samples, model_dir
):
    result = seqserve(env, "--target", cli_server, "stream", "sample:0", "--rate", "0")
    assert result.returncode == 0, result.stderr
    n = int(samples["lengths"][0])
    steps = [line for line in result.stdout.splitlines() if re.match(r"sample:0 \d+/\d+ ", line)]
    assert [line.split()[1] for line in steps] == [f"{t}/{n}" for t in range(1, n + 1)]
    labels = json.loads(seqserve(env, "--target", cli_server, "model", "--json").stdout)["labels"]
    expected = labels[int(solo_run(model_dir, samples["x"][0][:n])[-1].argmax())]
    assert steps[-1].split()[2] == expected
    summary = result.stdout.splitlines()[-2:]
    assert summary[0].split()[:2] == ["sample:0", expected] and "true:" in summary[0]
    assert "steps/s" in summary[1] and "p50" in summary[1] and "p99" in summary[1]


def test_stream_several_samples_multiplexed_as_json(cli_server, env, samples):
    result = seqserve(env, "--target", cli_server, "stream", "samples:3", "--rate", "0", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    summary = records.pop()["summary"]
    for i in range(3):
        mine = [r for r in records if r["source"] == f"sample:{i}"]
        assert [r["position"] for r in mine] == list(range(int(samples["lengths"][i])))
        assert summary["sessions"][i]["label"] == mine[-1]["label"]
        assert summary["sessions"][i]["frames"] == len(mine)
    assert summary["steps"] == len(records) and summary["reconnects"] == 0
    assert summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0


def test_predict_csv_file_and_json(cli_server, env, samples, model_dir, tmp_path):
    n = int(samples["lengths"][1])
    x = samples["x"][1][:n]
    path = tmp_path / "walk.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([f"f{i}" for i in range(x.shape[1])])  # a header is skipped
        writer.writerows(x.tolist())
    out = tmp_path / "out.csv"
    result = seqserve(env, "--target", cli_server, "predict", str(path), "sample:1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["source"] for r in rows] == ["walk.csv", "sample:1"]
    assert rows[0]["label"] == rows[1]["label"]
    solo = solo_run(model_dir, x)
    per_step = seqserve(
        env, "--target", cli_server, "predict", "sample:1", "--per-step", "--format", "json"
    )
    assert per_step.returncode == 0, per_step.stderr
    record = json.loads(per_step.stdout)[0]
    assert np.abs(np.array(record["per_step"]) - solo).max() <= 1e-5
    assert record["label"] == rows[0]["label"]


def test_unreachable_server_is_one_line(env):
    result = seqserve(env, "--target", f"127.0.0.1:{free_port()}", "health", timeout=30)
    assert "cannot reach" in _one_line_error(result)
    debug = seqserve(env, "--target", f"127.0.0.1:{free_port()}", "--debug", "model")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_wrong_feature_count_and_missing_file_are_one_line(cli_server, env, samples, tmp_path):
    features = samples["x"].shape[2]
    path = tmp_path / "short.csv"
    path.write_text("\n".join(",".join(["0.5"] * (features - 1)) for _ in range(5)) + "\n")
    line = _one_line_error(seqserve(env, "--target", cli_server, "stream", str(path)))
    assert f"{features - 1} features" in line and f"expects {features}" in line
    line = _one_line_error(seqserve(env, "--target", cli_server, "predict", "nope.csv"))
    assert "nope.csv" in line


def test_expired_session_is_one_line(cli_server, env):
    rate = 0.5 / IDLE_TIMEOUT  # two idle timeouts between frames: the session expires
    result = seqserve(env, "--target", cli_server, "stream", "sample:0", "--rate", str(rate))
    line = _one_line_error(result)
    assert "expired" in line
