"""The model repository against real servers (in-process, 127.0.0.1:0, real channels): layout and
version policies, loading and validation, live loads under streaming load, pinning, draining and
retiring, two models side by side, snapshots and Redis hand-overs that keep every session on its
exact graphs, metrics, and bad repositories that never stop the server serving what it had.

Version 2 of basicmotions is built by tests/repository_fixtures.py with graphs that differ from
version 1's in both states and outputs, so an answer from the wrong graph cannot pass for the
right one (they differ by far more than the 1e-5 tolerance on every stretch compared here)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import metric, probs, step_request
from repository_fixtures import (
    BASICMOTIONS,
    JAPANESEVOWELS,
    Repository,
    batch_invariant,
    copy_version,
    make_v2,
    step_run,
)

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

TOL = 1e-5
APART = 1e-3  # v1 and v2 answer further apart than this (100 x TOL) on every stretch compared
WAIT = 30.0  # bound on waiting for a state change (housekeeping runs every 0.25 s)
BM, JV = "basicmotions", "japanesevowels"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    return make_v2(tmp_path_factory.mktemp("v2") / "basicmotions-v2")


@pytest.fixture(scope="session")
def xs() -> np.ndarray:
    """basicmotions test recordings [40, 100, 6]."""
    with np.load(BASICMOTIONS / "samples.npz") as data:
        return data["x"].astype(np.float32)


@pytest.fixture(scope="session")
def jv_xs() -> tuple[np.ndarray, np.ndarray]:
    """japanesevowels recordings [n, T, 12] and their lengths."""
    with np.load(JAPANESEVOWELS / "samples.npz") as data:
        return data["x"].astype(np.float32), data["lengths"]


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "repo")


@dataclass
class Served:
    app: Any
    port: int
    stub: pb_grpc.SeqServeStub

    @property
    def registry(self) -> Any:
        return self.app.metrics.registry

    async def listing(self) -> pb.ModelList:
        return await self.stub.ListModels(pb.ListModelsRequest(), timeout=WAIT)

    async def states(self, model: str = BM) -> dict[int, str]:
        return {v.version: v.state for v in (await self.listing()).versions if v.model == model}

    async def status(self, model: str, version: int) -> pb.ModelVersionStatus:
        for v in (await self.listing()).versions:
            if (v.model, v.version) == (model, version):
                return v
        raise AssertionError(f"{model} v{version} not listed: {await self.listing()}")

    async def until(self, wanted: dict[int, str], model: str = BM) -> dict[int, str]:
        """Wait until the listed states include ``wanted`` (bounded: WAIT seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            states = await self.states(model)
            if all(states.get(v) == s for v, s in wanted.items()):
                return states
            if loop.time() > deadline:
                raise AssertionError(f"{model}: wanted {wanted}, still {states}")
            await asyncio.sleep(0.05)

    async def step(
        self,
        sid: str,
        x: np.ndarray,
        start: int,
        stop: int | None = None,
        *,
        model: str = "",
        version: int = 0,
    ) -> pb.StepResponse:
        """Frames ``x[start:stop]`` (one frame by default) of session ``sid``."""
        stop = start + 1 if stop is None else stop
        return await self.stub.Step(
            step_request(sid, start, x[start:stop], start=start == 0, model=model, version=version),
            timeout=WAIT,
        )


@pytest.fixture
async def serve(
    start_server: Callable[..., Any], repo: Repository
) -> AsyncIterator[Callable[..., Any]]:
    """``await serve(**settings) -> Served``: a server on ``repo`` (no snapshot file unless
    given), with a channel of its own."""
    channels: list[grpc.aio.Channel] = []

    async def start(**overrides: Any) -> Served:
        overrides.setdefault("model_dir", "")
        overrides.setdefault("model_repository", str(repo.root))
        overrides.setdefault("snapshot_path", "")
        app, port = await start_server(**overrides)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return Served(app, port, pb_grpc.SeqServeStub(channel))

    yield start
    for channel in channels:
        await channel.close()


async def refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """A unary call's status code, seqserve-reason and message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    meta = dict(info.value.trailing_metadata() or ())
    return info.value.code(), meta.get("seqserve-reason", ""), info.value.details() or ""


def on(
    out: np.ndarray, directory: Path, x: np.ndarray, first: int = 0, *, other: Path | None = None
) -> None:
    """``out`` are the answers to frames ``x[first:first + len(out)]`` of a session that began
    at frame 0 of ``x``, on the graphs in ``directory``: within 1e-5 of a solo run there (and,
    given ``other``, apart from a run on those graphs: the check can tell them apart)."""
    expected = step_run(directory, x[: first + len(out)])[first:]
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= TOL, np.abs(out - expected).max()
    if other is not None:
        elsewhere = step_run(other, x[: first + len(out)])[first:]
        assert np.abs(out - elsewhere).max() > APART


def bitwise(out: np.ndarray, directory: Path, x: np.ndarray) -> None:
    """Single-frame steps through the step graph: bit for bit what a solo frame-by-frame run on
    ``directory``'s graphs answers, on CPUs where onnxruntime's step is batch-invariant (checked
    here, in-process); within 1e-5 elsewhere."""
    expected = step_run(directory, x[: len(out)])
    if batch_invariant(directory):
        assert np.array_equal(out, expected), np.abs(out - expected).max()
    else:
        assert np.abs(out - expected).max() <= TOL


# -- layout and policies ------------------------------------------------------------------------


POLICIES = [
    # (--version-policy, basicmotions/config.json, served basicmotions, served japanesevowels)
    ("latest:1", None, {3}, {2}),
    ("latest:2", None, {2, 3}, {1, 2}),
    ("all", None, {1, 2, 3}, {1, 2}),
    ("specific:1,3", None, {1, 3}, {1}),
    ("all", {"specific": [2]}, {2}, {1, 2}),
    ("latest:1", {"latest": 2}, {2, 3}, {2}),
    ("latest:1", {"all": True}, {1, 2, 3}, {2}),
]


async def test_version_policies_choose_the_versions_served(serve, repo, v2_dir):
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(BM, 2, v2_dir)
    repo.add(BM, 3, BASICMOTIONS)
    repo.add(JV, 1, JAPANESEVOWELS)
    repo.add(JV, 2, JAPANESEVOWELS)
    for flag, config, bm, jv in POLICIES:
        config_path = repo.root / BM / "config.json"
        config_path.unlink(missing_ok=True)
        if config is not None:
            repo.policy(BM, config)
        served = await serve(version_policy=flag)
        listing = await served.listing()
        case = f"{flag} {config}"
        assert listing.default_model == BM
        got = {
            m: {v.version for v in listing.versions if v.model == m and v.state == "ready"}
            for m in (BM, JV)
        }
        assert got == {BM: bm, JV: jv}, case
        assert {(v.model, v.version) for v in listing.versions if v.state != "ready"} == set()
        latest = {v.model: v.version for v in listing.versions if v.latest}
        assert latest == {BM: max(bm), JV: max(jv)}, case
        info = await served.stub.GetModel(pb.ModelRequest(), timeout=WAIT)
        assert (info.name, info.version, info.latest) == (BM, str(max(bm)), True), case
        await served.app.stop()

    # A config.json that is not a policy: listed with its path and why; the model serves none
    # of its versions, the others serve as usual.
    repo.policy(BM, {"latest": 1})
    bad = repo.policy(JV, {"newest": 2})
    served = await serve()
    listing = await served.listing()
    problems = {p.path: p.why for p in listing.problems}
    assert str(bad) in problems, problems
    assert problems[str(bad)].startswith("version_policy {'newest': 2}: expected")
    assert await served.states(JV) == {}
    assert await served.states(BM) == {3: "ready"}


def test_a_bad_version_policy_flag_is_a_usage_error():
    from seqserve.server.settings import parse_settings

    for bad in ("newest", "latest:0", "specific:", "specific:0,2", "all:3"):
        with pytest.raises(SystemExit):
            parse_settings(["--version-policy", bad], environ={})
    assert parse_settings(["--version-policy", "specific:1,3"], environ={}).version_policy


# -- validation, problems, states and reasons ---------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    """A valid model directory outside the repository (targets for links)."""
    return copy_version(BASICMOTIONS, tmp_path / "outside")


async def test_every_broken_version_is_refused_with_its_reason_and_the_server_serves_the_rest(
    serve, repo, tmp_path, xs, caplog
):
    caplog.set_level(logging.INFO, logger="seqserve")
    outside = _outside(tmp_path)
    repo.add(BM, 1, BASICMOTIONS)
    repo.add_lying_states(BM, 2, BASICMOTIONS)
    repo.add_wrong_checksum(BM, 3, BASICMOTIONS)
    repo.add_wrong_reference(BM, 4, BASICMOTIONS)
    repo.add_half_copied(BM, 5, BASICMOTIONS)
    repo.add_non_integer(BM, "latest", BASICMOTIONS)
    repo.add_symlink_out(BM, 6, outside)
    escaping = repo.add(BM, 7, BASICMOTIONS)  # model.json points at a graph outside its folder
    Repository._edit(
        escaping, lambda m: m["graphs"]["step"].update(file="../../../outside/step.onnx")
    )
    linked = repo.add(BM, 8, BASICMOTIONS)  # its step graph is a link to a file outside
    (linked / "step.onnx").unlink()
    (linked / "step.onnx").symlink_to(outside / "step.onnx")
    no_reference = repo.add(BM, 9, BASICMOTIONS)
    (no_reference / "reference.npz").unlink()
    (repo.root / BM / "0").mkdir()  # not a positive integer either
    (repo.root / BM / "10").mkdir()  # no model.json (yet)
    (repo.root / "bad name").mkdir()  # not a model name

    served = await serve(version_policy="all", repository_poll=0.1)
    why = {
        2: "no state input 'no_such_input'",
        3: "sequence.onnx: checksum does not match model.json",
        4: "differ from the reference outputs",
        5: "step.onnx: checksum does not match model.json",
        7: "outside",
        8: "outside",
        9: "reference.npz: missing",
    }
    listing = await served.listing()
    status = {v.version: v for v in listing.versions if v.model == BM}
    assert set(status) == {1, *why}, status.keys()
    assert (status[1].state, status[1].latest, status[1].reason) == ("ready", True, "")
    for version, text in why.items():
        assert status[version].state == "unavailable", version
        assert text in status[version].reason, (version, status[version].reason)
        assert not status[version].latest and not status[version].fingerprint
    problems = {Path(p.path).name: p.why for p in listing.problems}
    assert problems["latest"] == "version folder names are positive integers"
    assert problems["0"] == "version folder names are positive integers"
    assert problems["6"].startswith("a link to outside the repository")
    assert problems["10"].startswith("no model.json")
    assert problems["bad name"].startswith("model names are")
    # The log says the same, with the path; the metrics count every failed load once.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for version, text in why.items():
        assert f"model basicmotions version {version} failed to load" in logged
        assert text in logged
    assert f"{repo.root / BM / 'latest'}: version folder names are positive integers" in logged
    for version in why:
        labels = {"model": BM, "version": str(version)}
        assert metric(served.registry, "seqserve_model_load_failures_total", labels) == 1
        state = {**labels, "state": "unavailable"}
        assert metric(served.registry, "seqserve_model_version_state", state) == 1
    assert metric(served.registry, "seqserve_model_load_failures_total", {"version": "1"}) in (
        None,
        0,
    )
    ready = {"model": BM, "version": "1", "state": "ready"}
    assert metric(served.registry, "seqserve_model_version_state", ready) == 1

    # It serves version 1 all along.
    answer = await served.step("s", xs[0], 0, 5)
    assert answer.model_version == 1
    on(probs(answer), BASICMOTIONS, xs[0])

    # A failed version is not tried again on every poll, only once its files change: the
    # half-copied one loads once its copy completes.
    await asyncio.sleep(0.5)  # several polls
    failures = {"model": BM, "version": "5"}
    assert metric(served.registry, "seqserve_model_load_failures_total", failures) == 1
    # and a problem is logged when it appears, not again at every poll
    latest = f"{repo.root / BM / 'latest'}: version folder names are positive integers"
    assert sum(latest in r.getMessage() for r in caplog.records) == 1
    repo.complete(BM, 5, BASICMOTIONS)
    await served.until({5: "ready"})
    status = await served.status(BM, 5)
    assert status.latest and status.reason == "" and status.fingerprint
    assert (await served.step("new", xs[1], 0)).model_version == 5
    assert (await served.step("s", xs[0], 5)).model_version == 1  # s stays on its version


async def test_a_new_version_that_fails_validation_never_replaces_a_good_one(
    serve, repo, v2_dir, xs, tmp_path
):
    """With latest:1, a broken version 2 appearing (by poll, or by LoadModel) leaves version 1
    ready and the latest: new sessions go on starting there. Once version 2 is fixed it loads
    and version 1 drains."""
    repo.add(BM, 1, BASICMOTIONS)
    served = await serve(repository_poll=0.1)
    await served.step("before", xs[0], 0, 10)
    broken = repo.add_wrong_checksum(BM, 2, v2_dir)
    await served.until({2: "unavailable"})
    await asyncio.sleep(0.3)  # a few more polls
    assert await served.states() == {1: "ready", 2: "unavailable"}
    assert (await served.status(BM, 1)).latest
    code, reason, message = await refused(
        served.stub.LoadModel(pb.LoadModelRequest(model=BM, version=2), timeout=WAIT)
    )
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "version_unavailable")
    assert "checksum does not match" in message
    assert await served.states() == {1: "ready", 2: "unavailable"}
    # Other bad things appearing while it serves: listed with the path and why, nothing else.
    repo.add_non_integer(BM, "v3", v2_dir)
    (repo.root / "elsewhere").symlink_to(tmp_path / "outside-model", target_is_directory=True)
    copy_version(v2_dir, tmp_path / "outside-model" / "1")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        problems = {p.path: p.why for p in (await served.listing()).problems}
        if len(problems) == 2 or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert problems == {
        str(repo.root / BM / "v3"): "version folder names are positive integers",
        str(repo.root / "elsewhere"): f"a link to outside the repository {repo.root}",
    }
    assert await served.states() == {1: "ready", 2: "unavailable"}
    assert await served.states("elsewhere") == {}
    answer = await served.step("after", xs[1], 0, 3)
    assert answer.model_version == 1
    before = await served.step("before", xs[0], 10, 20)
    assert before.model_version == 1
    on(probs(before), BASICMOTIONS, xs[0], 10)

    # Fixed (the folder replaced with a good copy): it loads, and version 1 drains.
    repo.remove(BM, 2)
    assert not broken.exists()
    repo.add(BM, 2, v2_dir)
    await served.until({2: "ready", 1: "draining"})
    assert (await served.step("newest", xs[2], 0)).model_version == 2


async def test_a_server_starting_on_a_broken_latest_version_serves_the_one_before(
    serve, repo, v2_dir, xs
):
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(BM, 2, BASICMOTIONS)
    repo.add_lying_states(BM, 3, v2_dir)
    served = await serve(version_policy="latest:2")
    assert await served.states() == {1: "ready", 2: "ready", 3: "unavailable"}
    assert (await served.status(BM, 2)).latest
    assert "no state input" in (await served.status(BM, 3)).reason
    answer = await served.step("s", xs[0], 0, 3)
    assert answer.model_version == 2
    on(probs(answer), BASICMOTIONS, xs[0])


# -- load, unload, admin principals -------------------------------------------------------------

ALICE = (("authorization", "Bearer alice-token-0123456789"),)
BOB = (("authorization", "Bearer bob-token-0123456789ab"),)


@pytest.fixture
def tokens_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text("alice:alice-token-0123456789\nbob:bob-token-0123456789ab\n")
    return str(path)


async def test_load_and_unload_are_for_admin_principals_when_authentication_is_on(
    serve, repo, v2_dir, tokens_file
):
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(BM, 2, v2_dir)
    served = await serve(
        version_policy="specific:1", tokens_file=tokens_file, admin_principals="alice"
    )
    load = pb.LoadModelRequest(model=BM, version=2)
    code, reason, _ = await refused(served.stub.LoadModel(load, metadata=BOB, timeout=WAIT))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "not_allowed")
    code, _, _ = await refused(served.stub.LoadModel(load, timeout=WAIT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    unload = pb.LoadModelRequest(model=BM, version=1)
    code, reason, _ = await refused(served.stub.UnloadModel(unload, metadata=BOB, timeout=WAIT))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "not_allowed")
    # Anyone authenticated may list.
    listing = await served.stub.ListModels(pb.ListModelsRequest(), metadata=BOB, timeout=WAIT)
    assert {(v.version, v.state) for v in listing.versions} == {(1, "ready")}
    # alice may.
    listing = await served.stub.LoadModel(load, metadata=ALICE, timeout=WAIT)
    assert {(v.version, v.state) for v in listing.versions} == {(1, "ready"), (2, "ready")}
    listing = await served.stub.UnloadModel(unload, metadata=ALICE, timeout=WAIT)
    assert {(v.version, v.state) for v in listing.versions if v.version == 1} <= {
        (1, "draining"),
        (1, "unavailable"),
    }
    await served.app.stop()

    # Authentication on and no --admin-principals: nobody may.
    served = await serve(version_policy="specific:1", tokens_file=tokens_file)
    code, reason, _ = await refused(served.stub.LoadModel(load, metadata=ALICE, timeout=WAIT))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "not_allowed")
    assert await served.stub.ListModels(pb.ListModelsRequest(), metadata=ALICE, timeout=WAIT)
    await served.app.stop()

    # Authentication off: load and unload are open (a loopback or private deployment).
    served = await serve(version_policy="specific:1")
    await served.stub.LoadModel(load, timeout=WAIT)
    assert await served.states() == {1: "ready", 2: "ready"}
    await served.stub.UnloadModel(pb.LoadModelRequest(model=BM, version=2), timeout=WAIT)
    await served.until({2: "unavailable"})  # no sessions: released at once


async def test_load_model_applies_the_policy_and_unload_drains(serve, repo, v2_dir, xs):
    """LoadModel of a model (no version) after version 2 arrived with latest:1 serves version 2
    and drains version 1, as the poll would; UnloadModel drains what is named; with nothing
    ready, new sessions are refused (UNAVAILABLE) while pinned ones go on."""
    repo.add(BM, 1, BASICMOTIONS)
    served = await serve()
    await served.step("pinned", xs[0], 0, 4)
    repo.add(BM, 2, v2_dir)
    listing = await served.stub.LoadModel(pb.LoadModelRequest(model=BM), timeout=WAIT)
    states = {v.version: (v.state, v.latest) for v in listing.versions}
    assert states == {1: ("draining", False), 2: ("ready", True)}
    assert "not in the version policy" in (await served.status(BM, 1)).reason
    await served.stub.UnloadModel(pb.LoadModelRequest(model=BM), timeout=WAIT)
    states = await served.until({2: "unavailable"})  # no sessions on 2: released
    assert states[1] == "draining"
    code, reason, message = await refused(served.step("fresh", xs[1], 0))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "version_unavailable")
    assert "no ready version" in message
    answer = await served.step("pinned", xs[0], 4, 8)
    assert answer.model_version == 1
    on(probs(answer), BASICMOTIONS, xs[0], 4)
    # Loading it again: served once more.
    await served.stub.LoadModel(pb.LoadModelRequest(model=BM, version=2), timeout=WAIT)
    assert (await served.step("fresh", xs[1], 0)).model_version == 2


async def test_the_poll_picks_up_added_and_removed_versions_and_models(serve, repo, v2_dir):
    repo.add(BM, 1, BASICMOTIONS)
    served = await serve(repository_poll=0.1)
    assert await served.states() == {1: "ready"}
    repo.add(BM, 2, v2_dir)
    await served.until({2: "ready", 1: "unavailable"})  # v1 had no sessions
    assert "released" in (await served.status(BM, 1)).reason
    assert (await served.status(BM, 2)).latest
    # Version 2 removed: version 1 is wanted again, version 2 drains and goes (released, and
    # then forgotten: its folder is gone).
    repo.remove(BM, 2)
    await served.until({1: "ready"})
    assert (await served.status(BM, 1)).latest
    while (await served.states()).get(2) in ("ready", "draining"):
        await asyncio.sleep(0.05)
    # A model added, then removed.
    repo.add(JV, 1, JAPANESEVOWELS)
    await served.until({1: "ready"}, JV)
    info = await served.stub.GetModel(pb.ModelRequest(model=JV), timeout=WAIT)
    assert info.features == 12
    repo.remove(JV, 1)
    (repo.root / JV).rmdir()
    await served.until({1: "unavailable"}, JV)
    assert "removed from the repository" in (await served.status(JV, 1)).reason


# -- live loading under load --------------------------------------------------------------------

LIVE_OLD, LIVE_NEW, LOAD_AT, HOLD_AT, AFTER, NEW_FRAMES = 200, 40, 5, 80, 10, 15


async def test_version_2_loads_live_under_200_streaming_sessions(serve, repo, v2_dir, xs):
    """200 sessions stream frame by frame through the client library while version 2 is copied
    in and loaded (they go on answering while it loads: the load runs off the event loop) and
    for a while after; sessions opened once it is ready run on it. Every session's answers are
    its solo run on the version it started on, bit for bit where the CPU's step is
    batch-invariant; nothing fails and the stream never drops."""
    from seqserve.client import AsyncClient

    repo.add(BM, 1, BASICMOTIONS)
    served = await serve()
    ready, all_started = asyncio.Event(), asyncio.Event()
    loaded: list[pb.ModelList] = []
    reached, during = [0], [0]
    loading = [False]
    x = [xs[i % len(xs)] for i in range(LIVE_OLD + LIVE_NEW)]

    async with AsyncClient(f"127.0.0.1:{served.port}", timeout=WAIT) as client:
        old = [await client.open_session(f"old-{i}") for i in range(LIVE_OLD)]

        async def feed_old(session: Any, i: int) -> np.ndarray:
            """Frames until AFTER frames past the moment version 2 is ready (waiting at
            HOLD_AT if the load takes that long)."""
            out: list[np.ndarray] = []
            stop = None
            t = 0
            while stop is None or t < stop:
                if t == LOAD_AT:
                    reached[0] += 1
                    if reached[0] == LIVE_OLD:
                        all_started.set()
                if t == HOLD_AT:
                    await ready.wait()
                if stop is None and ready.is_set():
                    stop = t + AFTER
                out.append((await session.send(x[i][t])).probabilities[0])
                during[0] += loading[0]
                t += 1
            return np.stack(out)

        async def feed_new(session: Any, i: int) -> np.ndarray:
            return np.stack(
                [(await session.send(x[i][t])).probabilities[0] for t in range(NEW_FRAMES)]
            )

        async def load() -> None:
            await all_started.wait()
            repo.add(BM, 2, v2_dir)
            loading[0] = True
            loaded.append(await served.stub.LoadModel(pb.LoadModelRequest(model=BM), timeout=WAIT))
            loading[0] = False
            ready.set()

        loader = asyncio.create_task(load())
        olds = asyncio.gather(*(feed_old(s, i) for i, s in enumerate(old)))
        await ready.wait()
        new = [await client.open_session(f"new-{i}") for i in range(LIVE_NEW)]
        news = await asyncio.gather(*(feed_new(s, LIVE_OLD + i) for i, s in enumerate(new)))
        outs = await olds
        await loader
        versions = {
            s.id: (await served.stub.GetSession(pb.SessionRef(session_id=s.id))).model_version
            for s in old + new
        }
        assert client.multiplexer.reconnects == 0
    states = {v.version: v.state for v in loaded[0].versions}
    assert states == {1: "draining", 2: "ready"}
    assert during[0] > 0  # answers kept coming while version 2 loaded
    assert versions == {
        **{f"old-{i}": 1 for i in range(LIVE_OLD)},
        **{f"new-{i}": 2 for i in range(LIVE_NEW)},
    }
    for i, out in enumerate(outs):
        assert len(out) > LOAD_AT + AFTER
        bitwise(out, BASICMOTIONS, x[i])
    for i, out in enumerate(news):
        bitwise(out, v2_dir, x[LIVE_OLD + i])
    # v1 and v2 answer differently: the checks above could tell a session on the wrong one.
    assert np.abs(step_run(v2_dir, x[0][: len(outs[0])]) - outs[0]).max() > APART
    answered = {
        (sample.labels["code"], sample.labels["version"]): sample.value
        for family in served.registry.collect()
        for sample in family.samples
        if sample.name == "seqserve_requests_total" and sample.labels["rpc"] == "Stream"
    }
    assert answered.pop(("OK", "1")) == sum(len(o) for o in outs)
    assert answered.pop(("OK", "2")) == LIVE_NEW * NEW_FRAMES
    assert not any(answered.values()), answered  # no error of any kind


# -- pinning, draining, retiring ----------------------------------------------------------------


async def test_sessions_are_pinned_to_the_version_they_started_on(serve, repo, v2_dir, xs):
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(BM, 2, v2_dir)
    served = await serve(version_policy="all")
    latest = await served.step("latest", xs[0], 0, 10)  # names no version: the latest
    named = await served.step("named", xs[1], 0, 10, version=1)
    assert (latest.model, latest.model_version) == (BM, 2)
    assert (named.model, named.model_version) == (BM, 1)
    on(probs(latest), v2_dir, xs[0], other=BASICMOTIONS)
    on(probs(named), BASICMOTIONS, xs[1], other=v2_dir)
    # Naming no version goes on with the session's own; naming its own is fine.
    again = await served.step("named", xs[1], 10, 20)
    assert again.model_version == 1
    on(probs(again), BASICMOTIONS, xs[1], 10)
    again = await served.step("named", xs[1], 20, 25, version=1)
    assert again.model_version == 1
    # Naming another version is refused, and changes nothing.
    code, reason, message = await refused(served.step("named", xs[1], 25, version=2))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "version_mismatch")
    assert "version 1" in message
    info = await served.stub.GetSession(pb.SessionRef(session_id="named"))
    assert (info.position, info.model, info.model_version) == (25, BM, 1)
    # OpenSession names a version too; a session id is one session per model.
    opened = await served.stub.OpenSession(pb.OpenSessionRequest(session_id="o", version=1))
    assert (opened.model_version, opened.position) == (1, 0)
    assert (await served.step("o", xs[2], 0)).model_version == 1
    code, reason, _ = await refused(
        served.stub.OpenSession(pb.OpenSessionRequest(session_id="named", version=2))
    )
    assert code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION), reason
    # On a stream too, in-band.
    call = served.stub.Stream()
    await call.write(step_request("latest", 10, xs[0][10:11], version=1))
    await call.write(step_request("latest", 10, xs[0][10:11]))
    await call.done_writing()
    answers = [a async for a in call]
    assert answers[0].error.reason == "version_mismatch"
    assert answers[1].model_version == 2 and not answers[1].HasField("error")
    on(probs(answers[1]), v2_dir, xs[0], 10)


async def test_a_draining_version_serves_its_sessions_and_is_released_after_the_last(
    serve, repo, v2_dir, xs
):
    repo.add(BM, 1, BASICMOTIONS)
    served = await serve()
    for sid, i in (("a", 0), ("b", 1)):
        await served.step(sid, xs[i], 0, 10)
    repo.add(BM, 2, v2_dir)
    await served.stub.LoadModel(pb.LoadModelRequest(model=BM), timeout=WAIT)
    status = await served.status(BM, 1)
    assert (status.state, status.sessions) == ("draining", 2)
    labels = {"model": BM, "version": "1", "state": "draining"}
    assert metric(served.registry, "seqserve_model_version_state", labels) == 1
    # Its sessions go on there; new ones start on version 2; it takes no new ones.
    a = await served.step("a", xs[0], 10, 20)
    assert a.model_version == 1
    on(probs(a), BASICMOTIONS, xs[0], 10, other=v2_dir)
    assert (await served.step("c", xs[2], 0)).model_version == 2
    code, reason, _ = await refused(served.step("d", xs[3], 0, version=1))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "version_draining")
    code, reason, _ = await refused(
        served.stub.OpenSession(pb.OpenSessionRequest(session_id="d", version=1))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "version_draining")
    # Released when its last session ends, not before.
    await served.stub.CloseSession(pb.SessionRef(session_id="a"))
    await asyncio.sleep(0.6)  # housekeeping turns (0.25 s each)
    assert (await served.status(BM, 1)).state == "draining"
    b = await served.step("b", xs[1], 10, 12)
    assert b.model_version == 1
    await served.stub.CloseSession(pb.SessionRef(session_id="b"))
    await served.until({1: "unavailable"})
    assert "released" in (await served.status(BM, 1)).reason
    assert (await served.status(BM, 1)).sessions == 0
    # Its sessions are still told they were closed (not "unknown") once it is gone.
    code, reason, _ = await refused(served.step("a", xs[0], 20))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "closed")


async def test_a_draining_version_is_released_when_its_last_session_expires(
    serve, repo, v2_dir, xs
):
    repo.add(BM, 1, BASICMOTIONS)
    served = await serve(session_idle_timeout=1.0)
    await served.step("idle", xs[0], 0, 3)
    repo.add(BM, 2, v2_dir)
    await served.stub.LoadModel(pb.LoadModelRequest(model=BM), timeout=WAIT)
    assert (await served.status(BM, 1)).state == "draining"
    await served.until({1: "unavailable"})  # the session expired: nothing left to serve
    code, reason, _ = await refused(served.step("idle", xs[0], 3))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "expired")
    assert metric(
        served.registry,
        "seqserve_session_events_total",
        {"event": "expired", "model": BM, "version": "1"},
    )


async def test_the_drain_timeout_retires_a_version_and_its_sessions_are_told(
    serve, repo, v2_dir, xs
):
    repo.add(BM, 1, BASICMOTIONS)
    served = await serve(version_drain_timeout=0.5)
    await served.step("late", xs[0], 0, 7)
    await served.step("streamer", xs[1], 0, 3)
    repo.add(BM, 2, v2_dir)
    await served.stub.LoadModel(pb.LoadModelRequest(model=BM), timeout=WAIT)
    await served.until({1: "unavailable"})
    assert "released" in (await served.status(BM, 1)).reason
    code, reason, message = await refused(served.step("late", xs[0], 7))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "version_retired")
    assert "version 1" in message
    code, reason, _ = await refused(served.stub.GetSession(pb.SessionRef(session_id="late")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "version_retired")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.step("late", xs[0], 7)
    assert dict(info.value.trailing_metadata())["seqserve-expected-position"] == "7"
    # In a stream: the error in-band, with the position it ended at; never an answer from v2.
    call = served.stub.Stream()
    await call.write(step_request("streamer", 3, xs[1][3:4]))
    await call.done_writing()
    (answer,) = [a async for a in call]
    assert (answer.error.reason, answer.error.expected_position) == ("version_retired", 3)
    assert answer.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    # A new session of that id starts afresh on version 2.
    fresh = await served.step("new", xs[2], 0)
    assert fresh.model_version == 2


async def test_a_step_batch_spanning_two_versions_runs_each_entry_on_its_own(
    serve, repo, v2_dir, xs
):
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(BM, 2, v2_dir)
    served = await serve(version_policy="all")
    await served.step("one", xs[0], 0, 5, version=1)
    await served.step("two", xs[1], 0, 5)
    await served.step("one-b", xs[2], 0, 5, version=1)
    ids = ["one", "two", "one-b", "ghost"]
    rows = [0, 1, 2, 3]
    frames = np.stack([xs[r][5] for r in rows])
    from seqserve.proto.codec import to_matrix

    answer = await served.stub.StepBatch(
        pb.StepBatchRequest(session_ids=ids, positions=[5, 5, 5, 5], frames=to_matrix(frames)),
        timeout=WAIT,
    )
    assert list(answer.model_versions) == [1, 2, 1, 0]
    assert [e.index for e in answer.errors] == [3]
    assert answer.errors[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    out = probs(answer)
    for j, (directory, other) in enumerate(
        [(BASICMOTIONS, v2_dir), (v2_dir, BASICMOTIONS), (BASICMOTIONS, v2_dir)]
    ):
        on(out[j : j + 1], directory, xs[rows[j]], 5, other=other)
    assert list(answer.next_positions)[:3] == [6, 6, 6]
    # Naming a version applies it to every entry: the entries on another one are refused.
    answer = await served.stub.StepBatch(
        pb.StepBatchRequest(
            session_ids=ids[:3],
            positions=[6, 6, 6],
            frames=to_matrix(np.stack([xs[r][6] for r in rows[:3]])),
            version=1,
        ),
        timeout=WAIT,
    )
    assert list(answer.model_versions) == [1, 0, 1]
    assert [(e.index, e.error.reason) for e in answer.errors] == [(1, "version_mismatch")]


async def test_unknown_models_and_versions_are_not_found(serve, repo, xs):
    repo.add(BM, 1, BASICMOTIONS)
    served = await serve()
    stub = served.stub
    cases = {
        "Step model": served.step("s", xs[0], 0, model="nope"),
        "Step version": served.step("s", xs[0], 0, version=9),
        "Predict model": stub.Predict(pb.PredictRequest(model="nope"), timeout=WAIT),
        "Predict version": stub.Predict(pb.PredictRequest(version=9), timeout=WAIT),
        "GetModel model": stub.GetModel(pb.ModelRequest(model="nope"), timeout=WAIT),
        "GetModel version": stub.GetModel(pb.ModelRequest(model=BM, version=9), timeout=WAIT),
        "Open model": stub.OpenSession(pb.OpenSessionRequest(model="nope"), timeout=WAIT),
        "Open version": stub.OpenSession(pb.OpenSessionRequest(version=9), timeout=WAIT),
        "GetSession model": stub.GetSession(pb.SessionRef(session_id="s", model="nope")),
        "Load model": stub.LoadModel(pb.LoadModelRequest(model="nope"), timeout=WAIT),
        "Load version": stub.LoadModel(pb.LoadModelRequest(model=BM, version=9), timeout=WAIT),
        "Unload model": stub.UnloadModel(pb.LoadModelRequest(model="nope"), timeout=WAIT),
        "Unload version": stub.UnloadModel(pb.LoadModelRequest(model=BM, version=9), timeout=WAIT),
    }
    for name, call in cases.items():
        code, reason, _ = await refused(call)
        wanted = "unknown_model" if name.endswith("model") else "unknown_version"
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, wanted), name
    # In-band on a stream and in a batch.
    call = stub.Stream()
    await call.write(step_request("s", 0, xs[0][:1], start=True, model="nope"))
    await call.write(step_request("s", 0, xs[0][:1], start=True, version=9))
    await call.write(step_request("s", 0, xs[0][:1], start=True))
    await call.done_writing()
    answers = [a async for a in call]
    assert [a.error.reason for a in answers] == ["unknown_model", "unknown_version", ""]
    assert answers[2].model_version == 1
    from seqserve.proto.codec import to_matrix

    batch = await stub.StepBatch(
        pb.StepBatchRequest(
            session_ids=["b"], positions=[0], frames=to_matrix(xs[0][:1]), start=True, version=9
        ),
        timeout=WAIT,
    )
    assert [e.error.reason for e in batch.errors] == ["unknown_version"]
    code, reason, _ = await refused(
        stub.StepBatch(
            pb.StepBatchRequest(
                session_ids=["b"], positions=[0], frames=to_matrix(xs[0][:1]), model="nope"
            ),
            timeout=WAIT,
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "unknown_model")
    # Nothing of that disturbed serving.
    assert (await served.step("after", xs[1], 0, 3)).model_version == 1


async def test_predict_and_get_model_by_model_and_version(serve, repo, v2_dir, xs, jv_xs):
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(BM, 2, v2_dir)
    repo.add(JV, 1, JAPANESEVOWELS)
    served = await serve(version_policy="all")
    from seqserve.proto.codec import to_matrix

    sequences = [pb.Sequence(frames=to_matrix(xs[i][:30])) for i in range(3)]
    for version, directory, other in ((1, BASICMOTIONS, v2_dir), (2, v2_dir, BASICMOTIONS)):
        answer = await served.stub.Predict(
            pb.PredictRequest(sequences=sequences, per_step=True, version=version), timeout=WAIT
        )
        assert (answer.model, answer.model_version) == (BM, version)
        for i, prediction in enumerate(answer.predictions):
            on(probs_of(prediction.per_step), directory, xs[i][:30], other=other)
    latest = await served.stub.Predict(pb.PredictRequest(sequences=sequences), timeout=WAIT)
    assert latest.model_version == 2
    jx, lengths = jv_xs
    n = int(lengths[0])
    answer = await served.stub.Predict(
        pb.PredictRequest(
            model=JV, sequences=[pb.Sequence(frames=to_matrix(jx[0][:n]))], per_step=True
        ),
        timeout=WAIT,
    )
    assert (answer.model, answer.model_version) == (JV, 1)
    on(probs_of(answer.predictions[0].per_step), JAPANESEVOWELS, jx[0][:n])

    infos = {
        v: await served.stub.GetModel(pb.ModelRequest(model=BM, version=v), timeout=WAIT)
        for v in (1, 2)
    }
    assert [(i.version, i.state, i.latest) for i in infos.values()] == [
        ("1", "ready", False),
        ("2", "ready", True),
    ]
    assert infos[1].fingerprint != infos[2].fingerprint
    listed = {v.version: v.fingerprint for v in (await served.listing()).versions if v.model == BM}
    assert listed == {1: infos[1].fingerprint, 2: infos[2].fingerprint}
    jv = await served.stub.GetModel(pb.ModelRequest(model=JV), timeout=WAIT)
    assert (jv.name, jv.version, jv.features, len(jv.labels)) == (JV, "1", 12, 9)
    default = await served.stub.GetModel(pb.ModelRequest(), timeout=WAIT)
    assert (default.name, default.version) == (BM, "2")


def probs_of(matrix: pb.Matrix) -> np.ndarray:
    from seqserve.proto.codec import from_matrix

    return np.array(from_matrix(matrix))


async def test_two_models_side_by_side_on_one_stream(serve, repo, xs, jv_xs):
    """basicmotions (6 features) and japanesevowels (12) in one stream, interleaved, with the
    same session id in both (one namespace per model): each session's answers are its solo run
    on its own model; frames of the wrong width are refused for that request only."""
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(JV, 1, JAPANESEVOWELS)
    served = await serve()
    jx, lengths = jv_xs
    n = int(min(lengths[0], lengths[1]))
    call = served.stub.Stream()
    for t in range(n):
        await call.write(step_request("same", t, xs[0][t : t + 1], start=t == 0))
        await call.write(step_request("same", t, jx[0][t : t + 1], start=t == 0, model=JV))
        await call.write(step_request("jv-2", t, jx[1][t : t + 1], start=t == 0, model=JV))
    await call.write(step_request("same", n, jx[0][:1], model=BM))  # 12 features to a 6 model
    await call.done_writing()
    answers = [a async for a in call]
    assert len(answers) == 3 * n + 1
    bad = [a for a in answers if a.HasField("error")]
    assert [(a.error.reason, a.model) for a in bad] == [("feature_count", BM)]
    got: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for a in answers:
        if not a.HasField("error"):
            assert a.model_version == 1
            got.setdefault((a.model, a.session_id), {})[a.position] = probs(a)[0]
    assert sorted(got) == [(BM, "same"), (JV, "jv-2"), (JV, "same")]
    series = {k: np.stack([v[t] for t in range(n)]) for k, v in got.items()}
    on(series[(BM, "same")], BASICMOTIONS, xs[0][:n])
    on(series[(JV, "same")], JAPANESEVOWELS, jx[0][:n])
    on(series[(JV, "jv-2")], JAPANESEVOWELS, jx[1][:n])
    for model, labels in ((BM, {"model": BM}), (JV, {"model": JV})):
        steps = metric(served.registry, "seqserve_steps_total", {**labels, "version": "1"})
        assert steps == n * (1 if model == BM else 2), model


async def test_the_bundled_models_are_the_default_repository(start_server, xs, jv_xs):
    """No --model-dir and no --model-repository: both bundled models, each as version 1."""
    app, port = await start_server(model_dir="", snapshot_path="")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        listing = await stub.ListModels(pb.ListModelsRequest(), timeout=WAIT)
        assert {(v.model, v.version, v.state) for v in listing.versions} == {
            (BM, 1, "ready"),
            (JV, 1, "ready"),
        }
        assert listing.default_model == BM and not listing.problems
        jx, _ = jv_xs
        answer = await stub.Step(step_request("j", 0, jx[0][:5], start=True, model=JV))
        assert (answer.model, answer.model_version) == (JV, 1)
        on(probs(answer), JAPANESEVOWELS, jx[0])
    del app, xs


# -- snapshots -----------------------------------------------------------------------------------


async def test_a_restart_restores_every_session_into_its_exact_version(
    serve, repo, v2_dir, xs, tmp_path
):
    snapshot = str(tmp_path / "sessions.npz")
    repo.add(BM, 1, BASICMOTIONS)
    first = await serve(snapshot_path=snapshot)
    await first.step("old", xs[0], 0, 20)
    await first.step("old-2", xs[1], 0, 10)
    repo.add(BM, 2, v2_dir)
    await first.stub.LoadModel(pb.LoadModelRequest(model=BM), timeout=WAIT)
    await first.step("new", xs[2], 0, 20)
    await first.app.stop()

    # The repository still has both; latest:1 wants only version 2: version 1 is loaded for
    # the sessions pinned to it, and drains.
    second = await serve(snapshot_path=snapshot)
    status = await second.status(BM, 1)
    assert (status.state, status.sessions) == ("draining", 2)
    assert "pinned" in status.reason
    assert (await second.status(BM, 2)).latest
    old = await second.step("old", xs[0], 20, 40)
    assert old.model_version == 1
    on(probs(old), BASICMOTIONS, xs[0], 20, other=v2_dir)
    new = await second.step("new", xs[2], 20, 40)
    assert new.model_version == 2
    on(probs(new), v2_dir, xs[2], 20, other=BASICMOTIONS)
    await second.app.stop()

    # Version 1 gone from the repository: its sessions answer version_unavailable, naming it;
    # the others go on.
    repo.remove(BM, 1)
    third = await serve(snapshot_path=snapshot)
    assert await third.states() == {2: "ready"}
    for sid, x, position in (("old", xs[0], 40), ("old-2", xs[1], 10)):
        code, reason, message = await refused(third.step(sid, x, position))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "version_unavailable")
        assert "version 1" in message, message
    code, reason, message = await refused(third.stub.GetSession(pb.SessionRef(session_id="old")))
    assert reason == "version_unavailable" and "version 1" in message
    new = await third.step("new", xs[2], 40, 50)
    assert new.model_version == 2
    on(probs(new), v2_dir, xs[2], 40)
    await third.app.stop()

    # A same-numbered version with other graphs never takes them: version 1 is now v2's graphs.
    repo.add(BM, 1, v2_dir)
    fourth = await serve(snapshot_path=snapshot, version_policy="all")
    code, reason, message = await refused(fourth.step("old-2", xs[1], 10))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "version_unavailable")
    assert "version 1" in message
    assert (await fourth.status(BM, 1)).sessions == 0
    await fourth.app.stop()

    # The sessions were kept through both restarts without their version: once the genuine
    # version 1 is back, they go on where they were, on its graphs.
    repo.remove(BM, 1)
    repo.add(BM, 1, BASICMOTIONS)
    fifth = await serve(snapshot_path=snapshot)
    assert (await fifth.status(BM, 1)).sessions == 2
    for sid, x, position in (("old", xs[0], 40), ("old-2", xs[1], 10)):
        answer = await fifth.step(sid, x, position, position + 10)
        assert answer.model_version == 1
        on(probs(answer), BASICMOTIONS, x, position, other=v2_dir)
    assert (await fifth.step("new", xs[2], 50)).model_version == 2


# -- metrics ------------------------------------------------------------------------------------


async def test_sessions_waiting_for_a_missing_version_expire_like_any_other(
    serve, repo, v2_dir, xs, tmp_path
):
    """Sessions of a version this server lacks answer version_unavailable while they could
    still resume elsewhere; once idle past the timeout here they answer expired (with the
    position they were saved at), and the next snapshot no longer carries them."""
    from seqserve.server.snapshot import read_parts

    snapshot = str(tmp_path / "sessions.npz")
    repo.add(BM, 1, BASICMOTIONS)
    first = await serve(snapshot_path=snapshot)
    await first.step("old", xs[0], 0, 12)
    repo.add(BM, 2, v2_dir)
    await first.stub.LoadModel(pb.LoadModelRequest(model=BM), timeout=WAIT)
    await first.step("new", xs[2], 0, 5)
    await first.app.stop()

    repo.remove(BM, 1)
    timeout = 3.0
    second = await serve(snapshot_path=snapshot, session_idle_timeout=timeout)
    started = time.monotonic()
    code, reason, message = await refused(second.step("old", xs[0], 12))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "version_unavailable"), message
    position = 5
    while time.monotonic() - started < timeout + 0.2:  # past the deadline set at the restore
        await asyncio.sleep(0.4)
        await second.step("new", xs[2], position)  # a session in use on version 2 stays live
        position += 1
    code, reason, message = await refused(second.step("old", xs[0], 12))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "expired"), message
    assert "position 12" in message and "version 1" in message
    await second.app.stop()
    parts = read_parts(snapshot)
    assert [(p.version, list(p.arrays["ids"])) for p in parts] == [(2, ["new"])]


async def test_metrics_carry_the_model_and_version(serve, repo, v2_dir, xs, jv_xs):
    repo.add(BM, 1, BASICMOTIONS)
    repo.add(BM, 2, v2_dir)
    repo.add(JV, 1, JAPANESEVOWELS)
    served = await serve(version_policy="all")
    await served.step("a", xs[0], 0, 3, version=1)
    for t in range(4):
        await served.step("b", xs[1], t)
    jx, _ = jv_xs
    await served.step("j", jx[0], 0, 2, model=JV)
    await refused(served.step("a", xs[0], 3, version=2))
    registry = served.registry
    steps = {
        (m, v): metric(registry, "seqserve_steps_total", {"model": m, "version": v})
        for m, v in ((BM, "1"), (BM, "2"), (JV, "1"))
    }
    assert steps == {(BM, "1"): 3, (BM, "2"): 4, (JV, "1"): 2}
    ok = {"rpc": "Step", "code": "OK", "protocol": "native"}
    assert metric(registry, "seqserve_requests_total", {**ok, "model": BM, "version": "1"}) == 1
    assert metric(registry, "seqserve_requests_total", {**ok, "model": BM, "version": "2"}) == 4
    assert metric(registry, "seqserve_requests_total", {**ok, "model": JV, "version": "1"}) == 1
    refused_labels = {"rpc": "Step", "code": "FAILED_PRECONDITION", "model": BM}
    assert metric(registry, "seqserve_requests_total", refused_labels) == 1
    live = {
        v: metric(registry, "seqserve_live_sessions", {"model": BM, "version": v}) for v in "12"
    }
    assert live == {"1": 1, "2": 1}
    for version in ("1", "2"):
        labels = {"model": BM, "version": version}
        for state in ("loading", "ready", "draining", "unavailable"):
            value = metric(registry, "seqserve_model_version_state", {**labels, "state": state})
            assert value == (1 if state == "ready" else 0), (version, state)
        assert metric(registry, "seqserve_model_load_seconds", labels) > 0
        assert metric(registry, "seqserve_state_bytes", labels) > 0
    inference = metric(
        registry, "seqserve_inference_seconds_count", {"model": BM, "version": "2", "graph": "step"}
    )
    assert inference and inference >= 1
    # Exposed on /metrics with the labels as well.
    import urllib.request

    with urllib.request.urlopen(
        f"http://127.0.0.1:{served.app.metrics_port}/metrics", timeout=WAIT
    ) as reply:
        text = reply.read().decode()
    assert (
        'seqserve_model_version_state{model="basicmotions",state="ready",version="2"} 1.0' in (text)
        or 'seqserve_model_version_state{model="basicmotions",version="2",state="ready"} 1.0'
        in text
    )


# -- Redis: versions across replicas ------------------------------------------------------------

CROWD = 12


async def test_redis_a_replica_adopts_a_session_into_its_exact_version(
    serve, tmp_path, v2_dir, xs, redis_server
):
    """Replica a serves version 1; replica b serves 1 and 2 with 2 the latest (1 not even
    loaded). A session started on a moves to b on version 1 (loaded on demand, draining),
    and its answers are an uninterrupted version 1 run. Replicas without version 1 (none, or
    one whose "version 1" has other graphs) answer UNAVAILABLE version_unavailable naming it."""
    only_v1 = Repository(tmp_path / "a")
    only_v1.add(BM, 1, BASICMOTIONS)
    both = Repository(tmp_path / "b")
    both.add(BM, 1, BASICMOTIONS)
    both.add(BM, 2, v2_dir)
    only_v2 = Repository(tmp_path / "c")
    only_v2.add(BM, 2, v2_dir)
    impostor = Repository(tmp_path / "d")
    impostor.add(BM, 1, v2_dir)  # same name and number, other graphs
    common = {"store": redis_server.url}
    a = await serve(model_repository=str(only_v1.root), replica_id="a", **common)
    b = await serve(model_repository=str(both.root), replica_id="b", **common)
    c = await serve(model_repository=str(only_v2.root), replica_id="c", **common)
    d = await serve(model_repository=str(impostor.root), replica_id="d", **common)
    assert await b.states() == {2: "ready"}

    out = [probs(await a.step("hop", xs[0], t)) for t in range(10)]
    crowd = [f"crowd-{i}" for i in range(CROWD)]
    firsts = [probs(await a.step(sid, xs[1 + i], 0, 5)) for i, sid in enumerate(crowd)]
    for t in range(10, 20):
        answer = await b.step("hop", xs[0], t)  # names no version: b's latest is 2
        assert answer.model_version == 1
        out.append(probs(answer))
    bitwise(np.concatenate(out), BASICMOTIONS, xs[0])
    on(np.concatenate(out), BASICMOTIONS, xs[0], other=v2_dir)
    status = await b.status(BM, 1)
    assert (status.state, status.sessions) == ("draining", 1)

    # Many sessions of version 1 arriving at once at a replica that has to load it (c2 has it
    # in its repository, not loaded): one load, every session adopted into it.
    c2 = await serve(model_repository=str(both.root), replica_id="c2", **common)
    answers = await asyncio.gather(*(c2.step(sid, xs[1 + i], 5, 10) for i, sid in enumerate(crowd)))
    assert [a.model_version for a in answers] == [1] * CROWD
    for i, answer in enumerate(answers):
        on(np.concatenate([firsts[i], probs(answer)]), BASICMOTIONS, xs[1 + i], other=v2_dir)
    status = await c2.status(BM, 1)
    assert (status.state, status.sessions) == ("draining", CROWD)
    again = await asyncio.gather(*(c2.step(sid, xs[1 + i], 10) for i, sid in enumerate(crowd)))
    assert [a.model_version for a in again] == [1] * CROWD
    assert metric(c2.registry, "seqserve_session_events_total", {"event": "claimed"}) == CROWD
    info = await b.stub.GetSession(pb.SessionRef(session_id="hop"))
    assert (info.position, info.model_version) == (20, 1)
    # New sessions on b still start on version 2.
    assert (await b.step("fresh", xs[1], 0)).model_version == 2

    for replica in (c, d):
        code, reason, message = await refused(replica.step("hop", xs[0], 20))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "version_unavailable")
        assert "version 1" in message, message
        code, reason, message = await refused(
            replica.stub.GetSession(pb.SessionRef(session_id="hop"))
        )
        assert reason == "version_unavailable" and "version 1" in message
    # Nothing was taken from b: it goes on from 20, still version 1.
    answer = await b.step("hop", xs[0], 20, 25)
    assert answer.model_version == 1
    on(probs(answer), BASICMOTIONS, xs[0], 20)
    # And a, which only has version 1, takes a version 2 session no more than c took hop.
    code, reason, message = await refused(a.step("fresh", xs[1], 1))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "version_unavailable")
    assert "version 2" in message


async def test_redis_a_version_loaded_for_a_session_is_not_released_while_it_claims_it(
    serve, tmp_path, v2_dir, xs, redis_server
):
    """Replica b loads version 1 for a session that lives on it, and Redis stalls right then
    (DEBUG SLEEP, sent from b's own hook on the version turning draining, before b's claim):
    the version, with no session while the claim waits, is kept, and the session is adopted
    into it (not into a released engine, with version 1 loaded again)."""
    only_v1 = Repository(tmp_path / "a")
    only_v1.add(BM, 1, BASICMOTIONS)
    both = Repository(tmp_path / "b")
    both.add(BM, 1, BASICMOTIONS)
    both.add(BM, 2, v2_dir)
    common = {"store": redis_server.url, "store_timeout": 5.0}
    a = await serve(model_repository=str(only_v1.root), replica_id="a", **common)
    b = await serve(model_repository=str(both.root), replica_id="b", **common)
    out = [probs(await a.step("slow", xs[0], t)) for t in range(10)]
    sleepers: list[threading.Thread] = []

    def on_change(version: Any) -> None:
        if version.number == 1 and version.state == "draining" and not sleepers:
            sleeper = threading.Thread(target=redis_server.command, args=("DEBUG", "SLEEP", "1.0"))
            sleeper.start()
            sleepers.append(sleeper)
            time.sleep(0.1)  # (blocks b's loop) so the sleep reaches Redis before the claim

    b.app.models.on_change = on_change
    answer = await b.step("slow", xs[0], 10)
    await asyncio.to_thread(sleepers[0].join)
    assert answer.model_version == 1
    status = await b.status(BM, 1)
    assert (status.state, status.sessions) == ("draining", 1)
    out.append(probs(answer))
    out.append(probs(await b.step("slow", xs[0], 11, 15)))
    on(np.concatenate(out), BASICMOTIONS, xs[0], other=v2_dir)
    # Claimed once: not once into a released version 1 and again into a reloaded one.
    assert metric(b.registry, "seqserve_session_events_total", {"event": "claimed"}) == 1
