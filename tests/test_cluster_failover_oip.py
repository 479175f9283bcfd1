"""Failover through the Open Inference Protocol: a stock tritonclient ``ModelStreamInfer`` client
sending ``sequence_position`` streams sequences through nginx (deploy/nginx/seqserve.conf) to two
replicas sharing a redis-server (checkpoint every frame, K = 1); the replica holding them is
killed with SIGKILL while requests are in flight. The client starts a new stream (same route
key, so nginx sends it to the survivor) and resends what was not answered, by position. The
survivor claims the sessions from Redis: 0 frames lost, 0 applied twice, outputs identical to an
uninterrupted run."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from helpers import solo_run, store_key

grpcclient = pytest.importorskip("tritonclient.grpc")

SEQUENCES, FRAMES, KILL_AT = 8, 40, 17
ROUTE = {"seqserve-route": "oip-failover"}  # one key: the whole stream on one replica


class _Client:
    """Sends frame t of every sequence, waits for the answers, and on a broken stream opens a
    new one and resends every unanswered request with its position."""

    def __init__(self, target: str, xs: list[np.ndarray]) -> None:
        self.client = grpcclient.InferenceServerClient(target)
        self.xs = xs
        self.out: dict[tuple[int, int], np.ndarray] = {}
        self.pending: set[tuple[int, int]] = set()
        self.broken = False
        self.resent = 0
        self.restarts = 0
        self.replayed = 0
        self.cond = threading.Condition()
        self.client.start_stream(callback=self._answer, headers=ROUTE)

    def _answer(self, result: Any, error: Any) -> None:
        with self.cond:
            if error is not None:
                self.broken = True  # a dropped stream, or an answer we cannot use: resend
            else:
                response = result.get_response()
                i, t = (int(v) for v in response.id.split(":"))
                self.out[(i, t)] = result.as_numpy("probabilities")[0, 0]
                self.replayed += response.parameters["sequence_replayed"].bool_param
                self.pending.discard((i, t))
            self.cond.notify_all()

    def send(self, i: int, t: int) -> None:
        self.client.async_stream_infer(
            "basicmotions",
            [_frame(self.xs[i][t : t + 1])],
            request_id=f"{i}:{t}",
            sequence_id=f"oipfo-{i}",
            sequence_start=t == 0,
            parameters={"sequence_position": t},
        )

    def step(self, t: int, on_sent: Any = None) -> None:
        with self.cond:
            self.pending |= {(i, t) for i in range(len(self.xs))}
        for i in range(len(self.xs)):
            self.send(i, t)
        if on_sent is not None:
            on_sent()
        deadline = time.monotonic() + 60
        while True:
            with self.cond:
                self.cond.wait_for(lambda: not self.pending or self.broken, 1.0)
                if not self.pending:
                    return
                broken, self.broken = self.broken, False
                left = sorted(self.pending)
            assert time.monotonic() < deadline, f"unanswered: {left}"
            if broken:
                time.sleep(0.2)  # let nginx see the replica gone
                self.client.stop_stream(cancel_requests=True)
                self.client.start_stream(callback=self._answer, headers=ROUTE)
                self.restarts += 1
                for i, at in left:
                    self.send(i, at)
                    self.resent += 1

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def _frame(x: np.ndarray) -> Any:
    tensor = grpcclient.InferInput("frames", [1, *x.shape], "FP32")
    tensor.set_data_from_numpy(x[None].astype(np.float32))
    return tensor


def test_k1_stream_client_survives_a_kill_9_with_nothing_lost_or_doubled(
    cluster, samples, model_dir
):
    c = cluster(
        replicas=2,
        redis=True,
        args=("--store", "{redis}", "--replica-id", "{name}", "--checkpoint-every", "1"),
    )
    xs = [samples["x"][i % len(samples["x"])][:FRAMES] for i in range(SEQUENCES)]
    client = _Client(c.front.target, xs)
    victim: list[Any] = []

    def kill() -> None:  # right after frame KILL_AT was sent: those requests are in flight
        owner = c.redis.command("HGET", store_key("oipfo-0"), "h")
        assert isinstance(owner, bytes), owner
        victim.append(c.replica(owner.decode().rpartition("|")[0]))
        victim[0].kill()

    try:
        for t in range(FRAMES):
            client.step(t, kill if t == KILL_AT else None)
    finally:
        client.close()
    assert victim and client.restarts >= 1 and client.resent >= 1
    survivor = next(r for r in c.replicas if r is not victim[0])
    for i in range(SEQUENCES):
        got = np.stack([client.out[(i, t)] for t in range(FRAMES)])
        assert np.abs(got - solo_run(model_dir, xs[i])).max() <= 1e-5, f"sequence {i}"
        # Every frame applied exactly once: the store's head is the frame count.
        head = c.redis.command("HGET", store_key(f"oipfo-{i}"), "h")
        assert isinstance(head, bytes) and head.decode() == f"{survivor.name}|{FRAMES}"
    assert survivor.metric("seqserve_session_events_total", event="claimed") == SEQUENCES
    print(
        f"OIP failover K=1: {SEQUENCES} sequences x {FRAMES} frames, {client.resent} requests "
        f"resent after the kill ({client.replayed} answered from the replay window), 0 lost, "
        "0 doubled"
    )
