"""Input CSVs: hypothesis throws odd tables at the reader; it returns a valid table or an InputError."""

from __future__ import annotations

import string

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xsel.errors import InputError
from xsel.io.table import read_image_table

cells = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
)
column_names = st.one_of(st.just("Path"), st.text(alphabet=string.ascii_letters + " é|/", min_size=1, max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(columns=st.lists(column_names, min_size=1, max_size=4, unique=True), data=st.data())
def test_any_table_reads_or_raises_input_error(tmp_path, columns, data):
    rows = data.draw(st.integers(0, 6))
    frame = pd.DataFrame({c: [data.draw(cells) for _ in range(rows)] for c in columns})
    csv = tmp_path / "t.csv"
    frame.to_csv(csv, index=False)
    try:
        table = read_image_table(csv)
    except InputError as error:
        assert "\n" not in str(error) and str(csv) in str(error)
        return
    paths = table.paths
    assert len(paths) == len(set(paths)) == len(table.files) > 0
    assert all(isinstance(p, str) and p.strip() for p in paths)


def test_other_columns_are_carried_untouched(tmp_path):
    csv = tmp_path / "t.csv"
    pd.DataFrame(
        {"Path": ["a.png", "b.png"], "Finding Labels": ["Effusion|Mass", "No Finding"], "Age": [40, None]}
    ).to_csv(csv, index=False)
    table = read_image_table(csv)
    assert table.frame["Finding Labels"].tolist() == ["Effusion|Mass", "No Finding"]
    assert table.files == [tmp_path / "a.png", tmp_path / "b.png"]


def test_binary_file_is_an_input_error(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes(b"\xff\xfe\x00\x00garbage\x00")
    try:
        read_image_table(csv)
    except InputError as error:
        assert "t.csv" in str(error)
    else:
        raise AssertionError("a binary file must not read as a table")
