"""Hostile input through real channels: every answer is OK or a specific error, never INTERNAL,
and a rejected request leaves the session exactly as it was. Messages are fuzzed as protobuf
(well-formed messages with hostile values) and as bytes (random and mutated encodings, sent
through a channel with no serializer), so decoding itself is under test too."""

from __future__ import annotations

import itertools
import logging
import os

import grpc
import numpy as np
from helpers import probs, solo_run, step_request
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto.codec import to_matrix

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}

ids = st.one_of(
    st.sampled_from(["fz", "other", ""]),
    st.text(max_size=140),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
matrices = st.builds(
    pb.Matrix,
    rows=st.one_of(st.just(0), st.integers(0, 5000), st.integers(0, 2**32 - 1)),
    cols=st.one_of(st.just(0), st.just(6), st.integers(0, 2**32 - 1)),
    data=st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=0, max_size=60
        ).map(lambda v: np.array(v, "<f4").tobytes()),
    ),
)
requests = st.builds(
    pb.StepRequest,
    session_id=ids,
    position=st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1)),
    frames=matrices,
    start=st.booleans(),
    end=st.just(False),
    output=st.sampled_from([0, 1, 7]),
    tag=st.integers(0, 2**64 - 1),
)

# A short run in the default suite; the dedicated run: SEQSERVE_FUZZ_EXAMPLES=10000.
EXAMPLES = int(os.environ.get("SEQSERVE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@FUZZ
@given(request=requests)
async def test_fuzzed_steps_never_internal_and_keep_state(stub, samples, model_dir, request):
    x = samples["x"][0][:4]
    await stub.Step(step_request("fz", 0, x[:2], start=True))  # replayed after the first run
    before = await stub.GetSession(pb.SessionRef(session_id="fz"))
    code = await _code(stub.Step(request))
    assert code in ALLOWED, code
    call = stub.Stream(iter([request]))
    async for response in call:
        if response.HasField("error"):
            assert response.error.code != grpc.StatusCode.INTERNAL.value[0]
            assert response.error.reason
    assert await call.code() == grpc.StatusCode.OK
    if request.session_id == "fz" and code != grpc.StatusCode.OK:
        after = await stub.GetSession(pb.SessionRef(session_id="fz"))
        assert after.position == before.position
        if after.position == 2:  # an earlier example may have sent frames 2 and 3 already
            r = await stub.Step(step_request("fz", 2, x[2:]))
            assert np.abs(probs(r) - solo_run(model_dir, x)[2:]).max() <= 1e-5


@FUZZ
@given(
    sequences=st.lists(st.builds(pb.Sequence, frames=matrices), max_size=4), per_step=st.booleans()
)
async def test_fuzzed_predict_never_internal(stub, sequences, per_step):
    code = await _code(stub.Predict(pb.PredictRequest(sequences=sequences, per_step=per_step)))
    assert code in ALLOWED, code


@FUZZ
@given(
    session_id=ids,
    call=st.sampled_from(["OpenSession", "GetSession", "ResetSession", "CloseSession"]),
)
async def test_fuzzed_session_calls_never_internal(stub, session_id, call):
    request = (
        pb.OpenSessionRequest(session_id=session_id)
        if call == "OpenSession"
        else pb.SessionRef(session_id=session_id)
    )
    code = await _code(getattr(stub, call)(request))
    assert code in ALLOWED, code


# -- bytes ------------------------------------------------------------------------------------

METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["SeqServe"].methods}
batches = st.builds(
    pb.StepBatchRequest,
    session_ids=st.lists(ids, max_size=4),
    positions=st.lists(st.integers(0, 2**64 - 1), max_size=4),
    frames=matrices,
    start=st.booleans(),
    tag=st.integers(0, 2**64 - 1),
)
# Valid encodings of every request type: the mutations below start from these.
encodings = st.one_of(
    requests,
    batches,
    st.builds(
        pb.PredictRequest, sequences=st.lists(st.builds(pb.Sequence, frames=matrices), max_size=3)
    ),
    st.builds(pb.SessionRef, session_id=ids),
).map(lambda m: m.SerializeToString())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(encodings))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "utf8"]))
        if op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data and at < len(data):
            if op == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "delete":
                del data[at]
            else:  # a byte that is never valid UTF-8
                data[at] = draw(st.sampled_from([0x80, 0xC0, 0xFE, 0xFF]))
    return bytes(data)


payloads = st.one_of(st.binary(max_size=300), mutated())
_probe_ids = itertools.count()


def _probe(method: str, sample: np.ndarray) -> tuple[bytes, str]:
    """A good request to send after the fuzzed one on a stream: it must still be answered."""
    session_id = f"probe-{next(_probe_ids)}"
    if method == "Stream":
        return step_request(session_id, 0, sample, start=True, tag=4242).SerializeToString(), ""
    request = pb.StepBatchRequest(
        session_ids=[session_id], positions=[0], frames=to_matrix(sample), start=True, tag=4242
    )
    return request.SerializeToString(), session_id


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), data=payloads)
async def test_fuzzed_bytes_never_unknown_or_internal_and_streams_go_on(
    server, samples, caplog, method, data
):
    """Random and mutated bytes on every method: a unary call answers OK or a specific error
    (``undecodable`` when the bytes do not decode), never UNKNOWN or INTERNAL; on a stream the
    bad message is answered in the stream and a good request after it is answered as usual."""
    spec = METHODS[method]
    path = f"/{pb.DESCRIPTOR.services_by_name['SeqServe'].full_name}/{method}"
    caplog.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        if not spec.client_streaming:
            try:
                await channel.unary_unary(path)(data, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    assert dict(exc.trailing_metadata()).get("seqserve-reason"), exc
            assert code in ALLOWED, code
            event(f"unary: {code.name}")  # --hypothesis-show-statistics shows the spread
        else:
            probe, _ = _probe(method, samples["x"][0][:1])
            call = channel.stream_stream(path)(iter([data, probe]), timeout=30)
            answers = [raw async for raw in call]
            assert await call.code() == grpc.StatusCode.OK
            if method == "Stream":
                out = [pb.StepResponse.FromString(a) for a in answers]
                errors = [r.error for r in out if r.HasField("error")]
                probed = [r for r in out if r.tag == 4242 and r.session_id.startswith("probe-")]
            else:
                batch_out = [pb.StepBatchResponse.FromString(a) for a in answers]
                errors = [e.error for r in batch_out for e in r.errors]
                probed = [r for r in batch_out if r.tag == 4242 and not r.errors]
            assert len(answers) == 2
            assert probed, "the good request after the fuzzed one was not answered"
            for error in errors:
                assert error.reason and error.code != grpc.StatusCode.INTERNAL.value[0], error
            event(f"stream: {', '.join(sorted({e.reason for e in errors})) or 'no error'}")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
