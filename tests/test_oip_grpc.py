"""The Open Inference Protocol over gRPC, driven by stock ``tritonclient.grpc`` against the real
server in-process: metadata, sequences (streamed and unary, int and string ids), stateless
batches, classification, the repository calls, errors and authentication. Every output is
compared with an in-process onnxruntime run of the whole history (<= 1e-5).

tritonclient's gRPC client is synchronous (its stream answers on a thread of its own), so each
test runs its client side in a worker thread while the server serves on the test's loop."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import metric, probs, solo_run, step_request

from seqserve.proto import seqserve_pb2 as pb

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as tpb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as tpb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "basicmotions"
TOL = 1e-5


def _frames(x: np.ndarray) -> Any:
    """One FP32 ``frames`` input of shape [1, T, F] (or [B, T, F] as given)."""
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[None]
    tensor = grpcclient.InferInput("frames", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 120)


class _Collector:
    """A tritonclient stream callback keeping every answer, for waiting on a count."""

    def __init__(self) -> None:
        self.results: list[tuple[Any, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, result: Any, error: Any) -> None:
        with self._cond:
            self.results.append((result, error))
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 60.0) -> list[tuple[Any, Any]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.results) >= count, timeout), (
                f"{len(self.results)} of {count} answers"
            )
            return list(self.results)


async def test_metadata_config_and_unimplemented(server):
    app, port = server

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
        assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "2")
        meta = client.get_server_metadata()
        assert meta.name == "seqserve"
        assert list(meta.extensions) == [
            "classification",
            "sequence",
            "sequence(string_id)",
            "sequence_position",
            "model_configuration",
            "model_repository",
            "statistics",
            "binary_tensor_data",
            "parameters",
        ]
        model = client.get_model_metadata(MODEL)
        assert (model.name, list(model.versions), model.platform) == (
            MODEL,
            ["1"],
            "onnxruntime_onnx",
        )
        assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
            ("frames", "FP32", [-1, -1, 6])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
            ("probabilities", "FP32", [-1, -1, 4])
        ]
        config = client.get_model_config(MODEL).config
        assert (config.name, config.platform, config.max_batch_size) == (
            MODEL,
            "onnxruntime_onnx",
            app.settings.max_batch,
        )
        assert list(config.input[0].dims) == [-1, 6] and list(config.output[0].dims) == [-1, 4]
        batching = config.sequence_batching
        assert batching.max_sequence_idle_microseconds == int(
            app.settings.session_idle_timeout * 1e6
        )
        assert batching.WhichOneof("strategy_choice") == "oldest"
        assert config.parameters["labels"].string_value == "badminton,running,standing,walking"
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("nope")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert "unknown model 'nope'" in info.value.message()
        # Shared memory, tracing, logging: not served, and the status names the method.
        for call in (
            client.get_system_shared_memory_status,
            client.get_trace_settings,
            client.get_log_settings,
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNIMPLEMENTED"
            assert "inference.GRPCInferenceService/" in info.value.message()
            assert "not implemented by seqserve" in info.value.message()

    await _in_thread(client_side)


async def test_interleaved_sequences_on_one_stream_match_their_solo_runs(
    server, samples, model_dir, stub
):
    """Many sequences, one frame per request, interleaved on one stream (async_stream_infer
    with sequence_id / sequence_start / sequence_end), as a Triton sequence client sends."""
    _, port = server
    n, frames = 12, 25
    xs = [samples["x"][i % len(samples["x"])][i : i + frames] for i in range(n)]

    def client_side() -> dict[str, Any]:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        answers = _Collector()
        client.start_stream(callback=answers)
        for t in range(frames):
            for i in range(n):
                client.async_stream_infer(
                    MODEL,
                    [_frames(xs[i][t : t + 1])],
                    request_id=f"{i}:{t}",
                    sequence_id=1000 + i,
                    sequence_start=t == 0,
                    sequence_end=t == frames - 1 and i % 2 == 0,  # the odd ones stay open
                )
        results = answers.wait(n * frames)
        client.stop_stream()
        out: dict[str, Any] = {}
        for result, error in results:
            assert error is None, error
            out[result.get_response().id] = result.as_numpy("probabilities")
        return out

    out = await _in_thread(client_side)
    for i in range(n):
        got = np.concatenate([out[f"{i}:{t}"][0] for t in range(frames)])
        assert np.abs(got - solo_run(model_dir, xs[i])).max() <= TOL, f"sequence {i}"
    # One namespace: the native API sees the sequences as sessions named by their ids.
    info = await stub.GetSession(pb.SessionRef(session_id="1001"))
    assert info.position == frames and not info.closed
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(pb.SessionRef(session_id="1000"))  # ended by sequence_end
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "closed at position 25" in (err.value.details() or "")
    # ... and can drive them: the next frame natively continues the same state.
    x = samples["x"][1][1 : 1 + frames + 1]
    reply = await stub.Step(step_request("1001", frames, x[frames:]))
    assert np.abs(probs(reply)[0] - solo_run(model_dir, x)[-1]).max() <= TOL


async def test_unary_chunks_with_a_string_id_and_exactly_once_positions(server, samples, model_dir):
    _, port = server
    x = samples["x"][2][:40]
    want = solo_run(model_dir, x)
    cuts = [0, 1, 4, 5, 13, 29, 40]

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        got = []
        for lo, hi in itertools.pairwise(cuts):
            result = client.infer(
                MODEL, [_frames(x[lo:hi])], sequence_id="walk-7", sequence_start=lo == 0
            )
            params = result.get_response().parameters
            assert params["sequence_position"].int64_param == lo
            assert params["sequence_next_position"].int64_param == hi
            got.append(result.as_numpy("probabilities")[0])
        assert np.abs(np.concatenate(got) - want).max() <= TOL
        # sequence_position: a retried request is answered again, never applied twice.
        again = client.infer(
            MODEL,
            [_frames(x[13:29])],
            sequence_id="walk-7",
            parameters={"sequence_position": 13},
        )
        assert again.get_response().parameters["sequence_replayed"].bool_param
        assert np.abs(again.as_numpy("probabilities")[0] - want[13:29]).max() <= TOL
        # A gap is refused with the position to resend from.
        with pytest.raises(InferenceServerException) as info:
            client.infer(
                MODEL,
                [_frames(x[:1])],
                sequence_id="walk-7",
                parameters={"sequence_position": 45},
            )
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "expects 40" in info.value.message()
        # Appending goes on from where the session is.
        more = samples["x"][2][:41]
        tail = client.infer(MODEL, [_frames(more[40:41])], sequence_id="walk-7", sequence_end=True)
        assert np.abs(tail.as_numpy("probabilities")[0] - solo_run(model_dir, more)[40:]).max() <= (
            TOL
        )

    await _in_thread(client_side)


async def test_stateless_batch_and_classification(server, samples, model_dir):
    _, port = server
    x = np.stack([samples["x"][i][:17] for i in range(3)])

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        result = client.infer(MODEL, [_frames(x)])
        got = result.as_numpy("probabilities")
        assert got.shape == (3, 17, 4)
        for i in range(3):
            assert np.abs(got[i] - solo_run(model_dir, x[i])).max() <= TOL
        # Typed contents (fp32_contents) instead of raw bytes: the same numbers.
        request = tpb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="frames", datatype="FP32", shape=list(x.shape))
        request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        typed = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(3, 17, 4)
        assert np.abs(typed - got).max() <= TOL
        # Classification: the top 2 classes of every step as "score:index:label".
        labels = ("badminton", "running", "standing", "walking")
        ranked = client.infer(
            MODEL,
            [_frames(x)],
            outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)],
        ).as_numpy("probabilities")
        assert ranked.shape == (3, 17, 2)
        for at in np.ndindex(3, 17):
            order = np.argsort(-got[at])[:2]
            for k in range(2):
                score, index, label = ranked[at][k].decode().split(":")
                assert int(index) == order[k] and label == labels[order[k]]
                assert abs(float(score) - got[at][order[k]]) <= 1e-6

    await _in_thread(client_side)


def _status(fn: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value.status() or "", info.value.message() or ""


async def test_bad_requests_get_specific_errors_and_a_stream_survives_them(server, samples):
    _, port = server
    x = samples["x"][0][:3].astype(np.float32)

    def raw(request: Any) -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
            except grpc.RpcError as exc:
                return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def request(shape: list[int], data: bytes, **kw: Any) -> Any:
        message = tpb.ModelInferRequest(model_name=kw.pop("model", MODEL))
        message.inputs.add(
            name=kw.pop("name", "frames"), datatype=kw.pop("dt", "FP32"), shape=shape
        )
        message.raw_input_contents.append(data)
        for key, value in kw.items():
            message.parameters[key].int64_param = value
        return message

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        invalid = "StatusCode.INVALID_ARGUMENT"
        code, text = _status(lambda: client.infer(MODEL, [_frames(x)], sequence_id=77))
        assert code == invalid
        assert text == (
            "inference request for sequence 77 to model 'basicmotions' must specify the START "
            "flag on the first request of the sequence"
        )
        code, text = _status(lambda: client.infer("nope", [_frames(x)]))
        assert code == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in text
        code, text = _status(lambda: client.infer(MODEL, [_frames(x)], model_version="3"))
        assert code == "StatusCode.NOT_FOUND" and "no version 3" in text
        two = np.stack([x, x])
        code, text = _status(
            lambda: client.infer(MODEL, [_frames(two)], sequence_id=5, sequence_start=True)
        )
        assert code == invalid and "batch size 2 with a sequence_id" in text
        nan = x.copy()
        nan[1, 2] = np.nan
        code, text = _status(
            lambda: client.infer(MODEL, [_frames(nan)], sequence_id=6, sequence_start=True)
        )
        assert code == invalid and "NaN or Inf" in text
        code, text = _status(
            lambda: client.infer(
                MODEL, [_frames(x)], outputs=[grpcclient.InferRequestedOutput("logits")]
            )
        )
        assert code == invalid and "unknown output 'logits'" in text
        code, text = _status(lambda: client.infer(MODEL, [_frames(x[:, :5])]))
        assert code == invalid and "5 features per frame, the model expects 6" in text
        # The same sequence twice with start, no positions: refused, the first one untouched.
        client.infer(MODEL, [_frames(x)], sequence_id="dup", sequence_start=True)
        code, text = _status(
            lambda: client.infer(MODEL, [_frames(x)], sequence_id="dup", sequence_start=True)
        )
        assert code == "StatusCode.ALREADY_EXISTS" and "already active (position 3)" in text
        # Hand-made requests: names, datatypes, byte counts, shapes.
        data = x[None].tobytes()
        cases = [
            (request([1, 3, 6], data, name="x"), "takes one input, 'frames'"),
            (request([1, 3, 6], data, dt="FP64"), "must be FP32, not 'FP64'"),
            (request([1, 3, 6], data[:-4]), "68 bytes of data, shape [1, 3, 6] of FP32 needs 72"),
            (request([3, 6], data), "must have shape [batch, time, 6]"),
            (request([1, 0, 6], b""), "holds no frame"),
            (request([1, 3, 6], data, sequence_start=1), "sequence_start must be a bool"),
            (request([1, 3, 6], data, sequence_postion=1), "unknown parameter 'sequence_postion'"),
            (request([1, 3, 6], data, sequence_position=0), "need a sequence_id"),
        ]
        for message, words in cases:
            code, text = raw(message)
            assert (code, words in text) == (grpc.StatusCode.INVALID_ARGUMENT, True), (text, words)
        bad_id = tpb.ModelInferRequest(model_name=MODEL)
        bad_id.CopyFrom(request([1, 3, 6], data))
        bad_id.parameters["sequence_id"].string_param = "no spaces allowed"
        code, text = raw(bad_id)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence_id" in text
        # On a stream every bad request is answered in the stream, which goes on serving.
        answers = _Collector()
        client.start_stream(callback=answers)
        client.async_stream_infer(MODEL, [_frames(x)], request_id="a", sequence_id=900)
        client.async_stream_infer(MODEL, [_frames(x[:, :5])], request_id="b")
        client.async_stream_infer("nope", [_frames(x)], request_id="c")
        client.async_stream_infer(
            MODEL, [_frames(x)], request_id="d", sequence_id=901, sequence_start=True
        )
        results = answers.wait(4)
        client.stop_stream()
        errors = " | ".join(str(e) for _, e in results if e is not None)
        assert sum(e is not None for _, e in results) == 3
        for words in ("must specify the START flag", "5 features per frame", "unknown model"):
            assert words in errors
        (good,) = [r for r, e in results if e is None]
        assert good.get_response().id == "d"

    await _in_thread(client_side)


async def test_stream_error_carries_id_reason_and_expected_position(server, samples):
    """A failed stream request's infer_response names the request and, for position errors, the
    position to resend from (parameters), for clients that need more than the message."""
    _, port = server
    x = samples["x"][0][:2].astype(np.float32)
    request = tpb.ModelInferRequest(model_name=MODEL, id="late")
    request.inputs.add(name="frames", datatype="FP32", shape=[1, 2, 6])
    request.raw_input_contents.append(x[None].tobytes())
    request.parameters["sequence_id"].string_param = "gap-1"
    request.parameters["sequence_start"].bool_param = True
    first = tpb.ModelInferRequest()
    first.CopyFrom(request)
    first.id = "first"
    request.parameters["sequence_start"].bool_param = False
    request.parameters["sequence_position"].int64_param = 9
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = tpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        await call.write(first)
        ok = await call.read()
        await call.write(request)
        failed = await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert ok.error_message == "" and ok.infer_response.id == "first"
    assert "expects 2" in failed.error_message
    params = failed.infer_response.parameters
    assert failed.infer_response.id == "late"
    assert params["seqserve_reason"].string_param == "position_gap"
    assert params["sequence_expected_position"].int64_param == 2


async def test_repository_index_load_unload_and_statistics(server, samples):
    _, port = server
    x = samples["x"][0][:2]

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        index = client.get_model_repository_index().models
        assert [(m.name, m.version, m.state) for m in index] == [(MODEL, "1", "READY")]
        client.infer(MODEL, [_frames(x)])
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, [_frames(x)], sequence_id=31)
        stats = client.get_inference_statistics(MODEL).model_stats[0]
        assert (stats.name, stats.version) == (MODEL, "1")
        assert stats.inference_stats.success.count == 1 and stats.inference_stats.fail.count == 1
        assert stats.inference_stats.success.ns > 0 and stats.last_inference > 0
        assert stats.inference_count == 2  # frames run
        # Unload drains the model (UNLOADING while sessions pinned to it remain, then released:
        # UNAVAILABLE); load brings it back.
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        index = client.get_model_repository_index().models
        assert [(m.name, m.state) for m in index] in (
            [(MODEL, "UNLOADING")],
            [(MODEL, "UNAVAILABLE")],
        ), index
        assert "unloaded" in index[0].reason
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tpb_grpc.GRPCInferenceServiceStub(channel)
            assert not stub.RepositoryIndex(tpb.RepositoryIndexRequest(ready=True)).models
        code, text = _status(lambda: client.infer(MODEL, [_frames(x)]))
        assert code == "StatusCode.UNAVAILABLE" and "unloaded" in text
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
        client.infer(MODEL, [_frames(x)])
        # Other models: this server's repository is one model directory (--model-dir).
        for call in (client.load_model, client.unload_model):
            code, text = _status(lambda call=call: call("japanesevowels"))
            assert code == "StatusCode.NOT_FOUND"
            assert "'japanesevowels'" in text
        code, text = _status(lambda: client.load_model(MODEL, config='{"max_batch_size": 8}'))
        assert code == "StatusCode.INVALID_ARGUMENT" and "load parameters" in text

    await _in_thread(client_side)


async def test_request_metrics_carry_the_protocol(server, samples):
    app, port = server
    x = samples["x"][0][:2]

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        client.infer(MODEL, [_frames(x)])
        with pytest.raises(InferenceServerException):
            client.infer("nope", [_frames(x)])

    await _in_thread(client_side)
    registry = app.metrics.registry
    value = functools.partial(metric, registry)
    assert (
        value(
            "seqserve_requests_total", {"rpc": "ModelInfer", "code": "OK", "protocol": "oip-grpc"}
        )
        == 1
    )
    assert (
        value(
            "seqserve_requests_total",
            {"rpc": "ModelInfer", "code": "NOT_FOUND", "protocol": "oip-grpc"},
        )
        == 1
    )
    assert (
        value(
            "seqserve_request_duration_seconds_count", {"rpc": "ModelInfer", "protocol": "oip-grpc"}
        )
        == 2
    )


async def test_authentication_and_ownership(start_server, samples):
    """The same tokens as the native API; a sequence belongs to the principal that started it."""
    _, port = await start_server(auth_token="t" * 24)
    x = samples["x"][0][:2]
    ana = {"authorization": "Bearer " + "t" * 24}

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        code, text = _status(lambda: client.infer(MODEL, [_frames(x)]))
        assert code == "StatusCode.UNAUTHENTICATED" and "Bearer" in text
        code, _ = _status(lambda: client.is_server_live(headers={"authorization": "Bearer nope"}))
        assert code == "StatusCode.UNAUTHENTICATED"
        client.infer(MODEL, [_frames(x)], sequence_id=4, sequence_start=True, headers=ana)
        assert client.infer(MODEL, [_frames(x)], sequence_id=4, headers=ana) is not None

    await _in_thread(client_side)


async def test_another_principal_cannot_continue_a_sequence(start_server, samples, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("ana:" + "a" * 20 + "\nben:" + "b" * 20 + "\n")
    _, port = await start_server(tokens_file=str(tokens))
    x = samples["x"][0][:2]
    ana = {"authorization": "Bearer " + "a" * 20}
    ben = {"authorization": "Bearer " + "b" * 20}

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        client.infer(MODEL, [_frames(x)], sequence_id="ana-1", sequence_start=True, headers=ana)
        code, text = _status(
            lambda: client.infer(MODEL, [_frames(x)], sequence_id="ana-1", headers=ben)
        )
        assert code == "StatusCode.INVALID_ARGUMENT" and "must specify the START flag" in text
        code, _ = _status(
            lambda: client.infer(
                MODEL, [_frames(x)], sequence_id="ana-1", sequence_start=True, headers=ben
            )
        )
        assert code == "StatusCode.ALREADY_EXISTS"
        client.infer(MODEL, [_frames(x)], sequence_id="ana-1", headers=ana)

    await _in_thread(client_side)


async def test_drain_ends_open_streams_after_answering_them(start_server, samples):
    app, port = await start_server()
    x = samples["x"][0][:1].astype(np.float32)
    request = tpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="frames", datatype="FP32", shape=[1, 1, 6])
    request.raw_input_contents.append(x[None].tobytes())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = tpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        await call.write(request)
        assert (await call.read()).error_message == ""
        await app.stop()
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (await call.details() or "")


async def test_native_and_protocol_share_one_session_namespace(server, samples, model_dir, stub):
    """A session opened natively is sequence "s-9" over the protocol, and the other way."""
    _, port = server
    x = samples["x"][3][:6]
    async for _ in stub.Stream(iter([step_request("s-9", 0, x[:3], start=True)])):
        pass

    def client_side() -> np.ndarray:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        return client.infer(MODEL, [_frames(x[3:])], sequence_id="s-9").as_numpy("probabilities")

    got = await _in_thread(client_side)
    assert np.abs(got[0] - solo_run(model_dir, x)[3:]).max() <= TOL
    reply = await stub.GetSession(pb.SessionRef(session_id="s-9"))
    assert reply.position == 6


async def test_repository_calls_over_a_model_repository(start_server, samples, tmp_path):
    """Against a repository of two models, basicmotions with versions 1 and 2 (policy: both)
    and japanesevowels: the index lists every version, a sequence started on version 1 stays
    there when named and is answered by it, unload drains japanesevowels (a sequence pinned to
    it goes on) and load brings it back."""
    import shutil

    root = tmp_path / "repo"
    bundled = Path(__file__).resolve().parent.parent / "models"
    for version in (1, 2):
        shutil.copytree(bundled / "basicmotions", root / "basicmotions" / str(version))
    (root / "basicmotions" / "config.json").write_text('{"version_policy": {"all": true}}')
    shutil.copytree(bundled / "japanesevowels", root / "japanesevowels" / "1")
    _, port = await start_server(model_dir="", model_repository=str(root))
    x = samples["x"][0][:4]
    vowels = np.zeros((3, 12), np.float32)

    def client_side() -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        index = client.get_model_repository_index().models
        assert sorted((m.name, m.version, m.state) for m in index) == [
            (MODEL, "1", "READY"),
            (MODEL, "2", "READY"),
            ("japanesevowels", "1", "READY"),
        ]
        assert client.get_model_metadata(MODEL).versions == ["1", "2"]
        # A sequence started on version 1 (named) is answered by it; the latest is 2.
        first = client.infer(
            MODEL, [_frames(x[:2])], model_version="1", sequence_id=77, sequence_start=True
        )
        assert first.get_response().model_version == "1"
        again = client.infer(MODEL, [_frames(x[2:])], sequence_id=77)
        assert again.get_response().model_version == "1"
        code, text = _status(
            lambda: client.infer(MODEL, [_frames(x[2:3])], model_version="2", sequence_id=77)
        )
        assert code == "StatusCode.FAILED_PRECONDITION" and "version 1" in text
        fresh = client.infer(MODEL, [_frames(x[:1])], sequence_id=78, sequence_start=True)
        assert fresh.get_response().model_version == "2"
        # A japanesevowels sequence survives an unload of its model; new ones are refused.
        client.infer("japanesevowels", [_frames(vowels[:2])], sequence_id=5, sequence_start=True)
        client.unload_model("japanesevowels")
        assert not client.is_model_ready("japanesevowels")
        states = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
        assert states[("japanesevowels", "1")] == "UNLOADING"  # a sequence is pinned to it
        kept = client.infer("japanesevowels", [_frames(vowels[2:])], sequence_id=5)
        assert kept.get_response().model_version == "1"
        code, _ = _status(
            lambda: client.infer(
                "japanesevowels", [_frames(vowels[:1])], sequence_id=6, sequence_start=True
            )
        )
        assert code == "StatusCode.UNAVAILABLE"
        client.load_model("japanesevowels")
        assert client.is_model_ready("japanesevowels")
        client.infer("japanesevowels", [_frames(vowels[:1])], sequence_id=6, sequence_start=True)

    await _in_thread(client_side)


def test_every_domain_error_has_a_status_on_both_wires():
    """A new error class must be given its status on the native and the protocol wire alike
    (else it would reach a client as INTERNAL)."""
    import inspect

    from seqserve.server import errors
    from seqserve.server.oip.front import status_of
    from seqserve.server.servicer import _status_code

    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.SeqServeError) and cls is not errors.SeqServeError
    ]
    assert len(classes) >= 15
    for cls in classes:
        exc = cls.__new__(cls)
        assert status_of(exc)[0] != "INTERNAL", cls
        assert _status_code(exc) != grpc.StatusCode.INTERNAL, cls
        assert status_of(exc)[0] == _status_code(exc).name, cls
