"""Model rollout without a failed request: load a new artifact beside the serving one, check it,
swap it in between two batches.

``ModelReloader.prepare`` runs on a worker thread: it loads the artifact folder, refuses one that
is broken or that does not fit what is serving (another feature schema: the resolver, the router's
features and the index were built for this one), builds the full path exactly as serve does
(``serving.assembly.full_scorer``: same precision choices) and scores one real request with it.
Only then does the caller swap it in on the event loop (``Pipeline.swap_full_model``); until
then, and whenever ``prepare`` raises, the old model serves every request. The router and the
tracker are not touched: what they learnt survives the swap.

Memory: the new tables exist beside the old ones only between the load and the swap, and the old
scorer is closed after its last batch; ``prepare`` reports the process's resident memory before
and its peak during the load (Linux ``VmHWM``, reset first through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlrm.artifact import is_complete, load_artifact
from serving.assembly import full_scorer
from serving.assets import ServingAssets
from serving.config import ServeConfig
from serving.domain import Candidates, Query
from serving.errors import InvalidArgument
from serving.features import FeatureResolver
from serving.scoring import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A loaded, checked model, ready to swap in."""

    scorer: Scorer
    version: str
    model_dir: Path
    load_s: float
    steady_rss_bytes: int
    peak_rss_bytes: int


class ModelReloader:
    """Prepares new versions of the full path's model for one pipeline (one at a time)."""

    def __init__(self, assets: ServingAssets, config: ServeConfig, resolver: FeatureResolver) -> None:
        self.assets = assets
        self.config = config
        # The request the check score runs on: user 0 on the first surface.
        self.probe = resolver.resolve(Query("reload-check", 0, assets.catalog.surfaces[0], {}, {}))
        self._one_at_a_time = threading.Lock()

    def prepare(self, model_dir: Path | None) -> Prepared:
        """Load and check ``model_dir`` (None: the folder now served, read again)."""
        folder = Path(model_dir) if model_dir is not None else self.assets.model.path
        if not self._one_at_a_time.acquire(blocking=False):
            raise InvalidArgument("model_dir", "a reload is already in progress")
        try:
            started = time.perf_counter()
            steady = _reset_peak_rss()
            if self.config.item_store is not None:
                raise InvalidArgument(
                    "model_dir", "the item tier serves the old model's rows: push the new rows and restart"
                )
            if not folder.is_dir() or not is_complete(folder):
                raise InvalidArgument("model_dir", f"{folder} holds no complete model artifact")
            try:
                model = load_artifact(folder)
                if model.schema != self.assets.model.schema:
                    raise InvalidArgument(
                        "model_dir",
                        f"{folder}: feature schema {model.schema.name!r} differs from the served one",
                    )
                assets = dataclasses.replace(self.assets, model=model)
                scoring = self.config.scoring
                scorer = full_scorer(
                    assets,
                    precision=scoring.precision,
                    mlp_precision=scoring.mlp_precision,
                    threads=scoring.model_threads,
                )
                self._check(scorer, folder)
            except InvalidArgument:
                raise
            except Exception as exc:  # a truncated file, a state dict of another shape, ...
                raise InvalidArgument(
                    "model_dir", f"cannot load {folder}: {type(exc).__name__}: {exc}"
                ) from exc
            self.assets = assets
            return Prepared(
                scorer, model.version, folder, time.perf_counter() - started, steady, _peak_rss(steady)
            )
        finally:
            self._one_at_a_time.release()

    def _check(self, scorer: Scorer, folder: Path) -> None:
        n = min(50, len(self.assets.catalog.item_vectors))
        candidates = Candidates(np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.float32))
        scores = scorer.score_batch([self.probe], [candidates])[0]
        if scores.shape != (n,) or not np.all(np.isfinite(scores)):
            scorer.close()
            raise InvalidArgument("model_dir", f"{folder}: the check score is not {n} finite numbers")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> int:
    """Resident bytes now, after resetting the kernel's peak (``VmHWM``) to it where allowed."""
    # Not Linux, or not allowed: the peak then covers the process's whole life.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") if Path("/proc/self/status").exists() else 0


def _peak_rss(steady: int) -> int:
    return max(_status_kib("VmHWM"), steady) if Path("/proc/self/status").exists() else steady
