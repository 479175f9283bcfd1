"""Real engines on loopback for scale-out tests: redis-server, seqserve replicas as subprocesses,
and nginx running deploy/nginx/seqserve.conf in front of them.

Use it through the ``cluster`` fixture (tests/conftest.py)::

    def test_x(cluster):
        c = cluster(replicas=2, redis=True, args=("--store", "{redis}", "--replica-id", "{name}"))
        with Client(c.nginx.target) as client: ...
        c.replica("replica-1").kill()          # SIGKILL
        c.replica("replica-1").restart()       # same ports, same arguments

Every process is started in its own session, logs to a file under the test's tmp_path and is
killed when the test ends, failed or not. Missing redis-server or nginx skip the test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
NGINX_SITE = ROOT / "deploy" / "nginx" / "seqserve.conf"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "seqserve.cfg"
START_TIMEOUT = 60.0
# Debian puts nginx in /usr/sbin, which a non-root PATH often lacks.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def need(binary: str, package: str) -> str:
    """The path of ``binary``, or skip the test saying which Debian package brings it."""
    path = shutil.which(binary) or shutil.which(binary, path=os.pathsep.join(_SBIN))
    if path is None:
        pytest.skip(
            f"{binary} not installed (Debian package {package}; scripts/system-deps.sh "
            "installs it when run as root)"
        )
    return path


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class _Process:
    """A child process in a session of its own, logging to ``log``."""

    name: str
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def _spawn(self, command: Sequence[str], env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                list(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process and everything it started (nginx's workers: a SIGKILLed
        nginx master leaves them serving otherwise)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)  # its own session, so its own process group

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is drained or saved."""
        if self.process is None:
            return
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process hangs (its sockets still accept connections)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self.signal(signal.SIGCONT)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit status."""
        if self.process is None:
            return 0
        if self.alive:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not stop within {timeout}s after SIGTERM:\n{_tail(self.log)}"
            ) from None

    def _check_running(self, what: str) -> None:
        if not self.alive:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"{self.name} exited ({code}) while {what}:\n{_tail(self.log)}")


# -- Redis -------------------------------------------------------------------------------------


@dataclass
class Redis(_Process):
    port: int = 0

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, what ``--store`` takes."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes | int | list[object] | None:
        """One Redis command over a fresh connection (RESP2, enough for tests: PING, DBSIZE,
        KEYS, GET, FLUSHALL ...)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            sock.sendall(payload.encode())
            return _read_reply(sock.makefile("rb"))

    def start(self, workdir: Path, port: int = 0) -> None:
        """Start on a free port, or on ``port`` (a restart where clients expect it)."""
        binary = need("redis-server", "redis-server")
        workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = port or free_port()
            self._spawn(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                    "--logfile",
                    "",
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                    "--enable-debug-command",
                    "local",
                ]
            )  # DEBUG SLEEP: a slow Redis
            if _wait(lambda: self._ping(), self, "starting", attempt < 2 and not port):
                return

    def _ping(self) -> bool:
        try:
            return self.command("PING") == b"PONG"
        except OSError:
            return False


def _read_reply(stream: BinaryIO) -> bytes | int | list[object] | None:
    line = stream.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        return stream.read(size + 2)[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise RuntimeError(f"unexpected Redis reply {line!r}")


# -- seqserve replicas --------------------------------------------------------------------------


@dataclass
class Replica(_Process):
    """One ``seqserve-server`` process: ``target`` for gRPC, ``metrics()`` for /metrics."""

    args: tuple[str, ...] = ()
    port: int = 0
    metrics_port: int = 0
    http_port: int = 0  # the Open Inference Protocol's REST API

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Start (ports chosen once, kept by ``restart``); ``wait_ready`` waits."""
        if not self.port:
            self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
        env["PYTHONWARNINGS"] = "ignore"
        self._spawn(
            [
                sys.executable,
                "-P",
                "-m",
                "seqserve.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--http-port",
                str(self.http_port),
                *self.args,
            ],
            env=env,
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until grpc.health.v1 says SERVING (RuntimeError with the log if it exits)."""
        _wait(lambda: _serving(self.target), self, "starting", False, timeout)

    def restart(self, timeout: float = START_TIMEOUT, **flags: str) -> None:
        """Start again on the same ports (stop or kill it first), with the same arguments but
        for ``flags`` (``model_repository="/new/repo"`` sets ``--model-repository``, replacing
        its value if it was given), which it keeps for later restarts."""
        if self.alive:
            raise RuntimeError(f"{self.name} is still running")
        for name, value in flags.items():
            self.args = _with_flag(self.args, "--" + name.replace("_", "-"), value)
        self.launch()
        self.wait_ready(timeout)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: ``(name, sorted labels) -> value``."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            v
            for (n, ls), v in self.metrics().items()
            if n == name and set(labels.items()) <= set(ls)
        )


def _with_flag(args: tuple[str, ...], flag: str, value: str) -> tuple[str, ...]:
    """``args`` with every ``flag``'s value set to ``value`` (the flag added if absent)."""
    out, found = list(args), False
    for i, arg in enumerate(out[:-1]):
        if arg == flag:
            out[i + 1], found = value, True
    return tuple(out) if found else (*out, flag, value)


def _serving(target: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# -- nginx --------------------------------------------------------------------------------------


def nginx_site(listen: str, servers: Sequence[str], site: Path = NGINX_SITE) -> str:
    """deploy/nginx/seqserve.conf with its ``listen`` address and its upstream's ``server``
    lines replaced (each new server keeps the first line's parameters). Anything else in the
    file is used as it is; a file that no longer has one listen and one upstream fails here."""
    text = site.read_text()
    listens = re.findall(r"^\s*listen\s+\S+", text, flags=re.M)
    upstreams = re.findall(r"^\s*upstream\s+\S+\s*\{", text, flags=re.M)
    if len(listens) != 1 or len(upstreams) != 1:
        raise ValueError(
            f"{site}: expected one listen and one upstream, found {listens} and {upstreams}"
        )
    text = re.sub(r"^(\s*listen\s+)\S+", rf"\g<1>{listen}", text, flags=re.M)
    lines = list(re.finditer(r"^(\s*)server\s+([^\s{;]+)([^;{]*);\n", text, flags=re.M))
    if not lines:
        raise ValueError(f"{site}: no server lines in the upstream")
    start, end = lines[0].start(), lines[-1].end()
    rest = re.sub(r"^(\s*)server\s+([^\s{;]+)([^;{]*);\n", "", text[start:end], flags=re.M)
    if re.sub(r"^\s*(#.*)?$", "", rest, flags=re.M).strip():
        raise ValueError(
            f"{site}: the upstream's server lines must be together, found "
            f"{rest.strip()!r} between them"
        )
    indent, _, params = lines[0].groups()
    new = "".join(f"{indent}server {s}{params};\n" for s in servers)
    return text[:start] + new + text[end:]


@dataclass
class Nginx(_Process):
    port: int = 0
    config: Path = field(default_factory=Path)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.log.parent / "access.log"

    def start(self, workdir: Path, servers: Sequence[str]) -> None:
        """nginx on a free loopback port in front of ``servers`` (``host:port``)."""
        binary = need("nginx", "nginx")
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            self.config = workdir / "nginx.conf"
            self.config.write_text(
                _nginx_conf(workdir, nginx_site(f"127.0.0.1:{self.port}", servers))
            )
            self._spawn(
                [
                    binary,
                    "-p",
                    str(workdir),
                    "-c",
                    str(self.config),
                    "-e",
                    str(self.log),
                    "-g",
                    f"daemon off; pid {workdir / 'nginx.pid'}; error_log {self.log} info;",
                ]
            )
            if _wait(lambda: _listening(self.port), self, "starting", attempt < 2):
                return


def _nginx_conf(workdir: Path, site: str) -> str:
    # As root the workers would switch to `nobody`, who cannot enter pytest's tmp_path.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {kind}_temp_path {workdir / sub};\n"
        for kind, sub in (
            ("client_body", "client_body"),
            ("proxy", "proxy"),
            ("fastcgi", "fastcgi"),
            ("uwsgi", "uwsgi"),
            ("scgi", "scgi"),
        )
    )
    site = "\n".join("    " + line if line else line for line in site.splitlines())
    return (
        f"{user}worker_processes 1;\nevents {{ worker_connections 4096; }}\nhttp {{\n"
        "    log_format routed '$request_uri route=$http_seqserve_route "
        "upstream=$upstream_addr status=$status grpc=$upstream_trailer_grpc_status';\n"
        f"    access_log {workdir / 'access.log'} routed;\n{temp}{site}\n}}\n"
    )


# -- HAProxy ------------------------------------------------------------------------------------


def haproxy_config(bind: str, servers: Sequence[str], cfg: Path = HAPROXY_CFG) -> str:
    """deploy/haproxy/seqserve.cfg with its ``bind`` address and its backend's ``server`` lines
    replaced (named replica-1 ...; each keeps the first line's parameters)."""
    text = cfg.read_text()
    binds = re.findall(r"^\s*bind\s+\S+", text, flags=re.M)
    lines = list(re.finditer(r"^(\s*)server\s+\S+\s+\S+(.*)\n", text, flags=re.M))
    if len(binds) != 1 or not lines:
        raise ValueError(f"{cfg}: expected one bind and server lines, found {binds}")
    text = re.sub(r"^(\s*bind\s+)\S+", rf"\g<1>{bind}", text, flags=re.M)
    lines = list(re.finditer(r"^(\s*)server\s+\S+\s+\S+(.*)\n", text, flags=re.M))
    start, end = lines[0].start(), lines[-1].end()
    if len(text[start:end].splitlines()) != len(lines):
        raise ValueError(f"{cfg}: the backend's server lines must be together")
    indent, params = lines[0].groups()
    new = "".join(f"{indent}server replica-{i} {s}{params}\n" for i, s in enumerate(servers, 1))
    return text[:start] + new + text[end:]


@dataclass
class HAProxy(_Process):
    port: int = 0
    config: Path = field(default_factory=Path)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, workdir: Path, servers: Sequence[str]) -> None:
        """HAProxy on a free loopback port in front of ``servers`` (``host:port``); its log
        (one line per call, naming the server) goes to ``log``."""
        binary = need("haproxy", "haproxy")
        workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            self.config = workdir / "haproxy.cfg"
            self.config.write_text(haproxy_config(f"127.0.0.1:{self.port}", servers))
            self._spawn([binary, "-db", "-f", str(self.config)])
            if _wait(lambda: _listening(self.port), self, "starting", attempt < 2):
                return


# -- helpers ------------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _wait(
    ready: Callable[[], bool],
    proc: _Process,
    what: str,
    retry: bool,
    timeout: float = START_TIMEOUT,
) -> bool:
    """Poll ``ready()`` until true. If the process exits first: False when ``retry`` (the
    caller tries again, e.g. on another port), else RuntimeError with its log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not proc.alive:
            if retry:
                return False
            proc._check_running(what)
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{proc.name} not ready within {timeout}s:\n{_tail(proc.log)}")
        time.sleep(0.05)
    return True


# -- the whole thing ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """What ``start_cluster`` started: ``replicas`` (``replica-1`` ...), and ``redis``,
    ``nginx``, ``haproxy`` when asked for."""

    workdir: Path
    replicas: list[Replica] = field(default_factory=list)
    redis: Redis | None = None
    nginx: Nginx | None = None
    haproxy: HAProxy | None = None

    @property
    def front(self) -> Nginx | HAProxy:
        """The proxy in front (nginx, else HAProxy); ``front.target`` is where clients go."""
        front = self.nginx or self.haproxy
        if front is None:
            raise RuntimeError("this cluster was started without a proxy in front")
        return front

    def replica(self, name: str) -> Replica:
        (found,) = [r for r in self.replicas if r.name == name]
        return found

    def processes(self) -> list[_Process]:
        return [p for p in (self.nginx, self.haproxy, *self.replicas, self.redis) if p is not None]

    def stop(self) -> None:
        """SIGKILL everything still running (proxies first, then replicas, Redis last)."""
        for proc in self.processes():
            with contextlib.suppress(Exception):
                proc.kill()


def start_cluster(
    workdir: Path,
    model_dir: Path,
    *,
    replicas: int = 2,
    redis: bool = False,
    nginx: bool = True,
    haproxy: bool = False,
    args: Sequence[str] = (),
    repository: Path | None = None,
    cluster: Cluster | None = None,
) -> Cluster:
    """Start Redis (if ``redis``), ``replicas`` seqserve replicas, then nginx and HAProxy in
    front of them (if ``nginx``, ``haproxy``), each running the deployed config (deploy/) with
    only its addresses changed.

    Each replica runs ``--model-dir model_dir`` (or ``--model-repository repository`` when
    given) ``--snapshot-path <its dir>/sessions.npz --snapshot-interval 0 --log-level info``
    then ``args``, in which ``{name}`` becomes the replica's name and ``{redis}`` the Redis
    URL. Replicas start in parallel. Pass ``cluster``
    to have what starts recorded in it as it starts (so a failure half-way still gets cleaned).
    """
    c = cluster or Cluster(workdir)
    for wanted, binary in ((redis, "redis-server"), (nginx, "nginx"), (haproxy, "haproxy")):
        if wanted:
            need(binary, binary)  # skip before starting anything
    if redis:
        c.redis = Redis("redis", workdir / "redis.log")
        c.redis.start(workdir / "redis")
    redis_url = c.redis.url if c.redis is not None else ""
    started = []
    for i in range(1, replicas + 1):
        name = f"replica-{i}"
        home = workdir / name
        home.mkdir(parents=True, exist_ok=True)
        argv = (
            *(("--model-repository", str(repository)) if repository else ()),
            *(() if repository else ("--model-dir", str(model_dir))),
            "--snapshot-path",
            str(home / "sessions.npz"),
            "--snapshot-interval",
            "0",
            "--log-level",
            "info",
            *(a.replace("{name}", name).replace("{redis}", redis_url) for a in args),
        )
        replica = Replica(name, workdir / f"{name}.log", args=argv)
        c.replicas.append(replica)
        replica.launch()
        started.append(replica)
    for replica in started:
        replica.wait_ready()
    if nginx:
        c.nginx = Nginx("nginx", workdir / "nginx" / "error.log")
        c.nginx.start(workdir / "nginx", [r.target for r in c.replicas])
    if haproxy:
        c.haproxy = HAProxy("haproxy", workdir / "haproxy" / "haproxy.log")
        c.haproxy.start(workdir / "haproxy", [r.target for r in c.replicas])
    for front in (c.nginx, c.haproxy):
        if front is not None:
            _wait(functools.partial(_serving, front.target), front, "proxying", False)
    return c
