"""Stop requests (soft.training.signals): what each signal does, without a job around it."""

from __future__ import annotations

import signal
import time

import pytest

from soft.training import signals


@pytest.fixture
def stop(monkeypatch):
    gave_up: list[str] = []
    request = signals.StopRequest()
    monkeypatch.setattr(request, "_give_up", lambda signum, why: gave_up.append(why or "deadline"))
    request.gave_up = gave_up
    yield request
    request.restore()


def test_one_ctrl_c_delivered_twice_is_one_request(stop):
    """The terminal's SIGINT and torchrun's forwarded copy arrive together: stop after the
    step, do not give up."""
    stop._received(signal.SIGINT)
    stop._received(signal.SIGINT)
    assert stop.received == signal.SIGINT and stop.gave_up == []


def test_a_second_ctrl_c_later_gives_up_at_once(stop, monkeypatch):
    stop._received(signal.SIGINT)
    later = time.monotonic() + signals.REPEAT_WINDOW_S + 0.5
    monkeypatch.setattr(signals.time, "monotonic", lambda: later)
    stop._received(signal.SIGINT)
    assert stop.gave_up == ["a second SIGINT"]


def test_sigusr1_has_no_deadline_and_sigterm_has_one(stop):
    stop._received(signal.SIGUSR1)
    assert stop._timer is None
    stop.observed(10.0)
    assert stop.grace_s == signals.GRACE_FACTOR * 10.0
    stop._received(signal.SIGTERM)
    assert stop._timer is not None and stop._timer.interval == 30.0


def test_a_real_signal_reaches_the_watcher_thread(stop):
    """Through set_wakeup_fd: the main thread need not run Python for the request to count."""
    signal.raise_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while stop.received is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop.received == signal.SIGUSR1
