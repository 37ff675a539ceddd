"""The fallback tier: an answer that needs no retrieval and no model, for when nothing else is in time.

Per segment (surface x tier) it keeps the items that were worth most to show lately. Every
slate the full or cheap path serves adds its items' click probabilities to the segment's
decaying sums (``observe``: an append, cheap enough for the event loop); a refresh off the loop
(``refresh``, every few seconds) turns the sums into the segment's list, best expected value
(``P(click) x price``, as ``serving.ranking``) first. An item's probability is shrunk towards the
seed's by a few pseudo-observations, so one lucky showing does not put it on top.

Before a segment has been served it gets the list of all segments together; before anything
has been served, the seed: every item's click probability for the average user
(``sigmoid(<mean user vector, item vector>)``, the cheap path's score) times its price.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from embeddings.clock import Clock, MonotonicClock
from serving.ranking import ranking_keys, retrieval_probs, top_k

ALL_SEGMENTS = "*"
"""Key of the list over every segment: what a segment gets before it has been served."""


@dataclass(frozen=True)
class FallbackSlate:
    item_ids: np.ndarray
    """int64 item ids, best first."""
    probs: np.ndarray
    """Each item's estimated click probability in the segment."""
    keys: np.ndarray
    """Each item's expected value, ``probs x price`` (``probs`` without prices)."""


class FallbackSlates:
    def __init__(
        self,
        seed_probs: np.ndarray,
        item_values: np.ndarray | None,
        *,
        per_segment: int = 200,
        half_life_s: float = 300.0,
        prior_weight: float = 3.0,
        max_segments: int = 256,
        clock: Clock | None = None,
    ) -> None:
        """``seed_probs``: every item's click probability before any traffic; ``item_values``:
        what a click on each item earns (None: rank by probability); ``per_segment``: items kept
        per segment (the largest k it can answer); ``prior_weight``: showings the seed counts as."""
        if per_segment < 1 or half_life_s <= 0 or prior_weight <= 0:
            raise ValueError(f"{per_segment=} must be >= 1, {half_life_s=} and {prior_weight=} > 0")
        self.seed_probs = np.asarray(seed_probs, dtype=np.float64)
        self.item_values = item_values
        self.per_segment = per_segment
        self.half_life_s = half_life_s
        self.prior_weight = prior_weight
        self.max_segments = max_segments
        self.clock = clock or MonotonicClock()
        self._pending: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # segment -> (prob sums, counts)
        self._refreshed_at = self.clock.now()
        self._refresh_lock = threading.Lock()
        self.refreshes = 0
        self._slates: dict[str, FallbackSlate] = {ALL_SEGMENTS: self._best(np.zeros(0), np.zeros(0))}

    @classmethod
    def seeded(
        cls,
        user_vectors: np.ndarray,
        item_vectors: np.ndarray,
        item_values: np.ndarray | None,
        **kwargs: object,
    ) -> FallbackSlates:
        """Seeded with the cheap path's probabilities for the average user."""
        mean_user = np.asarray(user_vectors, dtype=np.float64).mean(axis=0)
        seed = retrieval_probs(np.asarray(item_vectors, dtype=np.float64) @ mean_user)
        return cls(seed, item_values, **kwargs)  # type: ignore[arg-type]

    def observe(self, segment: str, item_ids: np.ndarray, probs: np.ndarray) -> None:
        """A served slate's items and their click probabilities (any thread; O(1))."""
        self._pending.append((segment, item_ids, probs))  # list.append is atomic: no lock here

    def slate(self, segment: str, k: int) -> FallbackSlate:
        """The segment's top ``k`` (fewer when it keeps fewer)."""
        best = self._slates.get(segment) or self._slates[ALL_SEGMENTS]
        return FallbackSlate(best.item_ids[:k], best.probs[:k], best.keys[:k])

    def refresh(self) -> None:
        """Fold the slates observed since the last refresh into the lists (run off the event loop)."""
        with self._refresh_lock:
            pending, self._pending = self._pending, []
            now = self.clock.now()
            fade = 0.5 ** ((now - self._refreshed_at) / self.half_life_s)
            self._refreshed_at = now
            touched = {ALL_SEGMENTS}
            for sums, counts in self._sums.values():
                sums *= fade
                counts *= fade
            for segment, ids, probs in pending:
                for key in (segment, ALL_SEGMENTS):
                    cell = self._cell(key)
                    if cell is None:
                        continue
                    np.add.at(cell[0], ids, probs)
                    np.add.at(cell[1], ids, 1.0)
                    touched.add(key)
            slates = dict(self._slates)
            for key in touched:
                sums, counts = self._sums.get(key, (np.zeros(0), np.zeros(0)))
                slates[key] = self._best(sums, counts)
            self._slates = slates  # one reference swap: readers see the old or the new lists
            self.refreshes += 1

    def _cell(self, segment: str) -> tuple[np.ndarray, np.ndarray] | None:
        cell = self._sums.get(segment)
        if cell is None:
            if len(self._sums) >= self.max_segments:
                return None  # more segments than we keep lists for: they get the global list
            n = len(self.seed_probs)
            cell = self._sums[segment] = (np.zeros(n), np.zeros(n))
        return cell

    def _best(self, sums: np.ndarray, counts: np.ndarray) -> FallbackSlate:
        probs = self.seed_probs
        if len(sums):
            probs = (sums + self.prior_weight * self.seed_probs) / (counts + self.prior_weight)
        keys = ranking_keys(probs, self.item_values)
        top = top_k(keys, self.per_segment)
        return FallbackSlate(top.astype(np.int64), probs[top], keys[top])

    def stats(self) -> dict[str, object]:
        return {"segments": len(self._sums), "refreshes": self.refreshes, "pending": len(self._pending)}
