"""Observability for real: promtool on deploy/prometheus.yml, every series the Grafana dashboard
queries on a live /metrics, and a real Prometheus scraping a real server under load. The
dashboard's ``$model`` and ``$version`` variables are filled as Grafana would: each value their
``label_values`` queries give, and "All" (``.*``)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, step_request

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "seqserve.json"
# A selector: a seqserve metric name, optionally followed by {label matchers}.
SELECTOR = re.compile(r"\b(seqserve_\w+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\)")
ALL = ".*"  # the variables' allValue


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(
            f"{binary} not installed (Debian package prometheus; "
            "scripts/system-deps.sh installs it)"
        )
    return path


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    assert queries, "the dashboard queries nothing"
    return queries


def _variables() -> list[tuple[str, str, str]]:
    """(name, metric selector, label) of every template variable, in dashboard order: each is
    ``label_values(SELECTOR, LABEL)`` over a seqserve metric."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        assert text == variable["definition"], variable["name"]
        match = LABEL_VALUES.fullmatch(text)
        assert match, f"${variable['name']}: not label_values(...): {text}"
        assert variable["allValue"] == ALL and variable["includeAll"], variable["name"]
        found.append((variable["name"], match[1], match[2]))
    return found


def _fill(expr: str, values: dict[str, str]) -> str:
    """An expression with ``$name`` / ``${name}`` replaced as Grafana does for one value."""
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


def test_every_dashboard_query_is_filtered_by_model_and_version():
    names = [name for name, _, _ in _variables()]
    assert names == ["model", "version"]
    for title, expr in _dashboard_queries():
        for metric, matchers in SELECTOR.findall(expr):
            parsed = {(n, op): v for n, op, v in MATCHER.findall(matchers)}
            assert parsed.get(("model", "=~")) == "$model", f"{title}: {metric} not by $model"
            version = parsed.get(("version", "=~"), "")
            assert version in ("$version", "$version|"), f"{title}: {metric} not by $version"


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, value in matchers:
        actual = labels.get(name, "")
        equal = actual == value if op in ("=", "!=") else re.fullmatch(value, actual) is not None
        if equal != (op in ("=", "=~")):
            return False
    return True


def _alternatives(matchers: list[tuple[str, str, str]]) -> list[list[tuple[str, str, str]]]:
    """One matcher list per literal of an ``=~"a|b"`` alternation, so each must match a series
    (a typo in one alternative would hide behind the others)."""
    variants: list[list[tuple[str, str, str]]] = [[]]
    for name, op, value in matchers:
        literals = value.split("|") if op == "=~" and re.fullmatch(r"\w+(\|\w+)*", value) else []
        options = [(name, "=", v) for v in literals] or [(name, op, value)]
        variants = [[*v, o] for v in variants for o in options]
    return variants


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def _traffic(port: int, samples: dict[str, Any], tag: str = "") -> int:
    """Stream two sessions, frame by frame and in chunks, plus one unary Step that succeeds and
    one that fails; returns the frames applied."""
    import grpc

    from seqserve.proto import seqserve_pb2_grpc as pb_grpc

    x = samples["x"][0]
    requests = [step_request(f"single{tag}", t, x[t : t + 1], start=t == 0) for t in range(40)]
    requests += [
        step_request(f"chunks{tag}", t, x[t : t + 5], start=t == 0) for t in range(0, 30, 5)
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        answers = [r async for r in stub.Stream(iter(requests))]
        assert len(answers) == len(requests)
        assert not any(a.HasField("error") for a in answers)
        await stub.Step(step_request(f"unary{tag}", 0, x[:1], start=True))
        with pytest.raises(grpc.aio.AioRpcError) as error:  # an unknown session, no start
            await stub.Step(step_request("nobody", 3, x[:1]))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    return 40 + 30 + 1


def test_promtool_accepts_the_prometheus_config():
    promtool = _need("promtool")
    run = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stdout + run.stderr


async def test_every_series_the_dashboard_queries_is_on_a_live_metrics_endpoint(
    start_server, samples
):
    from prometheus_client.parser import text_string_to_metric_families

    app, port = await start_server()
    await _traffic(port, samples)
    body = await asyncio.to_thread(_get, f"http://127.0.0.1:{app.metrics_port}/metrics")
    series = [(s.name, s.labels) for f in text_string_to_metric_families(body) for s in f.samples]

    def label_values(selector: str, label: str) -> list[str]:
        ((name, matchers),) = SELECTOR.findall(selector)
        wanted = MATCHER.findall(matchers)
        return sorted({ls[label] for n, ls in series if n == name and _matches(ls, wanted)})

    # Grafana's choices: every value of each variable given the ones before it, and "All".
    choices: list[dict[str, str]] = [{}]
    for name, selector, label in _variables():
        grown = []
        for chosen in choices:
            values = label_values(_fill(selector, chosen), label)
            assert values, f"${name}: {selector} gives no value on /metrics"
            grown += [{**chosen, name: v} for v in values]
        choices = grown
    assert choices == [{"model": "basicmotions", "version": "1"}]
    for chosen in [*choices, {name: ALL for name, _, _ in _variables()}]:
        _check_series(series, chosen)


def _check_series(series: list[tuple[str, dict[str, str]]], chosen: dict[str, str]) -> None:
    for title, raw in _dashboard_queries():
        expr = _fill(raw, chosen)
        assert "$" not in expr.replace("$__rate_interval", ""), f"{title}: unfilled {expr}"
        title = f"{title} {chosen}"
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{title}: no seqserve metric in {expr}"
        label_names: set[str] = set()
        for name, matchers in selectors:
            parsed = MATCHER.findall(matchers)
            assert len(parsed) == matchers.count('"') // 2, f"{title}: cannot read {matchers}"
            for variant in _alternatives(parsed):
                found = [labels for n, labels in series if n == name and _matches(labels, variant)]
                assert found, f"{title}: {name}{{{variant}}} matches nothing on /metrics"
                label_names |= {k for labels in found for k in labels}
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in grouping.split(","))):
                assert label in label_names, f"{title}: grouped by {label!r}, which no series has"


class Prometheus:
    """A real Prometheus server on loopback, its data in a temporary folder."""

    def __init__(self, binary: str, tmp: Path, target: str) -> None:
        # JSON is YAML: the same scrape job as deploy/prometheus.yml, at a 1 s interval.
        config = tmp / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "seqserve",
                            "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target]}],
                        }
                    ],
                }
            )
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / "prometheus.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def label_values(self, label: str, selector: str) -> list[str]:
        """What Grafana's ``label_values(SELECTOR, LABEL)`` asks Prometheus."""
        reply = json.loads(
            _get(
                f"{self.url}/api/v1/label/{label}/values?"
                + urllib.parse.urlencode({"match[]": selector})
            )
        )
        assert reply["status"] == "success", reply
        return sorted(reply["data"])

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = json.loads(
            _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        )
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    async def wait_for(self, what: str, check: Any, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                value = await asyncio.to_thread(check)
            except OSError:  # not listening yet
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _value(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.mark.timeout(90)
async def test_real_prometheus_scrapes_latency_quantiles_and_exact_step_count(
    start_server, samples, tmp_path
):
    binary = _need("prometheus")
    app, port = await start_server()
    prometheus = Prometheus(binary, tmp_path, f"127.0.0.1:{app.metrics_port}")
    try:
        await prometheus.wait_for("readiness", lambda: "Ready" in _get(f"{prometheus.url}/-/ready"))
        # A first scrape before any traffic, so rates have a starting point.
        await prometheus.wait_for(
            "a first scrape", lambda: _value(prometheus.query('up{job="seqserve"}')) == 1
        )

        # Two rounds, each waited for in Prometheus: a series born in round one (the error
        # counter) has two samples to take a rate from.
        def scraped(steps: int, errors: int) -> bool:
            return (
                _value(prometheus.query("seqserve_steps_total")) == steps
                and _value(prometheus.query('sum(seqserve_requests_total{code!="OK"})')) == errors
            )

        sent = 0
        for round_ in (1, 2):
            sent += await _traffic(port, samples, tag=str(round_))
            await prometheus.wait_for(f"round {round_}", partial(scraped, sent, round_))

        p99 = _value(
            prometheus.query(
                "histogram_quantile(0.99, sum by (le) "
                "(rate(seqserve_request_duration_seconds_bucket[1m])))"
            )
        )
        assert p99 is not None and math.isfinite(p99) and 0 < p99 < 6.6, p99
        assert _value(prometheus.query("sum(increase(seqserve_steps_total[1m]))")) > 0

        # The variables as Grafana fills them: label_values is Prometheus's label values API.
        (model, selector, label), (version, version_selector, version_label) = _variables()
        models = prometheus.label_values(label, selector)
        assert models == ["basicmotions"], models
        versions = prometheus.label_values(
            version_label, _fill(version_selector, {model: models[0]})
        )
        assert versions == ["1"], versions
        # Every dashboard query is valid PromQL and returns series, for the one model version
        # and for All; the latency ones a number.
        for chosen in ({model: models[0], version: versions[0]}, {model: ALL, version: ALL}):
            for title, raw in _dashboard_queries():
                expr = _fill(raw, chosen).replace("$__rate_interval", "1m")
                result = prometheus.query(expr)
                assert result, f"{title} {chosen}: no data for {expr}"
                if "request_duration" in expr:
                    values = [float(r["value"][1]) for r in result]
                    assert all(math.isfinite(v) and v > 0 for v in values), (title, values)
        errors = prometheus.query('seqserve_requests_total{code="NOT_FOUND",rpc="Step"}')
        assert _value(errors) == 2
    finally:
        prometheus.stop()
