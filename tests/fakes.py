"""Test doubles shared by the unit tests."""


class FakeClock:
    """A monotonic clock the test moves by hand: `clock.now += 1.5`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
