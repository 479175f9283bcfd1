"""The least a stateful Python server must do per message: a bare grpc.aio ``Stream`` that keeps
each session's states in a dict and runs the model's step graph, one message at a time, right in
the handler (batch 1, no batching, no positions, no metrics, no checks).

    python -P bench/floor_server.py PORT MODEL_DIR

Not a server to use: it answers wrong positions, never forgets a session and trusts every frame.
It is the floor seqserve's one-frame-per-message runs are compared with in the same run: the
transport (the echo server's cost) plus one onnxruntime step per message, with nothing else.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix
from seqserve.server.model import load_model_spec
from seqserve.server.runtime import Runtime, States


class Floor(pb_grpc.SeqServeServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.states: dict[str, States] = {}
        self.features = runtime.spec.features

    async def Stream(
        self,
        request_iterator: AsyncIterator[pb.StepRequest],  # type: ignore[override]
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StepResponse]:
        runtime, states = self.runtime, self.states
        async for request in request_iterator:
            sid = request.session_id
            frames = np.frombuffer(request.frames.data, "<f4").reshape(-1, self.features)
            held = states.get(sid)
            if held is None:
                held = runtime.zero_states(1)
            probs, states[sid] = runtime.step(frames[:1], held)
            yield pb.StepResponse(
                session_id=sid,
                position=request.position,
                frames=1,
                probabilities=to_matrix(probs),
                top_class=[int(probs[0].argmax())],
                next_position=request.position + 1,
                tag=request.tag,
            )


async def main(port: int, model_dir: Path) -> None:
    runtime = Runtime(load_model_spec(model_dir))
    server = grpc.aio.server()
    pb_grpc.add_SeqServeServicer_to_server(Floor(runtime), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
