"""What one message of a lone session costs the server's event loop without the transport: the
servicer's own submit and response, in process, one frame at a time, back to back and with an
idle gap between messages (as a client awaiting each answer leaves one).

    python -P bench/lone.py [--messages 3000] [--gaps 0 0.0003 0.001]

CPU per message (``time.process_time``, the gap itself not counted) and the share of it in
onnxruntime's ``run``. On a VM a gap of a fraction of a millisecond is enough for the caches to
be cold when the next message comes: compare the rows, not the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python -P bench/lone.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto.codec import to_matrix
from seqserve.server import runtime
from seqserve.server.app import create_server
from seqserve.server.settings import Settings


class _Timed:
    """Seconds spent in ``Runtime.step`` (the onnxruntime call and its feeds)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._step = runtime.Runtime.step

    def __enter__(self) -> _Timed:
        step, timed = self._step, self

        def counted(self: runtime.Runtime, *args: object) -> object:
            started = time.process_time()
            try:
                return step(self, *args)  # type: ignore[arg-type]
            finally:
                timed.seconds += time.process_time() - started

        runtime.Runtime.step = counted  # type: ignore[assignment,method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        runtime.Runtime.step = self._step  # type: ignore[method-assign]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.0003, 0.001])
    args = parser.parse_args()
    app, _ = create_server(Settings(port=0, host="127.0.0.1", metrics_port=-1, http_port=-1))
    await app.start()
    servicer = app.servicer
    features = servicer._features("")
    with np.load(Path(__file__).resolve().parent.parent / "models/basicmotions/samples.npz") as f:
        recordings = f["x"].astype(np.float32)
    frames = np.concatenate(list(recordings))[:, :features]
    position = 0

    async def run(count: int, gap: float, session: str) -> None:
        nonlocal position
        for _ in range(count):
            frame = frames[position % len(frames)][None]
            request = pb.StepRequest(
                session_id=session, position=position, frames=to_matrix(frame), start=not position
            )
            started = time.perf_counter()
            future = servicer._submit(request)
            if not future.done():
                await future
            respond, failed = servicer._response, servicer._step_error
            servicer._settled("Stream", respond, failed, request, started, future)
            position += 1
            await asyncio.sleep(gap)

    print("| gap between messages | CPU per message | of it in onnxruntime |")
    print("|---:|---:|---:|")
    for gap in args.gaps:
        position = 0
        session = f"lone-{gap}"
        await run(200, gap, session)  # warm up
        with _Timed() as model:
            cpu = time.process_time()
            await run(args.messages, gap, session)
            cpu = time.process_time() - cpu
        per = cpu / args.messages * 1e6
        print(
            f"| {gap * 1e3:.1f} ms | {per:.0f} µs | {model.seconds / args.messages * 1e6:.0f} µs |"
        )
    await app.stop()


if __name__ == "__main__":
    asyncio.run(main())
