"""Triton's sequence parameters, read from a request's parameters as plain Python values.

A request with a ``sequence_id`` is one step of one seqserve session. The id maps to the session
id (one namespace with the native API, which sees and can drive the same session):

- an integer (int64 or uint64 parameter, JSON number) ``n`` -> ``str(n)``; an int64 below zero is
  read as the uint64 of the same bits, as Triton reads it;
- a string -> itself, if it is a valid session id (1-128 characters of ``[A-Za-z0-9._:@-]``);
  any other string is refused (``INVALID_ARGUMENT``, reason ``bad_session_id``).

0 and "" mean "no sequence". ``sequence_position`` (seqserve's extension) gives the position of
the request's first frame, with the native API's exactly-once semantics; without it, frames are
appended in the order requests arrive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BadRequest, SeqServeError
from ..sessions import check_session_id

__all__ = ["ParamValue", "SequenceStep", "read_sequence"]

ParamValue = bool | int | float | str
_U64 = (1 << 64) - 1
_KNOWN = frozenset({"sequence_id", "sequence_start", "sequence_end", "sequence_position"})


@dataclass(slots=True)  # not frozen: built for every step, and frozen init is slower
class SequenceStep:
    session_id: str
    position: int | None  # None: append
    start: bool
    end: bool
    shown: str  # the id as the client gave it, for messages


def _flag(params: Mapping[str, ParamValue], key: str) -> bool:
    value = params.get(key, False)
    if value is not True and value is not False:
        raise BadRequest(f"parameter {key} must be a bool, not {value!r}", reason="bad_parameter")
    return value


def _session_id(value: ParamValue) -> tuple[str, str] | None:
    if type(value) is str and value:
        try:
            return check_session_id(value), repr(value)
        except SeqServeError as exc:
            raise BadRequest(
                f"sequence_id: {exc} (seqserve uses a string id as the session id)",
                reason="bad_session_id",
            ) from None
    if isinstance(value, bool | float):
        raise BadRequest(
            f"parameter sequence_id must be an integer or a string, not {value!r}",
            reason="bad_parameter",
        )
    if isinstance(value, int):
        if value > _U64 or value < -(1 << 63):
            raise BadRequest(
                f"parameter sequence_id {value} does not fit 64 bits", reason="bad_parameter"
            )
        number = value & _U64
        return (str(number), str(number)) if number else None
    return None  # "": no sequence


def read_sequence(params: Mapping[str, ParamValue]) -> SequenceStep | None:
    """The request's sequence, or None for a stateless request; BadRequest for parameters that
    do not make sense together."""
    if not params:
        return None
    for key in params:
        if key not in _KNOWN and key.startswith("sequence_"):
            raise BadRequest(
                f"unknown parameter {key!r} (sequence parameters: {', '.join(sorted(_KNOWN))})",
                reason="bad_parameter",
            )
    raw = params.get("sequence_id", 0)
    found = _session_id(raw)
    start, end = _flag(params, "sequence_start"), _flag(params, "sequence_end")
    position = params.get("sequence_position")
    if found is None:
        if start or end or position is not None:
            raise BadRequest(
                "sequence_start, sequence_end and sequence_position need a sequence_id",
                reason="bad_parameter",
            )
        return None
    if position is not None and (
        isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= _U64
    ):
        raise BadRequest(
            f"parameter sequence_position must be an integer >= 0, not {position!r}",
            reason="bad_parameter",
        )
    session_id, shown = found
    return SequenceStep(session_id, position, start, end, shown)
