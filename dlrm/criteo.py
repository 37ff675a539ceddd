"""Reader for raw Criteo TSV (the Display Advertising Challenge format).

One row per line, 40 TAB-separated fields: ``label``, ``I1..I13`` (integer counts) and
``C1..C26`` (8-hex-digit hashed categoricals). Any field but the label may be empty.
Malformed rows (wrong field count, a label that is not 0/1, a non-integer count, a
categorical that is not hex) are skipped, counted by reason and reported, never fatal.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlrm.data import Rows
from dlrm.schema import FeatureSchema

N_DENSE = 13
N_SPARSE = 26
N_FIELDS = 1 + N_DENSE + N_SPARSE
MISSING_ID = 0
"""Id of an empty categorical before hashing (real values are offset by 1)."""


@dataclass
class CriteoReport:
    rows_read: int = 0
    """Lines seen (non-empty)."""
    rows_ok: int = 0
    """Rows parsed and kept."""
    malformed: Counter[str] = field(default_factory=Counter)
    """Skipped rows by reason."""
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
            "malformed_by_reason": dict(self.malformed),
        }


class MalformedRow(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_line(line: str) -> tuple[int, list[float | None], list[int | None]]:
    """Parse one TSV line into (label, 13 counts or None, 26 hashed ids or None).

    Raises MalformedRow naming the reason.
    """
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != N_FIELDS:
        raise MalformedRow("field_count", f"{len(fields)} fields, expected {N_FIELDS}")
    label_text = fields[0].strip()
    if label_text not in ("0", "1"):
        raise MalformedRow("label", f"label {label_text!r} is not 0 or 1")
    dense: list[float | None] = []
    for i, text in enumerate(fields[1 : 1 + N_DENSE], start=1):
        text = text.strip()
        if not text:
            dense.append(None)
            continue
        try:
            dense.append(float(int(text)))
        except ValueError:
            raise MalformedRow("dense", f"I{i}={text!r} is not an integer") from None
    sparse: list[int | None] = []
    for i, text in enumerate(fields[1 + N_DENSE :], start=1):
        text = text.strip()
        if not text:
            sparse.append(None)
            continue
        try:
            sparse.append(int(text, 16))
        except ValueError:
            raise MalformedRow("sparse", f"C{i}={text!r} is not hexadecimal") from None
    return int(label_text), dense, sparse


def dense_transform(x: float | None) -> float:
    """``log(1 + x)`` for counts; missing and negative counts map to 0."""
    if x is None or x <= 0:
        return 0.0
    return math.log1p(x)


def read_criteo(
    path: str | Path, schema: FeatureSchema, *, limit: int | None = None, max_examples: int = 5
) -> tuple[Rows, CriteoReport]:
    """Read a Criteo TSV file into rows hashed into ``schema``'s table sizes."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return parse_lines(handle, schema, limit=limit, max_examples=max_examples)


def parse_lines(
    lines: Iterable[str], schema: FeatureSchema, *, limit: int | None = None, max_examples: int = 5
) -> tuple[Rows, CriteoReport]:
    if len(schema.sparse) != N_SPARSE or len(schema.dense) != N_DENSE:
        raise ValueError(
            f"schema {schema.name} has {len(schema.sparse)} sparse / {len(schema.dense)} dense "
            f"features; Criteo needs {N_SPARSE} / {N_DENSE}"
        )
    cards = np.array([f.cardinality for f in schema.sparse], dtype=np.int64)
    report = CriteoReport()
    labels: list[int] = []
    dense_rows: list[list[float]] = []
    sparse_rows: list[list[int]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
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
        if limit is not None and report.rows_ok >= limit:
            break
    sparse_arr = np.array(sparse_rows, dtype=np.int64).reshape(-1, N_SPARSE) % cards[None, :]
    rows = Rows(
        dense=np.array(dense_rows, dtype=np.float32).reshape(-1, N_DENSE),
        sparse=sparse_arr,
        labels=np.array(labels, dtype=np.float32),
    )
    return rows, report
