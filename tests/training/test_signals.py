"""Stop requests (soft.training.signals): what each signal does, without a job around it."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from soft.training import signals


class Clock:
    """Stands in for time.monotonic, moved by hand."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(signals.time, "monotonic", c)
    return c


@pytest.fixture
def stop(monkeypatch):
    gave_up: list[str] = []
    done = threading.Event()

    def give_up(signum, why):
        gave_up.append(why)
        done.set()

    request = signals.StopRequest()
    monkeypatch.setattr(request, "_give_up", give_up)
    monkeypatch.setattr(request, "_leave_now", lambda signum: gave_up.append("left after settled"))
    request.gave_up = gave_up
    request.gave_up_event = done
    yield request
    request.close()


def test_one_stop_request_delivered_twice_is_one_request(stop, clock):
    """scancel signals the workers and torchrun forwards it: both arrive together. Stop after
    the step, do not give up."""
    stop._received(signal.SIGTERM)
    clock.now += signals.REPEAT_WINDOW_S / 2
    stop._received(signal.SIGTERM)
    assert stop.received == signal.SIGTERM and stop.gave_up == []


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_stop_signal_later_gives_up_at_once(stop, clock, second):
    """The terminal's second Ctrl-C reaches only torchrun, which sends its workers SIGTERM
    after the SIGINT it forwarded for the first: either signal, later, gives up at once."""
    stop._received(signal.SIGINT)
    clock.now += signals.REPEAT_WINDOW_S + 2
    stop._received(second)
    assert stop.gave_up == [f"a second stop signal ({second.name}, 3 s after SIGINT)"]


def test_a_second_signal_after_the_checkpoint_leaves_without_cleanups(stop, clock):
    stop._received(signal.SIGTERM)
    stop.settled()
    clock.now += signals.REPEAT_WINDOW_S + 1
    stop._received(signal.SIGINT)
    assert stop.gave_up == ["left after settled"]


def test_sigusr1_has_no_deadline_and_sigterm_has_one(stop):
    stop._received(signal.SIGUSR1)
    assert not stop._armed
    stop.observed(10.0)
    assert stop.grace_s == signals.GRACE_FACTOR * 10.0
    before = time.monotonic()
    stop._received(signal.SIGTERM)
    assert before + 30.0 <= stop._deadline <= time.monotonic() + 30.0


def test_the_deadline_restarts_with_progress_and_ends_when_settled(stop, monkeypatch):
    """Progress (a finished step, the save starting) restarts the grace: only a rank held in
    one place gives up. Once the checkpoint is complete there is no deadline at all (closing
    MLflow and drawing its plot may take longer than the grace)."""
    monkeypatch.setattr(signals, "MIN_GRACE_S", 0.3)
    stop._received(signal.SIGTERM)
    for _ in range(4):  # 4 x 0.2 s > the grace, but progress every 0.2 s
        time.sleep(0.2)
        stop.now_doing("saving the checkpoint of step 22")
    assert stop.gave_up == []
    stop.now_doing("recording the failure", waits_on_peers=False)  # no peer can hold this
    time.sleep(0.6)
    assert stop.gave_up == []
    stop.now_doing("leaving (tearing down the process groups)")
    stop.settled()
    time.sleep(0.6)
    assert stop.gave_up == []


def test_a_rank_held_in_one_place_gives_up_and_says_where(stop, monkeypatch):
    monkeypatch.setattr(signals, "MIN_GRACE_S", 0.2)
    stop.explain_peers_with(lambda: "rank 1 (pid 7 on h) is stopped")
    stop.now_doing("agreeing whether to stop after step 12")
    stop._received(signal.SIGTERM)
    assert stop.gave_up_event.wait(10)
    (why,) = stop.gave_up
    assert why.startswith("no progress for 0 s while agreeing whether to stop after step 12")
    assert why.endswith("; rank 1 (pid 7 on h) is stopped")


def test_a_real_signal_reaches_the_watcher_thread(stop):
    """Through set_wakeup_fd: the main thread need not run Python for the request to count."""
    signal.raise_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while stop.received is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop.received == signal.SIGUSR1
