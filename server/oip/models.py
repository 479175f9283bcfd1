"""Which model and version a protocol request goes to: the seam between the Open Inference
Protocol fronts and the server's models (``Models``).

Protocol versions are strings: "" (or "-1") means the latest ready version, anything else a
version number. Model states are Triton's: READY, LOADING, UNLOADING (a draining version: it
still serves the sequences pinned to it) and UNAVAILABLE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..engine import Engine
from ..errors import BadRequest, SeqServeError, UnknownModel, VersionUnavailable
from ..model import ModelSpec
from ..models import Models

__all__ = ["ModelEntry", "ModelIndex", "ModelNotFound", "ModelUnavailable", "RepositoryError"]

State = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]
_STATES: dict[str, State] = {
    "ready": "READY",
    "loading": "LOADING",
    "draining": "UNLOADING",
    "unavailable": "UNAVAILABLE",
}

# The protocol fronts' names for the errors they answer (NOT_FOUND / UNAVAILABLE).
ModelNotFound = UnknownModel
ModelUnavailable = VersionUnavailable


class RepositoryError(SeqServeError):
    """A repository request this server cannot carry out."""

    reason = "repository"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    version: str
    state: State
    reason: str = ""


def version_number(version: str) -> int:
    """A protocol version string as a number (0: the latest ready version)."""
    if version in ("", "-1"):
        return 0
    if not version.isdigit() or int(version) < 1:
        raise UnknownModel(
            f"model version {version!r}: versions are positive integers", reason="unknown_version"
        )
    return int(version)


class ModelIndex:
    """The models this server serves, as the protocol fronts see them."""

    def __init__(self, models: Models) -> None:
        self.models = models

    def resolve(self, name: str, version: str = "") -> tuple[Engine, ModelSpec]:
        """The engine of ``name`` at ``version`` ("" or "-1": the latest ready one), for a
        request that names no sequence; UnknownModel / VersionUnavailable otherwise."""
        if not name:
            raise UnknownModel(
                f"no model name given: this server serves {', '.join(sorted(self.models.models))}"
            )
        engine = self.models.model(name).stateless(version_number(version))
        return engine, engine.spec

    def ready(self, name: str, version: str = "") -> bool:
        try:
            engine, _ = self.resolve(name, version)
        except SeqServeError:
            return False
        return not engine.draining and not self.models.draining

    def entries(self) -> list[ModelEntry]:
        draining = self.models.draining
        return [
            ModelEntry(
                info.model,
                str(info.version),
                "UNAVAILABLE" if draining else _STATES[info.state],
                "server is draining" if draining else info.reason,
            )
            for info in self.models.list()
        ]

    async def load(self, name: str, principal: str, has_parameters: bool) -> None:
        if has_parameters:
            raise BadRequest(
                "load parameters (config, files) are not supported: versions are loaded from "
                "the model repository folder as they are",
                reason="bad_parameter",
            )
        await self.models.load(name, 0, principal)

    async def unload(self, name: str, principal: str) -> None:
        await self.models.unload(name, 0, principal)
