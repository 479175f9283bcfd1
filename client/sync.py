"""``Client``: the blocking client. A private thread runs an event loop with an ``AsyncClient``,
so the sync and async clients behave the same (one stream, pipelining, resume)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from .aio import DEFAULT_TARGET, LOAD_TIMEOUT, AsyncClient
from .channel import TLS
from .errors import DeadlineExceeded
from .results import (
    BatchPrediction,
    ModelInfo,
    ModelList,
    Prediction,
    SequencePrediction,
    SessionInfo,
)
from .retry import Backoff
from .session import AsyncSession

__all__ = ["Client", "Session"]

T = TypeVar("T")


class _Loop:
    """An event loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="seqserve-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no answer within {timeout}s") from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


class Client:
    """Blocking client with the shape of ``AsyncClient``; use ``with Client(...) as c``.
    ``route`` fixes the route key of the stream its sessions share (default: random)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TLS = None,
        timeout: float | None = None,
        retry: Backoff | None = None,
        window: int = 64,
        options: Sequence[tuple[str, Any]] = (),
        cert: bytes | None = None,
        key: bytes | None = None,
        route: str | None = None,
    ) -> None:
        self._loop = _Loop()

        async def build() -> AsyncClient:
            return AsyncClient(
                target,
                token=token,
                tls=tls,
                timeout=timeout,
                retry=retry,
                window=window,
                options=options,
                cert=cert,
                key=key,
                route=route,
            )

        try:
            self.aio = self._loop.run(build())
        except BaseException:
            self._loop.stop()
            raise
        self.target = target
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._loop.run(self.aio.close(), 10.0)
        self._loop.stop()

    def model(self, model: str = "", *, version: int = 0) -> ModelInfo:
        return self._loop.run(self.aio.model(model, version=version))

    def models(self) -> ModelList:
        """Every model and version on the server (see ``AsyncClient.models``)."""
        return self._loop.run(self.aio.models())

    def load_model(
        self, model: str, version: int = 0, *, timeout: float | None = LOAD_TIMEOUT
    ) -> ModelList:
        """Load from the server's repository (see ``AsyncClient.load_model``)."""
        return self._loop.run(self.aio.load_model(model, version, timeout=timeout))

    def unload_model(self, model: str, version: int = 0) -> ModelList:
        """Drain a model's versions (see ``AsyncClient.unload_model``)."""
        return self._loop.run(self.aio.unload_model(model, version))

    def health(self, service: str = "") -> str:
        return self._loop.run(self.aio.health(service))

    def predict(
        self,
        sequences: Any,
        lengths: Any = None,
        *,
        per_step: bool = False,
        model: str = "",
        version: int = 0,
    ) -> list[SequencePrediction]:
        return self._loop.run(
            self.aio.predict(sequences, lengths, per_step=per_step, model=model, version=version)
        )

    def step(
        self,
        session_id: str,
        frames: Any,
        *,
        position: int,
        start: bool | None = None,
        end: bool = False,
        route: str | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> Prediction:
        """One unary ``Step`` (see ``AsyncClient.step``)."""
        return self._loop.run(
            self.aio.step(
                session_id,
                frames,
                position=position,
                start=start,
                end=end,
                route=route,
                model=model,
                version=version,
            )
        )

    def step_batch(
        self,
        session_ids: Sequence[str],
        frames: Any,
        positions: Sequence[int] | np.ndarray,
        *,
        start: bool = False,
        route: str | None = None,
        model: str = "",
        version: int = 0,
    ) -> BatchPrediction:
        """One frame for each of many sessions (see ``AsyncClient.step_batch``)."""
        return self._loop.run(
            self.aio.step_batch(
                session_ids,
                frames,
                positions,
                start=start,
                route=route,
                model=model,
                version=version,
            )
        )

    def get_session(
        self, session_id: str, *, route: str | None = None, model: str | None = None
    ) -> SessionInfo:
        return self._loop.run(self.aio.get_session(session_id, route=route, model=model))

    def reset_session(
        self, session_id: str, *, route: str | None = None, model: str | None = None
    ) -> SessionInfo:
        return self._loop.run(self.aio.reset_session(session_id, route=route, model=model))

    def close_session(
        self, session_id: str, *, route: str | None = None, model: str | None = None
    ) -> SessionInfo:
        return self._loop.run(self.aio.close_session(session_id, route=route, model=model))

    def open_session(
        self,
        session_id: str | None = None,
        *,
        resume: bool = False,
        model: str = "",
        version: int = 0,
    ) -> Session:
        return Session(
            self._loop,
            self._loop.run(
                self.aio.open_session(session_id, resume=resume, model=model, version=version)
            ),
        )

    @contextlib.contextmanager
    def session(
        self,
        session_id: str | None = None,
        *,
        resume: bool = False,
        model: str = "",
        version: int = 0,
    ) -> Iterator[Session]:
        """``with client.session(model=...) as s:`` (arguments as ``AsyncClient.open_session``)."""
        session = self.open_session(session_id, resume=resume, model=model, version=version)
        try:
            yield session
        finally:
            session.close()


class Session:
    """Blocking view of an ``AsyncSession``."""

    def __init__(self, loop: _Loop, session: AsyncSession) -> None:
        self._loop = loop
        self.aio = session
        self.id = session.id

    def __repr__(self) -> str:
        return f"<Session {self.id!r} position={self.aio.position}>"

    @property
    def position(self) -> int:
        return self.aio.position

    @property
    def model(self) -> str:
        return self.aio.model

    @property
    def version(self) -> int:
        """The model version the session is pinned to (0 until the server has said)."""
        return self.aio.version

    def send(self, frames: Any, *, end: bool = False, timeout: float | None = None) -> Prediction:
        """Apply frames and wait for their probabilities (DeadlineExceeded after ``timeout``)."""
        try:
            return self.send_nowait(frames, end=end).result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(f"session {self.id!r}: no answer within {timeout}s") from None

    def send_nowait(
        self, frames: Any, *, end: bool = False
    ) -> concurrent.futures.Future[Prediction]:
        """Submit without waiting; sends keep their order. ``.result()`` gives the Prediction."""

        async def submit() -> asyncio.Future[Prediction]:
            return self.aio.send_nowait(frames, end=end)

        inner = self._loop.run(submit())
        outer: concurrent.futures.Future[Prediction] = concurrent.futures.Future()

        def copy(done: asyncio.Future[Prediction]) -> None:
            if done.cancelled():
                outer.cancel()
            elif done.exception() is not None:
                outer.set_exception(done.exception())
            else:
                outer.set_result(done.result())

        self._loop.loop.call_soon_threadsafe(inner.add_done_callback, copy)
        return outer

    def flush(self) -> None:
        self._loop.run(self.aio.flush())

    def close(self) -> None:
        self._loop.run(self.aio.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
