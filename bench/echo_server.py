"""A bare grpc.aio server speaking seqserve's Stream/Step and StreamBatch/StepBatch with canned
answers of the right shape: the transport's ceiling, for comparison in the same run.

    python -P bench/echo_server.py PORT
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from functools import cache

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix

CLASSES = 4
PROBS = to_matrix(np.full((1, CLASSES), 1 / CLASSES, np.float32))


def _answer(request: pb.StepRequest) -> pb.StepResponse:
    rows = request.frames.rows or 1
    return pb.StepResponse(
        session_id=request.session_id,
        position=request.position,
        frames=rows,
        probabilities=PROBS,
        top_class=[0],
        next_position=request.position + rows,
        tag=request.tag,
    )


@cache
def _batch_probs(entries: int) -> pb.Matrix:
    return to_matrix(np.full((entries, CLASSES), 1 / CLASSES, np.float32))


def _answer_batch(request: pb.StepBatchRequest) -> pb.StepBatchResponse:
    entries = len(request.session_ids)
    return pb.StepBatchResponse(
        probabilities=_batch_probs(entries),
        top_class=[0] * entries,
        next_positions=[p + 1 for p in request.positions],
        replayed=[False] * entries,
        tag=request.tag,
    )


class Echo(pb_grpc.SeqServeServicer):
    async def Stream(
        self,
        request_iterator: AsyncIterator[pb.StepRequest],  # type: ignore[override]
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StepResponse]:
        async for request in request_iterator:
            yield _answer(request)

    async def Step(
        self,
        request: pb.StepRequest,  # type: ignore[override]
        context: grpc.aio.ServicerContext,
    ) -> pb.StepResponse:
        return _answer(request)

    async def StreamBatch(
        self,  # type: ignore[override]
        request_iterator: AsyncIterator[pb.StepBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StepBatchResponse]:
        async for request in request_iterator:
            yield _answer_batch(request)

    async def StepBatch(
        self,
        request: pb.StepBatchRequest,  # type: ignore[override]
        context: grpc.aio.ServicerContext,
    ) -> pb.StepBatchResponse:
        return _answer_batch(request)


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SeqServeServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
