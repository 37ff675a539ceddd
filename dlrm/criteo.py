"""Reader for raw Criteo TSV (the Display Advertising Challenge format), and its vocabulary.

One row per line, 40 TAB-separated fields: ``label``, ``I1..I13`` (integer counts) and
``C1..C26`` (hashed categoricals, 8 hex digits). Any field but the label may be empty.
Malformed rows (wrong field count, bytes that are not UTF-8, a label that is not 0/1, a count
that is not a decimal integer, a categorical that is not 1-8 hex digits) are skipped, counted
by reason and reported, never fatal. Blank lines are counted apart, not as rows.

Categorical ids come out raw (``hex + 1``; 0 = empty field) or reduced modulo the schema's
table sizes (the hashing trick). On a small file most raw values are seen once or twice: their
embedding rows would only learn noise. ``Vocabulary`` (fitted on the training split only, so
the held-out rows leak nothing) gives each value seen at least ``min_count`` times its own row
and sends all others, and values never seen in training, to one shared row (``OOV_ROW``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.data import Rows
from dlrm.schema import FeatureSchema

N_DENSE = 13
N_SPARSE = 26
N_FIELDS = 1 + N_DENSE + N_SPARSE
MISSING_ID = 0
"""Raw id of an empty categorical (real values are offset by 1)."""
OOV_ROW = 0
"""Table row shared by the values a vocabulary does not keep."""
MAX_COUNT_DIGITS = 18
"""Longer counts are malformed: they fit no int64 and no real log holds them."""
REASONS = ("field_count", "encoding", "label", "dense", "sparse")
"""Every reason a row can be reported malformed for."""

_COUNT = re.compile(rf"-?[0-9]{{1,{MAX_COUNT_DIGITS}}}")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")


@dataclass(frozen=True)
class CriteoConfig:
    holdout: float = 0.2
    """Fraction of the file's rows held out for the test metrics (random, seeded by --seed)."""
    min_count: int = 20
    """A categorical value needs this many training rows for its own embedding row; rarer
    values share one row. 0 hashes raw values modulo the table sizes instead."""

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"{self.holdout=} must be in (0, 1)")
        if self.min_count < 0:
            raise ValueError(f"{self.min_count=} must be >= 0")


@dataclass
class CriteoReport:
    rows_read: int = 0
    """Non-blank lines seen; always ``rows_ok + rows_malformed``."""
    rows_ok: int = 0
    """Rows parsed and kept."""
    blank_lines: int = 0
    """Empty lines, skipped and not counted as rows."""
    malformed: Counter[str] = field(default_factory=Counter)
    """Skipped rows by reason (one of ``REASONS``)."""
    examples: list[str] = field(default_factory=list)
    """The first few malformed lines' reasons with their line numbers."""

    @property
    def rows_malformed(self) -> int:
        return sum(self.malformed.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "rows_read": self.rows_read,
            "rows_ok": self.rows_ok,
            "rows_malformed": self.rows_malformed,
            "blank_lines": self.blank_lines,
            "malformed_by_reason": dict(self.malformed),
        }


class MalformedRow(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def read_criteo(
    path: str | Path,
    schema: FeatureSchema,
    *,
    raw_ids: bool = False,
    limit: int | None = None,
    max_examples: int = 5,
) -> tuple[Rows, CriteoReport]:
    """Read a Criteo TSV file; categorical ids are raw (``raw_ids``) or hashed into the schema."""
    # Binary mode: a line with bytes that are not UTF-8 is reported, not silently replaced.
    with open(path, "rb") as handle:
        return parse_lines(handle, schema, raw_ids=raw_ids, limit=limit, max_examples=max_examples)


def parse_lines(
    lines: Iterable[str | bytes],
    schema: FeatureSchema,
    *,
    raw_ids: bool = False,
    limit: int | None = None,
    max_examples: int = 5,
) -> tuple[Rows, CriteoReport]:
    """Parse lines into rows; malformed ones are counted in the report, never raised."""
    check_schema(schema)
    report = CriteoReport()
    labels: list[int] = []
    dense_rows: list[list[float]] = []
    sparse_rows: list[list[int]] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and report.rows_ok >= limit:
            break
        if _is_blank(line):
            report.blank_lines += 1
            continue
        report.rows_read += 1
        try:
            label, dense, sparse = parse_line(line)
        except MalformedRow as exc:
            report.malformed[exc.reason] += 1
            if len(report.examples) < max_examples:
                report.examples.append(f"line {number}: {exc}")
            continue
        labels.append(label)
        dense_rows.append([dense_transform(x) for x in dense])
        sparse_rows.append([MISSING_ID if v is None else v + 1 for v in sparse])
        report.rows_ok += 1
    rows = Rows(
        dense=np.array(dense_rows, dtype=np.float32).reshape(-1, N_DENSE),
        sparse=np.array(sparse_rows, dtype=np.int64).reshape(-1, N_SPARSE),
        labels=np.array(labels, dtype=np.float32),
    )
    return (rows if raw_ids else hash_ids(rows, schema)), report


def _is_blank(line: str | bytes) -> bool:
    return not (line.rstrip(b"\r\n") if isinstance(line, bytes) else line.rstrip("\r\n"))


def parse_line(line: str | bytes) -> tuple[int, list[int | None], list[int | None]]:
    """Parse one line into (label, 13 counts or None, 26 categorical values or None).

    A trailing ``\\n`` / ``\\r\\n`` is ignored. Raises MalformedRow naming the reason.
    """
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedRow("encoding", f"not UTF-8 at byte {exc.start}") from None
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != N_FIELDS:
        raise MalformedRow("field_count", f"{len(fields)} fields, expected {N_FIELDS}")
    if fields[0] not in ("0", "1"):
        raise MalformedRow("label", f"label {fields[0][:20]!r} is not 0 or 1")
    dense: list[int | None] = []
    for i, text in enumerate(fields[1 : 1 + N_DENSE], start=1):
        if not text:
            dense.append(None)
        elif _COUNT.fullmatch(text):
            dense.append(int(text))
        else:
            raise MalformedRow("dense", f"I{i}={text[:30]!r} is not a decimal integer")
    sparse: list[int | None] = []
    for i, text in enumerate(fields[1 + N_DENSE :], start=1):
        if not text:
            sparse.append(None)
        elif _HEX.fullmatch(text):
            sparse.append(int(text, 16))
        else:
            raise MalformedRow("sparse", f"C{i}={text[:30]!r} is not 1-8 hex digits")
    return int(fields[0]), dense, sparse


def dense_transform(x: int | None) -> float:
    """``log(1 + x)`` for counts; missing and negative counts (I2 has some) map to 0."""
    if x is None or x <= 0:
        return 0.0
    return math.log1p(x)


def check_schema(schema: FeatureSchema) -> None:
    if len(schema.sparse) != N_SPARSE or len(schema.dense) != N_DENSE:
        raise ValueError(
            f"schema {schema.name} has {len(schema.sparse)} sparse / {len(schema.dense)} dense "
            f"features; Criteo needs {N_SPARSE} / {N_DENSE}"
        )


def hash_ids(rows: Rows, schema: FeatureSchema) -> Rows:
    """Raw ids reduced modulo each table's cardinality (the hashing trick)."""
    cards = np.array([f.cardinality for f in schema.sparse], dtype=np.int64)
    return Rows(rows.dense, rows.sparse % cards[None, :], rows.labels)


@dataclass(frozen=True)
class Vocabulary:
    """Raw categorical values that keep their own embedding row, per feature.

    ``kept[j]`` is sorted; value ``kept[j][k]`` maps to row ``k + 1``; anything else to
    ``OOV_ROW``. At most ``cardinality - 1`` values are kept per feature (the most frequent).
    """

    names: tuple[str, ...]
    """Sparse feature names, in schema order."""
    kept: tuple[np.ndarray, ...]
    """Sorted int64 raw values kept per feature."""
    min_count: int
    """Training rows a value needed to be kept."""

    @classmethod
    def fit(cls, rows: Rows, schema: FeatureSchema, min_count: int) -> Vocabulary:
        """Fit on raw-id rows; pass the training split only."""
        check_schema(schema)
        if min_count < 1:
            raise ValueError(f"{min_count=} must be >= 1 for a vocabulary")
        kept = []
        for j, feature in enumerate(schema.sparse):
            values, counts = np.unique(rows.sparse[:, j], return_counts=True)
            frequent = counts >= min_count
            values, counts = values[frequent], counts[frequent]
            # Most frequent first, ties by value, so that capping is deterministic.
            order = np.lexsort((values, -counts))[: feature.cardinality - 1]
            kept.append(np.sort(values[order]).astype(np.int64))
        return cls(tuple(schema.sparse_names), tuple(kept), min_count)

    def encode(self, rows: Rows) -> Rows:
        """Raw-id rows -> table rows (``OOV_ROW`` for values not kept)."""
        out = np.full(rows.sparse.shape, OOV_ROW, dtype=np.int64)
        for j, kept in enumerate(self.kept):
            if len(kept) == 0:
                continue
            col = rows.sparse[:, j]
            pos = np.minimum(np.searchsorted(kept, col), len(kept) - 1)
            hit = kept[pos] == col
            out[hit, j] = pos[hit] + 1
        return Rows(rows.dense, out, rows.labels)

    def oov_share(self, rows: Rows) -> float:
        """Fraction of (row, feature) ids of raw-id ``rows`` that map to ``OOV_ROW``."""
        return float((self.encode(rows).sparse == OOV_ROW).mean()) if len(rows) else 0.0

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = dict(zip(self.names, self.kept, strict=True))
        np.savez(path, min_count=np.int64(self.min_count), **arrays)

    @classmethod
    def load(cls, path: Path, schema: FeatureSchema) -> Vocabulary:
        with np.load(path) as z:
            kept = tuple(np.asarray(z[name], dtype=np.int64) for name in schema.sparse_names)
            return cls(tuple(schema.sparse_names), kept, int(z["min_count"]))
