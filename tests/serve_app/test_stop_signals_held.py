"""``stop_signals_held``: a stop signal while Ray starts waits until Ray is up, then stops the process."""

from __future__ import annotations

import os
import signal

import pytest
from ray._private import utils

from serve_app.ray_internals import stop_signals_held


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_inside_is_held_until_the_block_ends(sig: int) -> None:
    before = signal.getsignal(sig)
    reached_end = False
    with pytest.raises(KeyboardInterrupt), stop_signals_held():
        os.kill(os.getpid(), sig)
        reached_end = True
    assert reached_end and signal.getsignal(sig) is before


def test_ray_init_cannot_replace_the_handlers_inside() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_held():
        utils.set_sigterm_handler(lambda signum, frame: None)  # what ray.init calls
        inside = signal.getsignal(signal.SIGTERM)
    assert inside is not before and signal.getsignal(signal.SIGTERM) is before
    assert utils.set_sigterm_handler.__name__ == "set_sigterm_handler"  # Ray's own again


def test_no_signal_no_interrupt() -> None:
    with stop_signals_held():
        pass
