"""A stepped ramp for loadtests/locustfile.py: up to a peak in equal steps, hold, then stop.

Active only when this file is passed beside the locustfile (a shape class in the loaded files takes
over `--users`, `--spawn-rate` and `--run-time`):

    .venv/bin/locust -f loadtests/locustfile.py,loadtests/ramp_shape.py --headless --host http://127.0.0.1:8000

Over LOADTEST_RAMP_SECONDS the target user count climbs in LOADTEST_RAMP_STEPS equal steps (step k of
n holds ceil(peak * k / n) users), then LOADTEST_PEAK_USERS are held for LOADTEST_HOLD_SECONDS and
the test stops. Users start at LOADTEST_SPAWN_RATE per second within each step.

Environment variables (all optional):

    LOADTEST_PEAK_USERS     8     users at the peak
    LOADTEST_RAMP_SECONDS   60    duration of the ramp (0: start at the peak)
    LOADTEST_RAMP_STEPS     3     steps of the ramp (at most the peak)
    LOADTEST_HOLD_SECONDS   60    duration at the peak
    LOADTEST_SPAWN_RATE     2     users started (or stopped) per second
"""

from __future__ import annotations

import math
import os

from locust import LoadTestShape


def env_number(name: str, default: float, kind: type, low: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = kind(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < low:
        raise ValueError(f"{name}={value} is below {low}")
    return value


class RampShape(LoadTestShape):
    """Stepped ramp to LOADTEST_PEAK_USERS, hold, stop (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_users = int(env_number("LOADTEST_PEAK_USERS", 8, int, 1))
        self.ramp_seconds = env_number("LOADTEST_RAMP_SECONDS", 60.0, float, 0.0)
        self.ramp_steps = min(int(env_number("LOADTEST_RAMP_STEPS", 3, int, 1)), self.peak_users)
        self.hold_seconds = env_number("LOADTEST_HOLD_SECONDS", 60.0, float, 0.0)
        self.spawn_rate = env_number("LOADTEST_SPAWN_RATE", 2.0, float, 0.001)

    def users_at(self, seconds: float) -> int | None:
        """The target user count `seconds` into the test; None once the hold is over."""
        if seconds >= self.ramp_seconds + self.hold_seconds:
            return None
        if seconds >= self.ramp_seconds:
            return self.peak_users
        step = math.floor(seconds / (self.ramp_seconds / self.ramp_steps)) + 1
        return math.ceil(self.peak_users * step / self.ramp_steps)

    def tick(self) -> tuple[int, float] | None:
        users = self.users_at(self.get_run_time())
        return None if users is None else (users, self.spawn_rate)
