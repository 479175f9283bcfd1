"""The ``seqserve-route`` header a front proxy hashes on to keep a session on one replica.

A session's state lives in one server process, so every call about it must reach the same
replica. Unary session calls carry the session id as their route key; a ``Multiplexer`` carries
one random key of its own, kept across reconnects, so all the sessions on it stay together
(their ``OpenSession``/``CloseSession`` carry the stream's key too). Calls about no session
(``Predict``, ``GetModel``, health) carry none: any replica answers them.
"""

from __future__ import annotations

import secrets

__all__ = ["ROUTE_HEADER", "check_route", "new_route", "route_metadata"]

ROUTE_HEADER = "seqserve-route"
_MAX_ROUTE = 256


def new_route() -> str:
    """A fresh random route key (128 bits, hex)."""
    return secrets.token_hex(16)


def check_route(key: str) -> str:
    """``key`` if it can travel as the header's value, else ValueError."""
    if not (
        0 < len(key) <= _MAX_ROUTE and key.isascii() and key.isprintable() and key == key.strip()
    ):
        raise ValueError(
            f"route key must be 1-{_MAX_ROUTE} printable ASCII characters without "
            f"leading or trailing spaces, not {key!r}"
        )
    return key


def route_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call by ``key``; none for an empty key or one that cannot be a
    header value (a malformed session id is then refused by whichever replica gets it)."""
    if not key:
        return ()
    try:
        return ((ROUTE_HEADER, check_route(key)),)
    except ValueError:
        return ()
