"""A clock a test sets by hand: pass it where code takes `clock: Callable[[], float]`."""

from __future__ import annotations


class ManualClock:
    """Returns `now` until the test changes it (`now = …` or `advance(seconds)`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
