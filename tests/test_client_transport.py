"""Transport details against a small fake server: the bearer token goes with every call (unary
and stream), and TLS works with a root certificate given as bytes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from seqserve.client import AsyncClient
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix


class _Recorder(pb_grpc.SeqServeServicer):
    """Answers GetModel, OpenSession, CloseSession and Stream with fixed values; records the
    metadata of each call."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[str, str]]] = {}

    def _record(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.seen[name] = [(m.key, m.value) for m in context.invocation_metadata() or ()]

    async def GetModel(self, request, context):
        self._record("GetModel", context)
        return pb.ModelInfo(name="fake", version="0", features=2, labels=["a", "b"])

    async def OpenSession(self, request, context):
        self._record("OpenSession", context)
        return pb.SessionInfo(session_id=request.session_id or "s1")

    async def CloseSession(self, request, context):
        self._record("CloseSession", context)
        return pb.SessionInfo(session_id=request.session_id, closed=True)

    async def Stream(self, request_iterator, context):
        self._record("Stream", context)
        async for r in request_iterator:
            rows = r.frames.rows
            probs = np.tile(np.array([0.25, 0.75], np.float32), (rows, 1))
            yield pb.StepResponse(
                session_id=r.session_id,
                position=r.position,
                frames=rows,
                probabilities=to_matrix(probs),
                top_class=[1] * rows,
                next_position=r.position + rows,
                tag=r.tag,
            )


async def _serve(credentials: grpc.ServerCredentials | None = None):
    recorder = _Recorder()
    server = grpc.aio.server()
    pb_grpc.add_SeqServeServicer_to_server(recorder, server)
    address = "127.0.0.1:0" if credentials is None else "localhost:0"
    port = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    await server.start()
    return server, port, recorder


async def _exercise(client: AsyncClient) -> None:
    assert (await client.model()).labels == ("a", "b")
    async with client.session() as s:
        prediction = await asyncio.wait_for(s.send(np.zeros((3, 2))), 10)
    assert (prediction.label, prediction.frames) == ("b", 3)
    assert prediction.confidence == pytest.approx(0.75)


async def test_token_is_sent_with_every_call():
    server, port, recorder = await _serve()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", token="s3cret", timeout=10) as client:
            await _exercise(client)
    finally:
        await server.stop(None)
    for call in ("GetModel", "OpenSession", "Stream", "CloseSession"):
        assert ("authorization", "Bearer s3cret") in recorder.seen[call], call


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_tls_with_a_root_certificate(tmp_path: Path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, port, recorder = await _serve(credentials)
    try:
        async with AsyncClient(
            f"localhost:{port}", tls=cert.read_bytes(), token="t", timeout=10
        ) as client:
            await _exercise(client)
    finally:
        await server.stop(None)
    assert ("authorization", "Bearer t") in recorder.seen["Stream"]
