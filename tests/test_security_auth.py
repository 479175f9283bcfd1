"""Token authentication, session ownership and per-principal limits, against the real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import step_request

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0
A = (("authorization", "Bearer alice-token-0123456789"),)
B = (("authorization", "Bearer bob-token-0123456789ab"),)


@pytest.fixture
def tokens_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text(
        "# principal:token\nalice:alice-token-0123456789\n\nbob: bob-token-0123456789ab\n"
    )
    return str(path)


@pytest.fixture
async def port(start_server, tokens_file) -> int:
    return (await start_server(tokens_file=tokens_file))[1]


@pytest.fixture
async def channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.SeqServeStub:
    return pb_grpc.SeqServeStub(channel)


_FEATURES: list[int] = []


@pytest.fixture(autouse=True)
def _features(model_dir: Path) -> None:
    import json

    _FEATURES[:] = [json.loads((model_dir / "model.json").read_text())["features"]]


def frames(n: int = 3) -> np.ndarray:
    return np.ones((n, _FEATURES[0]), np.float32)


async def _status(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    meta = dict(info.value.trailing_metadata() or ())
    return info.value.code(), meta.get("seqserve-reason", "")


def _unary_calls(stub: pb_grpc.SeqServeStub) -> dict[str, Any]:
    ref = pb.SessionRef(session_id="s")
    return {
        "Step": lambda md: stub.Step(
            step_request("s", 0, frames(), start=True), metadata=md, timeout=WAIT
        ),
        "Predict": lambda md: stub.Predict(
            pb.PredictRequest(
                sequences=[pb.Sequence(frames=step_request("s", 0, frames()).frames)]
            ),
            metadata=md,
            timeout=WAIT,
        ),
        "OpenSession": lambda md: stub.OpenSession(
            pb.OpenSessionRequest(session_id="o"), metadata=md, timeout=WAIT
        ),
        "GetSession": lambda md: stub.GetSession(ref, metadata=md, timeout=WAIT),
        "ResetSession": lambda md: stub.ResetSession(ref, metadata=md, timeout=WAIT),
        "CloseSession": lambda md: stub.CloseSession(ref, metadata=md, timeout=WAIT),
        "GetModel": lambda md: stub.GetModel(pb.ModelRequest(), metadata=md, timeout=WAIT),
    }


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token-0123456789"),),
        (("authorization", "alice-token-0123456789"),),  # no scheme
        (("authorization", "Basic alice-token-0123456789"),),
        (("authorization", "Bearer alice-token-012345678"),),  # a prefix of a real token
    ],
    ids=["none", "wrong", "no-scheme", "basic", "prefix"],
)
async def test_every_rpc_needs_a_valid_token(stub, metadata):
    for name, call in _unary_calls(stub).items():
        code, reason = await _status(call(metadata))
        assert (name, code, reason) == (name, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
    stream = stub.Stream(metadata=metadata, timeout=WAIT)
    await stream.write(step_request("s", 0, frames(), start=True))
    assert await stream.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in await stream.details()


async def test_valid_token_reaches_every_rpc(stub):
    calls = _unary_calls(stub)
    for name in (
        "Step",
        "Predict",
        "GetSession",
        "ResetSession",
        "CloseSession",
        "GetModel",
        "OpenSession",
    ):
        await calls[name](A)
    stream = stub.Stream(metadata=B, timeout=WAIT)
    await stream.write(step_request("b", 0, frames(), start=True))
    response = await stream.read()
    assert not response.HasField("error") and response.next_position == 3
    await stream.done_writing()
    assert await stream.code() is grpc.StatusCode.OK


async def test_health_is_exempt_and_reflection_is_not(channel):
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def list_services(metadata: Any) -> list[str]:
        call = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=metadata,
            timeout=WAIT,
        )
        return [s.name async for r in call for s in r.list_services_response.service]

    code, _ = await _status(list_services(()))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "seqserve.v1.SeqServe" in " ".join(await list_services(A))


async def test_another_principals_session_is_unknown(stub):
    await stub.Step(step_request("mine", 0, frames(), start=True), metadata=A, timeout=WAIT)
    ref = pb.SessionRef(session_id="mine")
    for call in (stub.GetSession, stub.ResetSession, stub.CloseSession):
        assert await _status(call(ref, metadata=B, timeout=WAIT)) == (
            grpc.StatusCode.NOT_FOUND,
            "unknown",
        )
    assert await _status(
        stub.Step(step_request("mine", 3, frames()), metadata=B, timeout=WAIT)
    ) == (grpc.StatusCode.NOT_FOUND, "unknown")
    # Ids are one namespace: opening a taken id says only that it is taken.
    assert await _status(
        stub.Step(step_request("mine", 0, frames(), start=True), metadata=B, timeout=WAIT)
    ) == (grpc.StatusCode.ALREADY_EXISTS, "session_exists")
    # In a stream, too: the error comes in the stream and the stream goes on.
    stream = stub.Stream(metadata=B, timeout=WAIT)
    await stream.write(step_request("mine", 3, frames(), tag=1))
    await stream.write(step_request("bobs", 0, frames(), start=True, tag=2))
    first, second = await stream.read(), await stream.read()
    assert first.error.reason == "unknown"
    assert first.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert not second.HasField("error") and second.tag == 2
    await stream.done_writing()
    assert await stream.code() is grpc.StatusCode.OK
    bobs = pb.SessionRef(session_id="bobs")  # opened in B's stream: B's, not A's
    assert (await stub.GetSession(bobs, metadata=B, timeout=WAIT)).position == 3
    assert await _status(stub.GetSession(bobs, metadata=A, timeout=WAIT)) == (
        grpc.StatusCode.NOT_FOUND,
        "unknown",
    )
    # Nothing B did touched A's session; after A closes it, B still learns nothing.
    assert (await stub.GetSession(ref, metadata=A, timeout=WAIT)).position == 3
    await stub.CloseSession(ref, metadata=A, timeout=WAIT)
    assert await _status(stub.GetSession(ref, metadata=B, timeout=WAIT)) == (
        grpc.StatusCode.NOT_FOUND,
        "unknown",
    )
    assert await _status(stub.GetSession(ref, metadata=A, timeout=WAIT)) == (
        grpc.StatusCode.NOT_FOUND,
        "closed",
    )


async def test_ownership_survives_drain_and_restart(start_server, tokens_file):
    app, port = await start_server(tokens_file=tokens_file, drain_grace=1.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.SeqServeStub(ch)
        await stub.Step(step_request("kept", 0, frames(5), start=True), metadata=A, timeout=WAIT)
    await app.stop()
    _, port = await start_server(tokens_file=tokens_file)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.SeqServeStub(ch)
        ref = pb.SessionRef(session_id="kept")
        assert await _status(stub.GetSession(ref, metadata=B, timeout=WAIT)) == (
            grpc.StatusCode.NOT_FOUND,
            "unknown",
        )
        assert (await stub.GetSession(ref, metadata=A, timeout=WAIT)).position == 5
        r = await stub.Step(step_request("kept", 5, frames(2)), metadata=A, timeout=WAIT)
        assert r.next_position == 7


async def test_per_principal_session_limit(start_server, tokens_file):
    _, port = await start_server(tokens_file=tokens_file, max_sessions_per_principal=2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.SeqServeStub(ch)

        def open_(sid: str, md: Any) -> Any:
            return stub.OpenSession(
                pb.OpenSessionRequest(session_id=sid), metadata=md, timeout=WAIT
            )

        await open_("a1", A)
        await stub.Step(step_request("a2", 0, frames(), start=True), metadata=A, timeout=WAIT)
        assert await _status(open_("a3", A)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "principal_session_limit",
        )
        assert await _status(
            stub.Step(step_request("a3", 0, frames(), start=True), metadata=A, timeout=WAIT)
        ) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "principal_session_limit")
        await open_("b1", B)  # bob has his own allowance
        await stub.CloseSession(pb.SessionRef(session_id="a1"), metadata=A, timeout=WAIT)
        await open_("a3", A)


@pytest.mark.parametrize(
    "content, message",
    [
        ("alice\n", "line 1: expected 'principal:token'"),
        ("alice:short\n", "16 or more"),
        ("al ice:alice-token-0123456789\n", "principal"),
        ("a:same-token-0123456789\nb:same-token-0123456789\n", "line 2: token already given"),
        ("# only a comment\n", "no tokens"),
    ],
)
def test_malformed_tokens_file_refuses_to_start(settings, tmp_path, content, message):
    from seqserve.server import create_server
    from seqserve.server.auth import ConfigError

    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        create_server(settings.replace(tokens_file=str(path)))
    assert "0123456789" not in str(info.value)  # never echo a token
    with pytest.raises(ConfigError, match="cannot read"):
        create_server(settings.replace(tokens_file=str(tmp_path / "absent")))


async def test_single_token_from_the_environment(start_server, settings):
    from seqserve.server.settings import parse_settings

    env = {
        "SEQSERVE_AUTH_TOKEN": "env-token-0123456789",
        "SEQSERVE_MAX_SESSIONS_PER_PRINCIPAL": "3",
    }
    parsed = parse_settings([], env)
    assert parsed.auth_token == "env-token-0123456789" and parsed.max_sessions_per_principal == 3
    _, port = await start_server(auth_token=parsed.auth_token)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.SeqServeStub(ch)
        md = (("authorization", "Bearer env-token-0123456789"),)
        assert (await stub.GetModel(pb.ModelRequest(), metadata=md, timeout=WAIT)).features
        code, _ = await _status(stub.GetModel(pb.ModelRequest(), timeout=WAIT))
        assert code is grpc.StatusCode.UNAUTHENTICATED


def test_old_snapshot_format_loads_with_sessions_owned_by_nobody(settings, tmp_path):
    import json

    from seqserve.server.model import load_model_spec
    from seqserve.server.sessions import SessionTable
    from seqserve.server.snapshot import capture, load_snapshot, write_snapshot
    from seqserve.server.states import StateBank

    spec = load_model_spec(settings.model_dir)
    table = SessionTable(StateBank(spec, 8, 4), max_sessions=8, idle_timeout=60)
    table.create("x", owner="alice")
    arrays = capture(spec, table)
    assert str(arrays["owners"][0]) == "alice"
    header = json.loads(arrays["header"].tobytes())
    header["format"] = "seqserve-snapshot/1"
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    del arrays["owners"]
    write_snapshot(tmp_path / "old.npz", arrays)
    restored = SessionTable(StateBank(spec, 8, 4), max_sessions=8, idle_timeout=60)
    assert load_snapshot(tmp_path / "old.npz", spec, restored) == 1
    assert restored.get("x").owner == ""
    assert restored.get("x", "") is not None
    with pytest.raises(Exception, match="unknown"):
        restored.get("x", "alice")
