"""Transport-level limits: oversized metadata is refused by the server with a specific code, and
the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from helpers import step_request

from seqserve.proto import seqserve_pb2 as pb


@pytest.mark.parametrize("size", [20_000, 200_000])
async def test_oversized_metadata_is_refused_and_the_server_keeps_serving(stub, samples, size):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModel(pb.ModelRequest(), metadata=(("x-big", "a" * size),), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    r = await stub.Step(step_request("after-big", 0, samples["x"][0][:2], start=True), timeout=10)
    assert r.next_position == 2
