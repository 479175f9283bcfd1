"""TLS and mutual TLS against the real in-process server: certificates made here with openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca: the trusted CA; server (127.0.0.1 / localhost) and alice signed by it; other-ca and
    mallory signed by another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(
        d,
        "server",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _leaf(d, "alice", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "mallory", "other-ca", "extendedKeyUsage=clientAuth\n")
    return d


def read(pki: Path, name: str) -> bytes:
    return (pki / name).read_bytes()


def tls_settings(pki: Path, mutual: bool = False) -> dict[str, str]:
    extra = {"tls_client_ca": str(pki / "ca.pem")} if mutual else {}
    return {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"), **extra}


async def _get_model(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> pb.ModelInfo:
    return await pb_grpc.SeqServeStub(channel).GetModel(
        pb.ModelRequest(), timeout=WAIT, metadata=metadata
    )


def _secure(
    port: int, pki: Path, client: str | None = None, roots: str = "ca.pem"
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(pki, roots),
        private_key=read(pki, f"{client}.key") if client else None,
        certificate_chain=read(pki, f"{client}.pem") if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def _refused(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code()


async def test_tls_serves_and_refuses_plaintext(start_server, pki):
    _, port = await start_server(**tls_settings(pki))
    async with _secure(port, pki) as channel:
        assert (await _get_model(channel)).features > 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert await _refused(_get_model(channel)) is grpc.StatusCode.UNAVAILABLE
    async with _secure(port, pki, roots="other-ca.pem") as channel:  # server not trusted
        assert await _refused(_get_model(channel)) is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_certificate_from_the_client_ca(start_server, pki):
    _, port = await start_server(**tls_settings(pki, mutual=True))
    async with _secure(port, pki, client="alice") as channel:
        assert (await _get_model(channel)).features > 0
        # The certificate's CN is the principal: alice's session is hers.
        stub = pb_grpc.SeqServeStub(channel)
        await stub.OpenSession(pb.OpenSessionRequest(session_id="alice-1"), timeout=WAIT)
    async with _secure(port, pki) as channel:  # no client certificate
        assert await _refused(_get_model(channel)) is grpc.StatusCode.UNAVAILABLE
    async with _secure(port, pki, client="mallory") as channel:  # signed by another CA
        assert await _refused(_get_model(channel)) is grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert await _refused(_get_model(channel)) is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_with_tokens_token_names_the_principal(start_server, pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("bob:bob-token-0123456789\n")
    _, port = await start_server(**tls_settings(pki, mutual=True), tokens_file=str(tokens))
    async with _secure(port, pki, client="alice") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        await stub.OpenSession(pb.OpenSessionRequest(session_id="by-alice"), timeout=WAIT)
        await stub.GetSession(pb.SessionRef(session_id="by-alice"), timeout=WAIT)
        bob = (("authorization", "Bearer bob-token-0123456789"),)
        await stub.OpenSession(
            pb.OpenSessionRequest(session_id="by-bob"), timeout=WAIT, metadata=bob
        )
        await stub.GetSession(pb.SessionRef(session_id="by-bob"), timeout=WAIT, metadata=bob)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # as alice (certificate)
            await stub.GetSession(pb.SessionRef(session_id="by-bob"), timeout=WAIT)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        bad = (("authorization", "Bearer not-a-token-at-all"),)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # a wrong token is not ignored
            await stub.GetSession(pb.SessionRef(session_id="by-alice"), timeout=WAIT, metadata=bad)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:  # bob cannot reach alice's either
            await stub.GetSession(pb.SessionRef(session_id="by-alice"), timeout=WAIT, metadata=bob)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_client_library_end_to_end_with_token_and_mutual_tls(
    start_server, pki, tmp_path, samples
):
    import asyncio

    from seqserve.client import AsyncClient, Client, SessionNotFound, Unauthenticated

    tokens = tmp_path / "tokens"
    tokens.write_text("# team: token\nann:ann-token-0123456789\nben:ben-token-0123456789\n")
    _, port = await start_server(**tls_settings(pki, mutual=True), tokens_file=str(tokens))
    target = f"127.0.0.1:{port}"
    mtls = {
        "tls": read(pki, "ca.pem"),
        "cert": read(pki, "alice.pem"),
        "key": read(pki, "alice.key"),
    }
    x = samples["x"][0][:20]
    async with AsyncClient(target, token="ann-token-0123456789", timeout=WAIT, **mtls) as ann:
        assert await ann.health() == "SERVING"
        async with ann.session("ann-s") as s:
            first = await s.send(x[:10])
            rest = await s.send(x[10:])
            assert rest.next_position == 20 and first.position == 0
            assert (await ann.get_session("ann-s")).position == 20
            assert len(await ann.predict([x])) == 1
            async with AsyncClient(
                target, token="ben-token-0123456789", timeout=WAIT, **mtls
            ) as ben:
                with pytest.raises(SessionNotFound) as info:
                    await ben.get_session("ann-s")
                assert info.value.reason == "unknown"
                with pytest.raises(SessionNotFound):
                    await ben.open_session("ann-s", resume=True)
    async with AsyncClient(target, token="wrong-token-0123456789", timeout=WAIT, **mtls) as bad:
        with pytest.raises(Unauthenticated) as err:
            await bad.model()
        assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert err.value.reason == "unauthenticated"

    def sync() -> int:
        with (
            Client(target, token="ann-token-0123456789", timeout=WAIT, **mtls) as c,
            c.session() as s,
        ):
            return s.send(x).next_position

    assert await asyncio.wait_for(asyncio.to_thread(sync), 30) == 20


async def test_cli_takes_client_certificate_options(start_server, pki, capsys):
    import asyncio

    from seqserve.client.cli import main

    _, port = await start_server(**tls_settings(pki, mutual=True))
    argv = [
        "--target",
        f"127.0.0.1:{port}",
        "--ca",
        str(pki / "ca.pem"),
        "--cert",
        str(pki / "alice.pem"),
        "--key",
        str(pki / "alice.key"),
        "model",
        "--json",
    ]
    assert await asyncio.to_thread(main, argv) == 0
    assert '"features"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--cert", str(pki / "alice.pem"), "model"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tls_cert": "missing.pem"}, "--tls-cert"),
        ({"tls_key": ""}, "go together"),
        ({"tls_key": "server.pem"}, "private key"),
        ({"tls_client_ca": "nowhere.pem"}, "--tls-client-ca"),
        ({"tls_client_ca": "server.key"}, "--tls-client-ca"),
    ],
)
def test_bad_tls_settings_refuse_to_start(settings, pki, change, message):
    from seqserve.server import create_server
    from seqserve.server.auth import ConfigError

    values = tls_settings(pki)
    values.update({k: str(pki / v) if v else "" for k, v in change.items()})
    with pytest.raises(ConfigError, match=message):
        create_server(settings.replace(**values))
