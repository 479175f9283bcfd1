"""Hostile Open Inference Protocol requests through real channels (hypothesis): every answer is
OK or a specific error, never INTERNAL / 500, a stream survives every bad message, and a
rejected request leaves its sequence exactly as it was."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import solo_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
# The same default as the native fuzzing; the dedicated run: SEQSERVE_FUZZ_EXAMPLES=10000.
EXAMPLES = int(os.environ.get("SEQSERVE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

texts = st.one_of(
    st.sampled_from(["", "frames", "probabilities", "basicmotions", "fz"]), st.text(max_size=20)
)
params = st.one_of(
    st.builds(tpb.InferParameter, bool_param=st.booleans()),
    st.builds(tpb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
    st.builds(tpb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
    st.builds(tpb.InferParameter, string_param=texts),
    st.builds(tpb.InferParameter, double_param=st.floats()),
    st.just(tpb.InferParameter()),
)
keys = st.one_of(
    st.sampled_from(
        ["sequence_id", "sequence_start", "sequence_end", "sequence_position", "classification"]
    ),
    st.text(max_size=12),
)
param_maps = st.dictionaries(keys, params, max_size=4)
floats = st.lists(st.floats(width=32), max_size=40)
shapes = st.lists(
    st.one_of(st.integers(-2, 8), st.just(6), st.integers(-(2**63), 2**63 - 1)), max_size=4
)


@st.composite
def infer_requests(draw: Any) -> Any:
    request = tpb.ModelInferRequest(
        model_name=draw(st.sampled_from(["basicmotions", "basicmotions", "", "x"])),
        model_version=draw(st.sampled_from(["", "1", "2", "-1"])),
        id=draw(st.text(max_size=8)),
    )
    for key, value in draw(param_maps).items():
        request.parameters[key].CopyFrom(value)
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["frames", "frames", "x"])),
            datatype=draw(st.sampled_from(["FP32", "FP32", "FP64", "BYTES", ""])),
            shape=draw(st.one_of(shapes, st.just([1, draw(st.integers(1, 6)), 6]))),
        )
        for key, value in draw(param_maps).items():
            tensor.parameters[key].CopyFrom(value)
        values = draw(floats)
        if raw:
            request.raw_input_contents.append(
                draw(st.one_of(st.binary(max_size=64), st.just(np.array(values, "<f4").tobytes())))
            )
        else:
            tensor.contents.fp32_contents.extend(values)
            if draw(st.booleans()):
                tensor.contents.int_contents.extend(draw(st.lists(st.integers(0, 9), max_size=3)))
    if raw and draw(st.booleans()):
        request.raw_input_contents.append(b"\0" * 24)  # one too many
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["probabilities", "x", ""])))
        for key, value in draw(param_maps).items():
            out.parameters[key].CopyFrom(value)
    return request


def _reference(samples: dict[str, np.ndarray]) -> Any:
    x = samples["x"][0][:2].astype(np.float32)
    request = tpb.ModelInferRequest(model_name="basicmotions")
    request.inputs.add(name="frames", datatype="FP32", shape=[1, 2, 6])
    request.raw_input_contents.append(x[None].tobytes())
    request.parameters["sequence_id"].string_param = "fz"
    request.parameters["sequence_position"].int64_param = 0
    request.parameters["sequence_start"].bool_param = True
    return request


@FUZZ
@given(request=infer_requests())
async def test_fuzzed_infer_never_internal_and_streams_survive(server, samples, model_dir, request):
    _, port = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tpb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(_reference(samples))  # sequence "fz" at 2 frames (a replay later)
        try:
            await stub.ModelInfer(request)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            assert exc.details() and exc.details() != "internal error"
        assert code in ALLOWED, code
        call = stub.ModelStreamInfer()
        for message in (request, request, _reference(samples)):
            await call.write(message)
        answers = [await call.read() for _ in range(3)]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        for answer in answers:
            assert answer.error_message != "internal error"
            if answer.error_message:
                assert answer.infer_response.parameters["seqserve_reason"].string_param
        assert answers[2].error_message == "", answers[2].error_message  # still serving
        # A rejected request left sequence "fz" where it was: the next frame continues it.
        if code != grpc.StatusCode.OK:
            probe = _reference(samples)
            probe.parameters["sequence_start"].bool_param = False
            probe.parameters["sequence_position"].int64_param = 2
            x = samples["x"][0][:3].astype(np.float32)
            probe.inputs[0].shape[:] = [1, 1, 6]
            probe.raw_input_contents[0] = x[2:][None].tobytes()
            try:
                reply = await stub.ModelInfer(probe)
            except grpc.aio.AioRpcError as exc:  # an OK fuzzed request may have moved "fz" on
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                return
            got = np.frombuffer(reply.raw_output_contents[0], "<f4")
            assert np.abs(got - solo_run(model_dir, x)[2]).max() <= 1e-5


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def rest_bodies(draw: Any) -> tuple[bytes, dict[str, str]]:
    tensor = {
        "name": draw(st.sampled_from(["frames", "x"])),
        "datatype": draw(st.sampled_from(["FP32", "BYTES", 7])),
        "shape": draw(st.one_of(shapes, st.just([1, 2, 6]), json_values)),
    }
    if draw(st.booleans()):
        tensor["data"] = draw(st.one_of(floats, json_values))
    else:
        tensor["parameters"] = {
            "binary_data_size": draw(st.one_of(st.integers(-5, 80), json_values))
        }
    body = {
        "inputs": draw(st.one_of(st.just([tensor]), json_values)),
        "parameters": draw(st.one_of(st.dictionaries(keys, json_values, max_size=3), json_values)),
        "outputs": draw(st.one_of(st.none(), json_values)),
    }
    head = json.dumps(body).encode()
    tail = draw(st.binary(max_size=64))
    headers = {}
    if tail or draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = draw(
            st.one_of(st.just(str(len(head))), st.text(max_size=5))
        )
    return draw(st.one_of(st.just(head + tail), st.binary(max_size=80))), headers


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        payload = json.loads(exc.read())
        assert payload["error"] and payload["error"] != "internal error"
        return int(exc.code)


@FUZZ
@given(case=rest_bodies(), model=st.sampled_from(["basicmotions", "nope"]))
async def test_fuzzed_rest_infer_never_500(server, case, model):
    app, _ = server
    body, headers = case
    try:
        headers = {k: v.encode("latin-1", "replace").decode("latin-1") for k, v in headers.items()}
        url = f"http://127.0.0.1:{app.http_port}/v2/models/{model}/infer"
        status = await asyncio.to_thread(_post, url, body, headers)
    except ValueError:  # a header value urllib itself will not send
        return
    assert status in (200, 400, 404, 409, 413, 429), status
