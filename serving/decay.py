"""Exponential decay over clock time: the one definition the revenue tracker's windows and the
router's statistics share, so that a half-life means the same thing in both."""

from __future__ import annotations


def decay(value: float, age_s: float, half_life_s: float) -> float:
    """``value`` after ``age_s`` seconds of exponential decay; a negative age (a clock that went
    back, or a replica's clock behind another's) does not inflate it."""
    return value * 2.0 ** (-age_s / half_life_s) if age_s > 0 else value


class DecayingSums:
    """Named sums that halve every ``half_life_s`` of clock time."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self.values: dict[str, float] = {}
        self._at: float | None = None

    def add(self, now: float, **amounts: float) -> None:
        self.decay_to(now)
        for key, amount in amounts.items():
            self.values[key] = self.values.get(key, 0.0) + amount

    def decay_to(self, now: float) -> None:
        if self._at is not None and now > self._at:
            factor = decay(1.0, now - self._at, self.half_life_s)
            for key in self.values:
                self.values[key] *= factor
        self._at = now if self._at is None else max(self._at, now)

    def get(self, key: str) -> float:
        return self.values.get(key, 0.0)
