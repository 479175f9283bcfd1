"""The KServe v2 REST API on --http-port, driven by stock ``tritonclient.http`` (binary tensor
data by default, JSON when asked) and by hand-made HTTP requests for what a client library would
never send. Outputs are compared with an in-process onnxruntime run (<= 1e-5)."""

from __future__ import annotations

import asyncio
import functools
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import metric, solo_run

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "basicmotions"
TOL = 1e-5


def _frames(x: np.ndarray, binary: bool = True) -> Any:
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[None]
    tensor = httpclient.InferInput("frames", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 120)


def _http(
    port: int,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_health_metadata_config_and_statistics(server):
    app, _ = server
    port = app.http_port

    def client_side() -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and not client.is_model_ready("nope")
        meta = client.get_server_metadata()
        assert meta["name"] == "seqserve" and "sequence(string_id)" in meta["extensions"]
        assert client.get_model_metadata(MODEL) == {
            "name": MODEL,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "frames", "datatype": "FP32", "shape": [-1, -1, 6]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, -1, 4]}],
        }
        config = client.get_model_config(MODEL, "1")
        assert config["sequence_batching"]["oldest"]["max_candidate_sequences"] == (
            app.settings.max_sessions
        )
        assert config["input"] == [{"name": "frames", "data_type": "TYPE_FP32", "dims": [-1, 6]}]
        stats = client.get_inference_statistics(MODEL)["model_stats"][0]
        assert stats["name"] == MODEL and stats["inference_stats"]["success"]["count"] == 0
        assert client.get_inference_statistics()["model_stats"][0]["name"] == MODEL
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("nope")
        assert "unknown model 'nope'" in info.value.message()
        index = client.get_model_repository_index()
        assert index == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException) as info:
            client.load_model("japanesevowels")
        assert "'japanesevowels' is not in the repository" in info.value.message()

    await _in_thread(client_side)


async def test_inference_binary_and_json_sequences_and_classification(server, samples, model_dir):
    app, _ = server
    port = app.http_port
    x = np.stack([samples["x"][i][:9] for i in range(2)])
    seq = samples["x"][3][:20]

    def client_side() -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        want = [solo_run(model_dir, x[i]) for i in range(2)]
        binary = client.infer(MODEL, [_frames(x)]).as_numpy("probabilities")  # the default
        as_json = client.infer(
            MODEL,
            [_frames(x, binary=False)],
            outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)],
        )
        assert "data" in as_json.get_output("probabilities")
        for got in (binary, as_json.as_numpy("probabilities")):
            assert got.shape == (2, 9, 4)
            for i in range(2):
                assert np.abs(got[i] - want[i]).max() <= TOL
        # A sequence in three requests, int id then a string id, JSON and binary mixed.
        parts = []
        for lo, hi, binary_data in ((0, 5, True), (5, 6, False), (6, 20, True)):
            result = client.infer(
                MODEL,
                [_frames(seq[lo:hi], binary_data)],
                sequence_id=77,
                sequence_start=lo == 0,
                sequence_end=hi == 20,
            )
            assert result.get_response()["parameters"]["sequence_position"] == lo
            parts.append(result.as_numpy("probabilities")[0])
        assert np.abs(np.concatenate(parts) - solo_run(model_dir, seq)).max() <= TOL
        client.infer(MODEL, [_frames(seq[:3])], sequence_id="rest-a", sequence_start=True)
        again = client.infer(
            MODEL,
            [_frames(seq[:3])],
            sequence_id="rest-a",
            parameters={"sequence_position": 0},
        )
        assert again.get_response()["parameters"]["sequence_replayed"] is True
        # Classification, in JSON and in binary.
        for binary_data in (False, True):
            ranked = client.infer(
                MODEL,
                [_frames(x)],
                outputs=[
                    httpclient.InferRequestedOutput(
                        "probabilities", binary_data=binary_data, class_count=3
                    )
                ],
            ).as_numpy("probabilities")
            assert ranked.shape == (2, 9, 3)
            top = ranked[0, 4, 0]
            top = top.decode() if isinstance(top, bytes) else top
            assert int(top.split(":")[1]) == int(np.argmax(want[0][4]))

    await _in_thread(client_side)


async def test_errors_are_specific_and_never_500(server, samples):
    app, _ = server
    port = app.http_port
    x = samples["x"][0][:2].astype(np.float32)
    url = f"/v2/models/{MODEL}/infer"

    def doc(**changes: Any) -> bytes:
        body: dict[str, Any] = {
            "inputs": [
                {"name": "frames", "datatype": "FP32", "shape": [1, 2, 6], "data": x.tolist()}
            ]
        }
        body.update(changes)
        return json.dumps(body).encode()

    def client_side() -> None:
        cases = [
            (b"{not json", 400, "not JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (doc(parameters={"sequence_id": 5}), 400, "must specify the START flag"),
            (doc(parameters={"sequence_id": [1]}), 400, "bool, number or string"),
            (doc(parameters={"sequence_id": 5.5}), 400, "integer or a string"),
            (doc(parameters={"sequence_end": True}), 400, "need a sequence_id"),
            (
                doc(inputs=[{"name": "frames", "datatype": "FP32", "shape": [1, 2, 6]}]),
                400,
                "no data",
            ),
            (
                doc(
                    inputs=[
                        {
                            "name": "frames",
                            "datatype": "FP32",
                            "shape": [1, 2, 6],
                            "data": ["a"] * 12,
                        }
                    ]
                ),
                400,
                "must be numbers",
            ),
            (
                doc(
                    inputs=[
                        {"name": "frames", "datatype": "INT8", "shape": [1, 2, 6], "data": [1] * 12}
                    ]
                ),
                400,
                "must be FP32",
            ),
            (
                doc(
                    inputs=[
                        {
                            "name": "frames",
                            "datatype": "FP32",
                            "shape": [1, 2, 6],
                            "data": [1.0] * 11,
                        }
                    ]
                ),
                400,
                "11 values",
            ),
            (
                b'{"inputs": [{"name": "frames", "datatype": "FP32", "shape": [1, 1, 6], '
                b'"data": [1, 2, 3, 4, 5, NaN]}]}',
                400,
                "NaN or Inf",
            ),
            (
                doc(outputs=[{"name": "probabilities", "parameters": {"classification": "x"}}]),
                400,
                "integer",
            ),
        ]
        for body, status, words in cases:
            code, headers, reply = _http(port, url, body)
            assert code == status, (body, reply)
            message = json.loads(reply)["error"]
            assert words in message, (words, message)
            assert headers["seqserve-code"] in ("INVALID_ARGUMENT", "NOT_FOUND")
        code, headers, reply = _http(port, "/v2/models/nope/infer", doc())
        assert code == 404 and "unknown model" in json.loads(reply)["error"]
        assert headers["seqserve-reason"] == "unknown_model"
        code, _, reply = _http(port, "/v2/nothing/here")
        assert code == 404 and "no such endpoint" in json.loads(reply)["error"]
        code, _, reply = _http(port, url, method="GET")
        assert code == 405 and "error" in json.loads(reply)
        # The binary extension: a header length that does not fit, data for no input.
        code, _, reply = _http(port, url, doc(), {"Inference-Header-Content-Length": "99999"})
        assert code == 400 and "Inference-Header-Content-Length" in json.loads(reply)["error"]
        code, _, reply = _http(
            port, url, doc() + b"\0" * 8, {"Inference-Header-Content-Length": str(len(doc()))}
        )
        assert code == 400 and "belong to no input" in json.loads(reply)["error"]
        # A gap with sequence_position: the expected position in a header too.
        _http(port, url, doc(parameters={"sequence_id": "g", "sequence_start": True}))
        code, headers, reply = _http(
            port, url, doc(parameters={"sequence_id": "g", "sequence_position": 7})
        )
        assert code == 400 and headers["seqserve-expected-position"] == "2"
        assert headers["seqserve-code"] == "FAILED_PRECONDITION"

    await _in_thread(client_side)
    value = functools.partial(metric, app.metrics.registry)
    assert (
        value(
            "seqserve_requests_total",
            {"rpc": "ModelInfer", "code": "INVALID_ARGUMENT", "protocol": "oip-http"},
        )
        >= 12
    )
    assert not value(
        "seqserve_requests_total",
        {"rpc": "ModelInfer", "code": "INTERNAL", "protocol": "oip-http"},
    )


async def test_bearer_tokens_guard_everything_but_health(start_server, samples):
    app, _ = await start_server(auth_token="k" * 20)
    port = app.http_port
    x = samples["x"][0][:2]

    def client_side() -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready()  # probes need no token
        with pytest.raises(InferenceServerException) as info:
            client.get_server_metadata()
        assert "Bearer" in info.value.message()
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, [_frames(x)], headers={"Authorization": "Bearer wrong"})
        good = {"Authorization": "Bearer " + "k" * 20}
        assert client.get_server_metadata(headers=good)["name"] == "seqserve"
        client.infer(MODEL, [_frames(x)], headers=good)

    await _in_thread(client_side)
    code, headers, _ = await asyncio.to_thread(_http, port, "/v2")
    assert code == 401 and headers["seqserve-code"] == "UNAUTHENTICATED"


async def test_http_port_off_and_drain(start_server):
    # Two servers at once: each its own snapshot file (a server locks its file).
    app, _ = await start_server(http_port=-1, snapshot_path="")
    assert app.http_port is None and app.rest is None
    app2, _ = await start_server()
    port = app2.http_port
    assert (await asyncio.to_thread(_http, port, "/v2/health/ready"))[0] == 200
    # The drain's first step (what SIGTERM starts): REST stays up until the end of the drain,
    # not ready, and new work is refused as draining (503), an open sequence included.
    body = {"inputs": [{"name": "frames", "datatype": "FP32", "shape": [1, 1, 6], "data": [0] * 6}]}
    url = f"/v2/models/{MODEL}/infer"
    open_one = {**body, "parameters": {"sequence_id": "d", "sequence_start": True}}
    assert (await asyncio.to_thread(_http, port, url, json.dumps(open_one).encode()))[0] == 200
    app2.refuse_new()
    assert (await asyncio.to_thread(_http, port, "/v2/health/ready"))[0] == 400
    assert (await asyncio.to_thread(_http, port, "/v2/health/live"))[0] == 200
    for parameters in ({}, {"sequence_id": "d"}, {"sequence_id": "e", "sequence_start": True}):
        doc = json.dumps({**body, "parameters": parameters}).encode()
        code, headers, reply = await asyncio.to_thread(_http, port, url, doc)
        assert code == 503, (parameters, reply)
        assert headers["seqserve-code"] == "UNAVAILABLE"
        assert headers["seqserve-reason"] == "draining"
        assert "draining" in json.loads(reply)["error"]
    await app2.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/v2", timeout=2)
        )
