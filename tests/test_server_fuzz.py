"""Hostile input through real channels: every answer is OK or a specific error, never INTERNAL,
and a rejected request leaves the session exactly as it was."""

from __future__ import annotations

import os

import grpc
import numpy as np
from helpers import probs, solo_run, step_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqserve.proto import seqserve_pb2 as pb

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
