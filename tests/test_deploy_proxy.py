"""The front proxies' configs, read as configs: deploy/nginx/seqserve.conf and
deploy/haproxy/seqserve.cfg hash on seqserve-route, speak h2c, keep idle streams open as long as
a session lives, and pass a call to another replica only when its connection failed. The
binaries check the syntax when installed; tests/test_cluster_routing.py runs both for real."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cluster import HAPROXY_CFG, NGINX_SITE, _nginx_conf, haproxy_config, need, nginx_site

from seqserve.client import ROUTE_HEADER
from seqserve.server.settings import Settings

_Directive = tuple[list[str], list[Any] | None]  # words, then the block's directives if any
IDLE = Settings().session_idle_timeout  # a stream may sit idle as long as a session may


def parse_nginx(text: str) -> list[_Directive]:
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|#[^\n]*|[{};]|[^\s{};]+', text)
    tokens = [t for t in tokens if not t.startswith("#")]

    def block(i: int) -> tuple[list[_Directive], int]:
        out: list[_Directive] = []
        words: list[str] = []
        while i < len(tokens):
            token, i = tokens[i], i + 1
            if token == ";":
                out.append((words, None))
                words = []
            elif token == "{":
                children, i = block(i)
                out.append((words, children))
                words = []
            elif token == "}":
                return out, i
            else:
                words.append(token.strip("\"'"))
        return out, i

    return block(0)[0]


def _find(directives: list[_Directive], *path: str) -> list[_Directive]:
    """Directives named ``path[-1]`` inside blocks named ``path[:-1]``."""
    found = [d for d in directives if d[0] and d[0][0] == path[0]]
    if len(path) == 1:
        return found
    return [x for d in found for x in _find(d[1] or [], *path[1:])]


def _one(directives: list[_Directive], *path: str) -> list[str]:
    (found,) = _find(directives, *path)
    return found[0][1:]


def _nginx_seconds(value: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(int(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def nginx() -> list[_Directive]:
    return parse_nginx(NGINX_SITE.read_text())


def test_nginx_hashes_on_the_route_header_and_spreads_calls_without_one(nginx):
    (upstream,) = _find(nginx, "upstream")
    name = upstream[0][1]
    (hashing,) = _find(upstream[1] or [], "hash")
    assert hashing[0][2] == "consistent"
    key = hashing[0][1]
    (mapping,) = [m for m in _find(nginx, "map") if m[0][2] == key]
    assert mapping[0][1] == "$http_" + ROUTE_HEADER.replace("-", "_")
    entries = {words[0]: words[1] for words, _ in mapping[1] or []}
    assert entries == {"": "$request_id", "default": mapping[0][1]}
    assert len(_find(upstream[1] or [], "server")) >= 2
    assert _one(nginx, "server", "location", "grpc_pass") == [f"grpc://{name}"]


def test_nginx_speaks_h2c_and_keeps_long_idle_streams(nginx):
    (listen,) = _find(nginx, "server", "listen")
    assert "http2" in listen[0] and "ssl" not in listen[0]
    assert _one(nginx, "server", "client_max_body_size") == ["0"], "1m would cut long streams"
    for path in (
        ("server", "client_body_timeout"),
        ("server", "send_timeout"),
        ("server", "location", "grpc_read_timeout"),
        ("server", "location", "grpc_send_timeout"),
    ):
        assert _nginx_seconds(_one(nginx, *path)[0]) > IDLE, path
    assert _find(nginx, "upstream", "keepalive")


def test_nginx_passes_on_only_calls_that_never_reached_a_replica(nginx):
    choices = set(_one(nginx, "server", "location", "grpc_next_upstream"))
    assert choices and choices <= {"error", "timeout"}, choices  # never non_idempotent, http_*
    assert _nginx_seconds(_one(nginx, "server", "location", "grpc_connect_timeout")[0]) <= 5


def test_nginx_accepts_the_config_it_runs_in_the_tests(tmp_path):
    binary = need("nginx", "nginx")
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
    config = tmp_path / "nginx.conf"
    config.write_text(_nginx_conf(tmp_path, nginx_site("127.0.0.1:1", ["127.0.0.1:2"])))
    run = subprocess.run(
        [
            binary,
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(config),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            f"pid {tmp_path / 'pid'};",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr


def _haproxy(text: str) -> dict[str, list[list[str]]]:
    """Section header ("defaults", "backend seqserve_replicas" ...) -> its lines as words."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not raw[0].isspace():
            current = line
            sections[current] = []
        else:
            assert current is not None
            sections[current].append(line.split())
    return sections


def _haproxy_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d|)", value)
    assert match, value
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1e-3}
    return int(match[1]) * units[match[2]]


def test_haproxy_hashes_on_the_route_header_over_h2c():
    sections = _haproxy(HAPROXY_CFG.read_text())
    (backend,) = [lines for name, lines in sections.items() if name.startswith("backend")]
    assert ["balance", f"hdr({ROUTE_HEADER})"] in backend
    assert ["hash-type", "consistent"] in backend
    servers = [line for line in backend if line[0] == "server"]
    assert len(servers) >= 2 and all("h2" in s[s.index("proto") + 1 :][:1] for s in servers)
    (frontend,) = [lines for name, lines in sections.items() if name.startswith("frontend")]
    (bind,) = [line for line in frontend if line[0] == "bind"]
    assert bind[bind.index("proto") + 1] == "h2" and "ssl" not in bind
    defaults = {
        line[0] + (" " + line[1] if line[0] == "timeout" else ""): line[1:]
        for line in sections["defaults"]
    }
    assert defaults["retry-on"] == ["conn-failure"]
    for timeout in ("timeout client", "timeout server"):
        assert _haproxy_seconds(defaults[timeout][1]) > IDLE, timeout


def test_haproxy_accepts_the_config_it_runs_in_the_tests(tmp_path: Path):
    """(The deployed file itself names hosts that resolve only in compose or Kubernetes.)"""
    binary = need("haproxy", "haproxy")
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config("127.0.0.1:1", ["127.0.0.1:2", "127.0.0.1:3"]))
    run = subprocess.run(
        [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr
