"""A bare grpc.aio server speaking seqserve's Stream/Step with a canned answer: the transport's
ceiling, for comparison in the same run. ``python bench/echo_server.py PORT``"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix

PROBS = to_matrix(np.full((1, 4), 0.25, np.float32))


def _answer(request: pb.StepRequest) -> pb.StepResponse:
    rows = request.frames.rows or 1
    return pb.StepResponse(session_id=request.session_id, position=request.position,
                           frames=rows, probabilities=PROBS, top_class=[0],
                           next_position=request.position + rows, tag=request.tag)


class Echo(pb_grpc.SeqServeServicer):
    async def Stream(self, request_iterator, context):  # type: ignore[override]
        async for request in request_iterator:
            yield _answer(request)

    async def Step(self, request, context):  # type: ignore[override]
        return _answer(request)


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SeqServeServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
