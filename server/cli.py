"""The ``seqserve-server`` command: settings from flags and ``SEQSERVE_*`` variables, logging,
then one server in this process (``app.run_forever``) or several worker processes sharing the
port (``workers.run_workers``). Its own module so that neither of those imports the other's
caller: workers run ``app``, and ``app`` knows nothing of workers."""

from __future__ import annotations

from collections.abc import Sequence

from .app import configure_logging, run_forever
from .settings import parse_settings
from .workers import run_workers

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings)
    if settings.workers > 1:
        return run_workers(settings)
    return run_forever(settings)
