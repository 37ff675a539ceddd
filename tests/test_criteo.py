"""Criteo TSV reader: valid lines parse exactly; any corruption is counted by reason, never raised."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm.criteo import (
    MAX_COUNT_DIGITS,
    MISSING_ID,
    N_DENSE,
    N_FIELDS,
    N_SPARSE,
    OOV_ROW,
    REASONS,
    CriteoConfig,
    MalformedRow,
    Vocabulary,
    dense_transform,
    parse_line,
    parse_lines,
    read_criteo,
)
from dlrm.data import Rows
from dlrm.schema import load_schema

SCHEMA = load_schema("criteo")
SAMPLE_NAME = "data/criteo/criteo_kaggle_sample.tsv"


def find_sample() -> Path | None:
    """The shared real-data sample, wherever this checkout keeps ``shared/``."""
    root = Path(__file__).resolve().parents[1]
    for candidate in (root / "shared" / SAMPLE_NAME, root.parent / "shared" / SAMPLE_NAME):
        if candidate.is_file():
            return candidate
    return None


# -- valid lines ----------------------------------------------------------------------------

counts = st.one_of(st.none(), st.integers(-(10 ** (MAX_COUNT_DIGITS - 1)) + 1, 10**MAX_COUNT_DIGITS - 1))
categoricals = st.one_of(st.none(), st.integers(0, 2**32 - 1))


@st.composite
def valid_rows(draw: st.DrawFn) -> tuple[int, list[int | None], list[int | None]]:
    label = draw(st.integers(0, 1))
    dense = draw(st.lists(counts, min_size=N_DENSE, max_size=N_DENSE))
    sparse = draw(st.lists(categoricals, min_size=N_SPARSE, max_size=N_SPARSE))
    return label, dense, sparse


def render(row: tuple[int, list[int | None], list[int | None]], upper: bool = False) -> list[str]:
    label, dense, sparse = row
    hex_fmt = "{:08X}" if upper else "{:08x}"
    return (
        [str(label)]
        + ["" if v is None else str(v) for v in dense]
        + ["" if v is None else hex_fmt.format(v) for v in sparse]
    )


endings = st.sampled_from(["", "\n", "\r\n"])


@settings(max_examples=150, deadline=None)
@given(valid_rows(), endings, st.booleans(), st.booleans())
def test_valid_lines_parse_to_the_values_they_were_built_from(
    row: tuple[int, list[int | None], list[int | None]], ending: str, as_bytes: bool, upper: bool
) -> None:
    text = "\t".join(render(row, upper)) + ending
    assert parse_line(text.encode() if as_bytes else text) == row
    rows, report = parse_lines([text.encode() if as_bytes else text], SCHEMA, raw_ids=True)
    assert (report.rows_read, report.rows_ok, report.rows_malformed) == (1, 1, 0)
    label, dense, sparse = row
    assert rows.labels.tolist() == [float(label)]
    assert rows.dense[0].tolist() == pytest.approx([dense_transform(v) for v in dense], rel=1e-6)
    assert rows.sparse[0].tolist() == [MISSING_ID if v is None else v + 1 for v in sparse]


def test_dense_transform() -> None:
    assert dense_transform(None) == 0.0
    assert dense_transform(-3) == 0.0  # I2 holds small negative values in the real data
    assert dense_transform(0) == 0.0
    assert dense_transform(99) == pytest.approx(math.log(100))


def test_hashed_ids_fit_the_tables() -> None:
    line = "\t".join(render((1, [None] * N_DENSE, [2**32 - 1] * N_SPARSE)))
    rows, _ = parse_lines([line], SCHEMA)
    cards = np.array([f.cardinality for f in SCHEMA.sparse])
    assert ((rows.sparse >= 0) & (rows.sparse < cards)).all()
    assert rows.sparse[0].tolist() == (2**32 % cards).tolist()


# -- corrupted lines ------------------------------------------------------------------------

BAD_LABELS = ["2", "", "-1", "1.0", " 1", "01", "true", "\x00"]
BAD_COUNTS = [
    "1.5",
    "abc",
    "0x10",
    " 3",
    "3 ",
    "1_000",
    "+5",
    "٣",
    "--1",
    "1e3",
    "9" * (MAX_COUNT_DIGITS + 1),
]
BAD_HEX = ["zz", "0x1f", "-1f", " 1f", "1f ", "123456789", "fffffffff", "g", "1_f", "٣"]


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[str | bytes, str]:
    """A valid line with one corruption, and the reason it must be reported for."""
    fields = render(draw(valid_rows()))
    kind = draw(st.sampled_from(REASONS))
    if kind == "field_count":
        n = draw(st.integers(1, 2 * N_FIELDS).filter(lambda k: k != N_FIELDS))
        # One field must not be empty: an empty line is blank, not a row.
        fields = (fields * 2)[:n] if n > 1 else ["1"]
    elif kind == "label":
        fields[0] = draw(st.sampled_from(BAD_LABELS))
    elif kind == "dense":
        fields[1 + draw(st.integers(0, N_DENSE - 1))] = draw(st.sampled_from(BAD_COUNTS))
    elif kind == "sparse":
        fields[1 + N_DENSE + draw(st.integers(0, N_SPARSE - 1))] = draw(st.sampled_from(BAD_HEX))
    line = "\t".join(fields) + draw(endings)
    if kind == "encoding":
        raw = line.encode()
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\xed\xa0\x80"])) + raw[
            at:
        ], kind
    return line, kind


@settings(max_examples=300, deadline=None)
@given(corrupted())
def test_each_corruption_is_reported_with_its_reason(case: tuple[str | bytes, str]) -> None:
    line, reason = case
    with pytest.raises(MalformedRow) as info:
        parse_line(line)
    assert info.value.reason == reason
    rows, report = parse_lines([line], SCHEMA)
    assert len(rows) == 0
    assert report.malformed == {reason: 1}
    assert report.rows_read == 1 and report.rows_ok == 0
    assert report.examples and report.examples[0].startswith("line 1: " + reason)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(lambda r: "\t".join(render(r)) + "\n", valid_rows()),
            corrupted().map(lambda c: c[0]),
            st.binary(max_size=300),
            st.text(max_size=300),
            st.sampled_from(["", "\n", "\r\n"]),
        ),
        max_size=30,
    )
)
def test_any_mix_of_lines_never_raises_and_counts_add_up(lines: list[str | bytes]) -> None:
    rows, report = parse_lines(lines, SCHEMA, max_examples=3)
    assert report.rows_ok + report.rows_malformed == report.rows_read
    assert report.rows_read + report.blank_lines == len(lines)
    assert len(rows) == report.rows_ok
    assert set(report.malformed) <= set(REASONS)
    assert len(report.examples) == min(3, report.rows_malformed)


def test_read_criteo_counts_by_reason_from_a_file(tmp_path: Path) -> None:
    good = "\t".join(render((1, [5] + [None] * 12, [0xABCDEF01] * N_SPARSE)))
    lines = [
        good + "\r\n",  # Windows line ending
        "\n",  # blank
        good.replace("1", "2", 1) + "\n",  # label 2
        "\t".join(good.split("\t")[:39]) + "\n",  # 39 fields
        good + "\t\n",  # 41 fields
    ]
    path = tmp_path / "mixed.tsv"
    path.write_bytes("".join(lines).encode() + good.encode().replace(b"abcdef01", b"ab\xffdef01", 1) + b"\n")
    rows, report = read_criteo(path, SCHEMA, raw_ids=True)
    assert report.to_dict() == {
        "rows_read": 5,
        "rows_ok": 1,
        "rows_malformed": 4,
        "blank_lines": 1,
        "malformed_by_reason": {"label": 1, "field_count": 2, "encoding": 1},
    }
    assert rows.sparse[0].tolist() == [0xABCDEF01 + 1] * N_SPARSE
    assert rows.dense[0, 0] == pytest.approx(math.log(6))


def test_limit_stops_after_that_many_good_rows() -> None:
    good = "\t".join(render((0, [1] * N_DENSE, [7] * N_SPARSE)))
    rows, report = parse_lines([good, "bad", good, good, good], SCHEMA, limit=2)
    assert len(rows) == 2 and report.rows_ok == 2 and report.malformed == {"field_count": 1}


def test_the_real_sample_parses_cleanly() -> None:
    sample = find_sample()
    if sample is None:
        pytest.skip("shared/data/criteo sample not in this checkout")
    rows, report = read_criteo(sample, SCHEMA, limit=1000)
    assert report.rows_ok == 1000 and report.rows_malformed == 0
    assert 0.1 < rows.labels.mean() < 0.4


def test_wrong_schema_is_refused() -> None:
    with pytest.raises(ValueError, match="Criteo needs 26 / 13"):
        parse_lines([], load_schema("world"))


def test_criteo_config_validation() -> None:
    with pytest.raises(ValueError, match="holdout"):
        CriteoConfig(holdout=1.0)
    with pytest.raises(ValueError, match="min_count"):
        CriteoConfig(min_count=-1)


# -- vocabulary -----------------------------------------------------------------------------


def raw_rows(sparse: np.ndarray) -> Rows:
    n = len(sparse)
    return Rows(np.zeros((n, N_DENSE), np.float32), sparse.astype(np.int64), np.zeros(n, np.float32))


def test_vocabulary_keeps_frequent_training_values_and_shares_one_row_for_the_rest() -> None:
    column = np.array([5] * 3 + [9] * 2 + [7] * 1 + [MISSING_ID] * 4)
    train = raw_rows(np.repeat(column[:, None], N_SPARSE, axis=1))
    vocab = Vocabulary.fit(train, SCHEMA, min_count=2)
    assert vocab.kept[0].tolist() == [MISSING_ID, 5, 9]
    test = raw_rows(np.repeat(np.array([[5], [7], [123456], [MISSING_ID], [9]]), N_SPARSE, axis=1))
    encoded = vocab.encode(test).sparse[:, 0].tolist()
    # Kept values get distinct rows above OOV_ROW; the rare (7) and the unseen share OOV_ROW.
    assert encoded[1] == encoded[2] == OOV_ROW
    assert len({encoded[0], encoded[3], encoded[4], OOV_ROW}) == 4
    assert vocab.oov_share(test) == pytest.approx(2 / 5)


def test_vocabulary_caps_at_the_table_size_keeping_the_most_frequent() -> None:
    card = SCHEMA.sparse[8].cardinality  # C9: a tiny table
    values = np.concatenate([np.full(100 - v, v) for v in range(1, card + 5)])
    train = raw_rows(np.repeat(values[:, None], N_SPARSE, axis=1))
    vocab = Vocabulary.fit(train, SCHEMA, min_count=1)
    assert vocab.kept[8].tolist() == list(range(1, card))
    assert int(vocab.encode(train).sparse[:, 8].max()) == card - 1


def test_vocabulary_round_trips_through_a_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = raw_rows(rng.integers(0, 50, (2000, N_SPARSE)))
    vocab = Vocabulary.fit(train, SCHEMA, min_count=30)
    vocab.save(tmp_path / "vocab.npz")
    again = Vocabulary.load(tmp_path / "vocab.npz", SCHEMA)
    assert again.min_count == 30
    np.testing.assert_array_equal(again.encode(train).sparse, vocab.encode(train).sparse)
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.fit(train, SCHEMA, min_count=0)
