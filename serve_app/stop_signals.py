"""How a long-running partserve process stops: SIGINT and SIGTERM raise ``KeyboardInterrupt``, so the clean-up
in ``finally`` runs (Serve and Ray shut down) whichever of the two arrives."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise ``KeyboardInterrupt`` here, whatever this process inherited: a
    background job of a shell script starts with SIGINT ignored, and ``ray.init`` installs its own SIGTERM
    handler (start Ray inside :func:`serve_app.ray_internals.stop_signals_held`, or call this again after it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def ignore_signals() -> None:
    """While stopping: a second Ctrl-C must not cut the clean-up short and leave Ray processes behind."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
