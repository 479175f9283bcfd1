"""The client and the ``seqserve`` CLI against a real in-process server serving a model repository
(copies of the bundled models: DIR/basicmotions/1, DIR/japanesevowels/1, and versions added while
it runs): models(), sessions of another model, pinning across a live load, resuming a session on
a draining version, batches across versions, the new error classes, load/unload permissions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster import Redis
from helpers import solo_run

from seqserve.client import (
    AsyncClient,
    AsyncSession,
    Client,
    ModelNotFound,
    PermissionDenied,
    SessionLost,
    VersionConflict,
    VersionUnavailable,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
TOL = 1e-5
WAIT = 20.0  # bound on every wait
ADMIN = "admin-token-0123456789abcd"
USER = "user-token-0123456789abcde"


def _recording(model: str, i: int) -> np.ndarray:
    with np.load(MODELS / model / "samples.npz") as data:
        return np.asarray(data["x"][i][: int(data["lengths"][i])], np.float32)


def _add_version(repository: Path, model: str, version: int, source: str = "") -> Path:
    """Copy a bundled model in as a new version, whole before it appears (copy, then rename),
    as a deployment should."""
    staging = repository / model / f".staging-{version}"
    shutil.copytree(MODELS / (source or model), staging)
    final = repository / model / str(version)
    staging.rename(final)
    return final


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    pytest.importorskip("onnxruntime")
    for model in ("basicmotions", "japanesevowels"):
        if not (MODELS / model / "model.json").exists():
            pytest.skip(f"no bundled models/{model}")
    root = tmp_path / "repository"
    for model in ("basicmotions", "japanesevowels"):
        root.joinpath(model).mkdir(parents=True)
        _add_version(root, model, 1)
    (root / "basicmotions" / "draft").mkdir()  # not a version: listed as a problem
    return root


@pytest.fixture
async def serve(start_server, repository):
    """``await serve(**overrides) -> port`` of a server on the repository."""

    async def start(**overrides: Any) -> int:
        _, port = await start_server(model_dir="", model_repository=str(repository), **overrides)
        return port

    return start


async def _until(what: str, check: Any) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_models_lists_every_version_and_the_repository_problems(serve):
    port = await serve()
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT) as client:
        listed = await client.models()
        info = await client.model("japanesevowels")
    assert listed.default_model == "basicmotions"
    assert listed.models == ("basicmotions", "japanesevowels")
    motions, vowels = listed.latest("basicmotions"), listed.latest("japanesevowels")
    assert motions is not None and vowels is not None
    assert (motions.version, motions.state, motions.default) == (1, "ready", True)
    assert (vowels.version, vowels.state, vowels.default) == (1, "ready", False)
    assert listed.latest() == motions  # "": the default model
    assert motions.fingerprint and vowels.fingerprint and motions.fingerprint != vowels.fingerprint
    assert motions.load_seconds > 0 and motions.sessions == 0
    (problem,) = listed.problems
    assert Path(problem.path).parts[-2:] == ("basicmotions", "draft") and "integer" in problem.why
    assert (info.name, info.version_number, info.features, info.state, info.latest) == (
        "japanesevowels",
        1,
        12,
        "ready",
        True,
    )
    assert info.fingerprint == vowels.fingerprint
    assert (info.serving_mode, info.window) == ("stateful", 0)  # trained on whole sequences


async def test_sessions_and_predict_of_a_named_model_equal_its_solo_run(serve):
    port = await serve()
    vowel, motion = _recording("japanesevowels", 3), _recording("basicmotions", 0)
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT) as client:
        # The same id on two models, on one stream: two sessions (one namespace per model).
        vowels = await client.open_session("twin", model="japanesevowels")
        motions = await client.open_session("twin")
        assert (vowels.model, vowels.version, motions.model, motions.version) == (
            "japanesevowels",
            1,
            "basicmotions",
            1,
        )
        futures = [vowels.send_nowait(f) for f in vowel] + [motions.send_nowait(f) for f in motion]
        preds = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
        info = await client.get_session("twin", model="japanesevowels")
        (whole,) = await client.predict([vowel], per_step=True, model="japanesevowels")
        await vowels.close()
        await motions.close()
    got_vowel = np.concatenate([p.probabilities for p in preds[: len(vowel)]])
    got_motion = np.concatenate([p.probabilities for p in preds[len(vowel) :]])
    assert np.abs(got_vowel - solo_run(MODELS / "japanesevowels", vowel)).max() <= TOL
    assert np.abs(got_motion - solo_run(MODELS / "basicmotions", motion)).max() <= TOL
    assert {(p.model, p.model_version) for p in preds[: len(vowel)]} == {("japanesevowels", 1)}
    assert {(p.model, p.model_version) for p in preds[len(vowel) :]} == {("basicmotions", 1)}
    assert preds[len(vowel) - 1].labels == tuple(str(i) for i in range(1, 10))
    assert (info.model, info.model_version, info.position) == ("japanesevowels", 1, len(vowel))
    assert (whole.model, whole.model_version) == ("japanesevowels", 1)
    assert whole.per_step is not None and np.abs(whole.per_step - got_vowel).max() <= TOL


async def test_a_version_loaded_live_keeps_sessions_on_theirs(serve, repository):
    """v2 loaded while a session streams on v1: the session stays on v1 (also after v1 is
    unloaded and it is resumed by another client), new sessions start on v2, a batch spans
    both, and v1 is released once its last session ends."""
    port = await serve()
    target = f"127.0.0.1:{port}"
    x = _recording("basicmotions", 1)
    half = len(x) // 2
    async with AsyncClient(target, timeout=WAIT) as client, AsyncClient(target) as other:
        old = await client.open_session("old")
        head = await old.send(x[:half])
        _add_version(repository, "basicmotions", 2)
        listed = await client.load_model("basicmotions")
        assert [(v.version, v.state) for v in listed.of("basicmotions")][-1] == (2, "ready")
        assert listed.latest("basicmotions").version == 2  # type: ignore[union-attr]
        async with client.session() as new:
            assert new.version == 2
            first = await new.send(x[0])
            batch = await client.step_batch(["old", new.id], x[half : half + 2], [half, 1])
            assert batch.ok and batch.model_versions.tolist() == [1, 2]
            assert np.array_equal(batch.next_positions, [half + 1, 2])
        await old.flush()
        # v1 leaves: draining, it keeps "old" and refuses new sessions.
        listed = await client.unload_model("basicmotions", version=1)
        v1 = listed.version("basicmotions", 1)
        assert v1 is not None and (v1.state, v1.sessions) == ("draining", 1)
        with pytest.raises(VersionConflict) as refused:
            await client.open_session(version=1)
        assert refused.value.reason == "version_draining"
        # Another client resumes "old" where it is: still on v1, to the end.
        resumed = await other.open_session("old", resume=True)
        assert (resumed.version, resumed.position) == (1, half + 1)
        assert resumed.labels == old.labels and resumed.features == old.features
        tail = await resumed.send(x[half + 1 :], end=True)
        await resumed.close()
        assert (head.model_version, first.model_version, tail.model_version) == (1, 2, 1)
        out = np.concatenate([head.probabilities, batch.probabilities[:1], tail.probabilities])
        assert np.abs(out - solo_run(MODELS / "basicmotions", x)).max() <= TOL

        async def released() -> bool:
            v1 = (await client.models()).version("basicmotions", 1)
            return v1 is not None and v1.state == "unavailable"

        await _until("v1 released after its last session", released)
        assert (await client.model()).version_number == 2


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = Redis("redis", tmp_path / "redis.log")
    server.start(tmp_path / "redis")  # skips without redis-server
    yield server.url
    server.kill()


async def test_a_session_resumes_on_a_replica_that_had_not_loaded_its_version(
    start_server, repository, redis_url, tmp_path
):
    """Replicas sharing Redis, as in a rolling update: A serves v1; B's repository holds v1
    and v2 and B serves v2 (latest:1). A session started on A resumes on B on v1, which B
    loads for it (a stream moved there by a proxy, a resume, unary steps), with outputs as if
    it had never moved; new sessions on B start on v2."""
    newer = tmp_path / "newer"
    shutil.copytree(repository, newer)
    _add_version(newer, "basicmotions", 2)
    shared = {"model_dir": "", "store": redis_url, "snapshot_path": ""}
    _, a = await start_server(model_repository=str(repository), replica_id="a", **shared)
    _, b = await start_server(model_repository=str(newer), replica_id="b", **shared)
    x = _recording("basicmotions", 3)
    half = len(x) // 2
    async with AsyncClient(f"127.0.0.1:{a}", timeout=WAIT) as on_a:
        started = await on_a.open_session("roams")
        head = await started.send(x[:half])
    async with AsyncClient(f"127.0.0.1:{b}", timeout=WAIT) as on_b:
        assert (await on_b.models()).version("basicmotions", 1) is None  # not loaded on B
        # What a stream a proxy moved to B sends: the session's next requests, nothing before.
        moved = AsyncSession(
            on_b.multiplexer,
            "roams",
            position=half,
            features=started.features,
            model=started.model,
            version=started.version,
        )
        middle = await moved.send(x[half:-2])
        resumed = await on_b.open_session("roams", resume=True)
        assert (resumed.model, resumed.version) == ("basicmotions", 1)
        assert resumed.position == len(x) - 2
        middle2 = await resumed.send(x[-2])
        last = await on_b.step("roams", x[-1], position=len(x) - 1)
        await resumed.close()
        async with on_b.session() as fresh:
            assert fresh.version == 2
        v1 = (await on_b.models()).version("basicmotions", 1)
    assert v1 is not None and v1.state in ("draining", "unavailable")  # loaded for "roams" only
    parts = (head, middle, middle2, last)
    assert [p.model_version for p in parts] == [1, 1, 1, 1]
    out = np.concatenate([p.probabilities for p in parts])
    assert np.abs(out - solo_run(MODELS / "basicmotions", x)).max() <= TOL


async def test_model_and_version_errors_map_to_their_classes(serve, repository):
    port = await serve()
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT) as client:
        for call in (
            client.open_session(model="nope"),
            client.predict([_recording("basicmotions", 0)], model="nope"),
            client.model("nope"),
        ):
            with pytest.raises(ModelNotFound) as missing:
                await call
            assert missing.value.reason == "unknown_model"
        with pytest.raises(ModelNotFound) as missing:
            await client.open_session(version=7)
        assert missing.value.reason == "unknown_version"

        x = _recording("basicmotions", 2)
        async with client.session("pinned") as s:
            await s.send(x[:3])
            _add_version(repository, "basicmotions", 2)
            await client.load_model("basicmotions", 2)
            with pytest.raises(VersionConflict) as mismatch:  # it is pinned to 1
                await client.step("pinned", x[3], position=3, version=2)
            assert mismatch.value.reason == "version_mismatch"
            with pytest.raises(VersionConflict):  # resuming it on 2: refused here, before
                await client.open_session("pinned", resume=True, version=2)
            assert (await s.send(x[3])).model_version == 1  # the session is unharmed

        # A half-copied version: its graphs fail their checksums, it never serves.
        broken = _add_version(repository, "basicmotions", 3)
        step = broken / "step.onnx"
        step.write_bytes(step.read_bytes()[: step.stat().st_size // 2])
        with pytest.raises(VersionUnavailable) as failed:
            await client.load_model("basicmotions", 3)
        assert failed.value.reason == "version_unavailable" and "checksum" in str(failed.value)
        with pytest.raises(VersionUnavailable) as unavailable:
            await client.open_session(version=3)
        # Not retried: a retried call that gave up says so and is a plain Unavailable.
        assert type(unavailable.value) is VersionUnavailable
        assert "gave up" not in str(unavailable.value) and "3" in str(unavailable.value)
        v3 = (await client.models()).version("basicmotions", 3)
        assert v3 is not None and v3.state == "unavailable" and "checksum" in v3.reason
        assert (await client.model()).version_number == 2  # new sessions: the latest good one


async def test_a_session_on_a_retired_version_is_lost_with_the_reason(serve, repository):
    port = await serve(version_drain_timeout=0.5)
    x = _recording("basicmotions", 0)
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT) as client:
        s = await client.open_session("stays")
        await s.send(x[:5])
        _add_version(repository, "basicmotions", 2)
        await client.load_model("basicmotions")
        await client.unload_model("basicmotions", version=1)

        async def retired() -> bool:
            v1 = (await client.models()).version("basicmotions", 1)
            return v1 is not None and v1.state == "unavailable"

        await _until("v1 retired after the drain timeout", retired)
        for _ in range(2):  # and the session stays dead
            with pytest.raises(SessionLost) as lost:
                await s.send(x[5])
            assert (lost.value.reason, lost.value.position) == ("version_retired", 5)
        with pytest.raises(SessionLost) as lost:
            await client.get_session("stays")
        assert lost.value.reason == "version_retired"
        async with client.session() as fresh:
            assert fresh.version == 2


async def test_only_admin_principals_load_and_unload(serve, repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin:{ADMIN}\nuser:{USER}\n")
    port = await serve(tokens_file=str(tokens), admin_principals="admin")
    target = f"127.0.0.1:{port}"
    _add_version(repository, "japanesevowels", 2)

    def sync_calls() -> None:  # the blocking client, in a thread (the server runs on this loop)
        with Client(target, token=USER, timeout=WAIT) as user:
            for call in (user.load_model, user.unload_model):
                with pytest.raises(PermissionDenied) as denied:
                    call("japanesevowels")
                assert denied.value.reason == "not_allowed"
            assert user.models().latest("japanesevowels").version == 1  # type: ignore[union-attr]
        with Client(target, token=ADMIN, timeout=WAIT) as admin:
            listed = admin.load_model("japanesevowels")
            assert listed.latest("japanesevowels").version == 2  # type: ignore[union-attr]
            with admin.session(model="japanesevowels") as s:
                p = s.send(_recording("japanesevowels", 0))
                assert (s.model, s.version, p.model_version) == ("japanesevowels", 2, 2)
            v2 = admin.unload_model("japanesevowels", version=2).version("japanesevowels", 2)
            assert v2 is not None and v2.state in ("draining", "unavailable")

    await asyncio.to_thread(sync_calls)


# -- the CLI ---------------------------------------------------------------------------------


def _cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    return subprocess.run(
        [sys.executable, "-P", "-m", "seqserve.client", "--target", target, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("seqserve: error: ")
    return line


async def test_cli_models_load_unload_and_stream_another_model(serve, repository):
    port = await serve()
    target = f"127.0.0.1:{port}"

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(_cli, target, *args)

    table = await cli("models")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "SESSIONS", "FLAGS", "REASON"]
    assert lines[1].split() == ["basicmotions", "1", "ready", "0", "latest,default"]
    assert lines[2].split() == ["japanesevowels", "1", "ready", "0", "latest"]
    assert lines[3].startswith("problem: ") and "draft" in lines[3]

    # stream --model japanesevowels sample:3: JapaneseVowels recording 3, frame by frame.
    vowel = _recording("japanesevowels", 3)
    streamed = await cli("stream", "--model", "japanesevowels", "sample:3", "--rate", "0", "--json")
    assert streamed.returncode == 0, streamed.stderr
    records = [json.loads(line) for line in streamed.stdout.splitlines()]
    summary = records.pop()["summary"]
    assert [r["position"] for r in records] == list(range(len(vowel)))
    assert {(r["model"], r["version"]) for r in records} == {("japanesevowels", 1)}
    solo = solo_run(MODELS / "japanesevowels", vowel)
    assert np.abs(np.array([r["probabilities"] for r in records]) - solo).max() <= TOL
    (session,) = summary["sessions"]
    assert (session["model"], session["version"], session["frames"]) == (
        "japanesevowels",
        1,
        len(vowel),
    )
    assert session["label"] == str(int(solo[-1].argmax()) + 1) and session["truth"] is not None
    text = await cli("stream", "--model", "japanesevowels", "sample:3", "--rate", "0")
    assert text.returncode == 0 and "japanesevowels v1" in text.stdout.splitlines()[-1]

    predicted = await cli(
        "predict", "--model", "japanesevowels", "sample:3", "--per-step", "--format", "json"
    )
    assert predicted.returncode == 0, predicted.stderr
    (record,) = json.loads(predicted.stdout)
    assert (record["model"], record["version"]) == ("japanesevowels", 1)
    assert np.abs(np.array(record["per_step"]) - solo).max() <= TOL

    older = await cli("model", "--model", "japanesevowels", "--version", "1")
    assert older.returncode == 0 and older.stdout.startswith("japanesevowels v1 [ready, latest]")
    _add_version(repository, "japanesevowels", 2)
    loaded = await cli("load", "japanesevowels", "--json")
    assert loaded.returncode == 0, loaded.stderr
    versions = json.loads(loaded.stdout)["versions"]
    assert {v["model"] for v in versions} == {"japanesevowels"}
    assert [(v["version"], v["state"], v["latest"]) for v in versions][-1] == (2, "ready", True)
    shown = await cli("model", "--model", "japanesevowels", "--json")
    assert json.loads(shown.stdout)["version"] == "2"
    unloaded = await cli("unload", "japanesevowels", "--version", "2")
    assert unloaded.returncode == 0, unloaded.stderr
    assert re.search(r"^japanesevowels\s+2\s+(draining|unavailable)\s", unloaded.stdout, re.M)

    assert "unknown model 'nope'" in _one_line_error(await cli("unload", "nope"))
    assert "unknown model" in _one_line_error(await cli("stream", "--model", "nope", "sample:0"))
    usage = await cli("load", "japanesevowels", "--version", "0")
    assert usage.returncode == 2 and "positive integer" in usage.stderr
