"""Reading URL tables: formats, folders, streaming, and bad tables with clear messages."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentmill.curate.tables import UrlTable
from latentmill.errors import InputError

ROWS = [
    {"URL": f"https://example.com/{i}.jpg", "TEXT": f"caption number {i}", "WIDTH": 100 + i, "HEIGHT": 200}
    for i in range(50)
]


def write_all_formats(folder):
    import pandas as pd

    df = pd.DataFrame(ROWS)
    folder.mkdir()
    df.to_parquet(folder / "a.parquet", index=False)
    df.to_csv(folder / "b.csv", index=False)
    df.to_csv(folder / "c.tsv", sep="\t", index=False)
    df.to_json(folder / "d.jsonl", orient="records", lines=True)
    return folder


@pytest.mark.parametrize("name", ["a.parquet", "b.csv", "c.tsv", "d.jsonl"])
def test_each_format_reads_the_same_rows(tmp_path, name):
    folder = write_all_formats(tmp_path / "t")
    table = UrlTable.open(folder / name)
    assert table.columns == {"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT"}
    rows = pa.Table.from_batches(list(table.batches())).to_pylist()
    assert rows == ROWS


def test_a_folder_is_read_as_one_table(tmp_path):
    table = UrlTable.open(write_all_formats(tmp_path / "t"))
    assert len(table.files) == 4
    assert sum(b.num_rows for b in table.batches()) == 4 * len(ROWS)


def test_parquet_is_streamed_in_bounded_batches(tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=10)
    sizes = [b.num_rows for b in UrlTable.open(path).batches(batch_rows=10)]
    assert sizes == [10] * 5


def test_other_column_names_are_given_per_role(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"link": ["https://a.b/c.jpg"], "alt": ["a picture"]}), path)
    with pytest.raises(InputError, match="no URL column"):
        UrlTable.open(path)
    assert UrlTable.open(path, {"url": "link", "caption": "alt"}).columns == {"url": "link", "caption": "alt"}


def test_lowercase_aesthetic_column_is_recognised(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"url": ["https://a.b/c.jpg"], "aesthetic": [6.1]}), path)
    assert UrlTable.open(path).columns["aesthetic"] == "aesthetic"


# --- bad tables: exit code 2, a message naming the file and the columns found --------------------------


def test_missing_url_column_names_file_and_columns(tmp_path, run_cli):
    path = tmp_path / "nourl.parquet"
    pq.write_table(pa.table({"link": ["x"], "TEXT": ["y"]}), path)
    result = run_cli("urls", "inspect", path)
    assert result.exit_code == 2
    assert "nourl.parquet" in result.output and "Columns found: link, TEXT" in result.output
    assert "--url-col" in result.output


def test_wrong_column_type_is_refused(tmp_path, run_cli):
    path = tmp_path / "types.parquet"
    pq.write_table(pa.table({"URL": ["https://a.b/1.jpg"], "WIDTH": ["wide"], "HEIGHT": [5]}), path)
    result = run_cli("urls", "prefilter", path, "-o", tmp_path / "out.parquet", "--min-side", "256")
    assert result.exit_code == 2
    assert (
        "types.parquet" in result.output
        and "'WIDTH'" in result.output
        and "expected a number" in result.output
    )
    path2 = tmp_path / "inturl.parquet"
    pq.write_table(pa.table({"URL": [1, 2]}), path2)
    result = run_cli("urls", "inspect", path2)
    assert result.exit_code == 2 and "expected text" in result.output


def test_empty_file_is_refused(tmp_path, run_cli):
    path = tmp_path / "empty.csv"
    path.write_text("")
    result = run_cli("urls", "inspect", path)
    assert result.exit_code == 2 and "empty.csv" in result.output and "empty" in result.output


def test_text_file_named_parquet_is_refused(tmp_path, run_cli):
    path = tmp_path / "fake.parquet"
    path.write_text("URL,TEXT\nhttps://a.b/c.jpg,hello\n")
    result = run_cli("urls", "prefilter", path, "-o", tmp_path / "out.parquet")
    assert result.exit_code == 2
    assert "fake.parquet" in result.output and "cannot be read as parquet" in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_inspect_reports_counts_and_distributions(tmp_path, run_cli):
    rows = ROWS + [dict(ROWS[0])] + [{"URL": None, "TEXT": None, "WIDTH": None, "HEIGHT": None}]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    from latentmill.curate.inspect import inspect_table

    report = inspect_table(path)
    assert report["rows"] == 52
    assert report["duplicate_urls"] == 1
    assert report["nulls"]["URL"] == 1 and report["nulls"]["WIDTH"] == 1
    width = report["distributions"]["width"]
    assert width["count"] == 51 and width["min"] == 100 and width["max"] == 149
    assert width["percentiles"]["p50"] == pytest.approx(124.0)
    assert report["distributions"]["aspect_ratio"]["max"] == pytest.approx(2.0)
    result = run_cli("urls", "inspect", path)
    assert result.exit_code == 0 and "duplicate URLs 1" in result.output and "aspect_ratio" in result.output


def test_inspect_percentiles_are_estimated_from_a_reservoir_on_large_tables(tmp_path):
    import numpy as np

    from latentmill.curate.inspect import inspect_table

    n = 50_000
    path = tmp_path / "big.parquet"
    widths = np.random.default_rng(0).permutation(n)
    pq.write_table(
        pa.table({"URL": [f"https://x.y/{i}" for i in range(n)], "WIDTH": widths}), path, row_group_size=4096
    )
    report = inspect_table(path, sample_rows=5000)
    width = report["distributions"]["width"]
    assert width["sampled"] and width["count"] == n and width["max"] == n - 1
    assert abs(width["percentiles"]["p50"] - n / 2) < 0.03 * n
