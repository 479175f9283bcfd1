"""Servers under test, each in its own process so that it never shares a GIL with the client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "BENCH",
    "ROOT",
    "Server",
    "cpu_seconds",
    "echo_server",
    "floor_server",
    "free_port",
    "repository_server",
    "seqserve_server",
]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _leaf(pid: int) -> int:
    """The process doing the work when ``pid`` only wraps it (a profiler starting the server)."""
    while True:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            return pid
        pid = int(children[0])


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    port: int
    pid: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def _serving(name: str, command: Sequence[str], port: int) -> AsyncIterator[Server]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            list(command),
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        leaf = proc.pid
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                ready = asyncio.ensure_future(channel.channel_ready())
                while not ready.done():
                    await asyncio.wait([ready], timeout=0.2)
                    if proc.poll() is not None:
                        ready.cancel()
                        log.seek(0)
                        tail = log.read().decode(errors="replace")[-2000:]
                        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            leaf = _leaf(proc.pid)
            yield Server(name, port, leaf)
        finally:
            # Stop the server itself: a profiler wrapping it writes its output once it exits.
            with contextlib.suppress(ProcessLookupError):
                os.kill(leaf, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def echo_server() -> AbstractAsyncContextManager[Server]:
    """The bare grpc.aio echo of bench/echo_server.py: the transport's ceiling."""
    port = free_port()
    command = [sys.executable, "-P", str(BENCH / "echo_server.py"), str(port)]
    return _serving("echo", command, port)


def floor_server(model_dir: Path) -> AbstractAsyncContextManager[Server]:
    """bench/floor_server.py: the transport plus one onnxruntime step per message, nothing else."""
    port = free_port()
    command = [sys.executable, "-P", str(BENCH / "floor_server.py"), str(port), str(model_dir)]
    return _serving("floor", command, port)


def seqserve_server(
    model_dir: Path, *extra: str, wrap: Sequence[str] = ()
) -> AbstractAsyncContextManager[Server]:
    """``seqserve-server`` with its defaults, minus metrics and snapshots. ``wrap`` prefixes
    the command (a profiler, e.g. ``py-spy record -o out.svg --``)."""
    return _seqserve(("--model-dir", str(model_dir)), extra, wrap)


def repository_server(root: Path, *extra: str) -> AbstractAsyncContextManager[Server]:
    """``seqserve-server --model-repository root``, otherwise as ``seqserve_server``."""
    return _seqserve(("--model-repository", str(root)), extra, ())


def _seqserve(
    models: Sequence[str], extra: Sequence[str], wrap: Sequence[str]
) -> AbstractAsyncContextManager[Server]:
    port = free_port()
    command = [
        *wrap,
        sys.executable,
        "-P",
        "-m",
        "seqserve.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *models,
        "--metrics-port",
        "-1",
        "--http-port",
        "-1",
        "--snapshot-path",
        "",
        "--log-level",
        "warning",
        *extra,
    ]
    return _serving("seqserve", command, port)
