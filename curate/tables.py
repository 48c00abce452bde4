"""URL tables: find the files, name the columns, stream the rows in batches with bounded memory.

A URL table is parquet, csv, tsv or jsonl, or a folder of them. LAION's column names are recognised by
default (`URL`, `TEXT`, `WIDTH`, `HEIGHT`, `similarity`, `pwatermark`, `punsafe`, `AESTHETIC_SCORE`);
other names are passed per role.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from latentmill.curate.storage import arrow_file, location
from latentmill.errors import InputError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}

# role -> names recognised without an option, first match wins
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "url": ("URL", "url"),
    "caption": ("TEXT", "caption", "text"),
    "width": ("WIDTH", "width"),
    "height": ("HEIGHT", "height"),
    "similarity": ("similarity",),
    "pwatermark": ("pwatermark",),
    "punsafe": ("punsafe",),
    "aesthetic": ("AESTHETIC_SCORE", "aesthetic"),
}
TEXT_ROLES = ("url", "caption")
NUMERIC_ROLES = ("width", "height", "similarity", "pwatermark", "punsafe", "aesthetic")
ROLE_OPTION = {role: f"--{role}-col" for role in DEFAULT_COLUMNS}

BATCH_ROWS = 65_536


def table_files(path: str | Path) -> list[Path]:
    """The table files at `path`: the file itself, or the supported files in a folder, sorted."""
    if any(c in str(path) for c in "*?[") and not location(path).exists():  # a glob of parts: one table
        return _glob_files(str(path))
    path = location(path)
    if not path.exists():
        raise InputError(
            f"{path}: no such file or folder. Give a parquet, csv, tsv or jsonl file, a folder of them, or a "
            f"glob of parts (parts/*.parquet)."
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise InputError(f"{path}: the folder holds no .parquet, .csv, .tsv or .jsonl files.")
        return files
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"{path}: unknown table format '{path.suffix}'. Use .parquet, .csv, .tsv or .jsonl.")
    return [path]


def _glob_files(pattern: str) -> list[Path]:
    """The table files a glob names (on disk or in a store), sorted: the parts of one table."""
    import glob

    from latentmill.curate.storage import is_remote

    if is_remote(pattern):
        found = location(pattern.split("*")[0].rsplit("/", 1)[0])
        names = sorted(found.fs.glob(location(pattern).path))
        files = [location(f"{found.protocol}://{name}") for name in names]
    else:
        files = [Path(p) for p in sorted(glob.glob(pattern))]
    files = [f for f in files if f.suffix.lower() in FORMATS]
    if not files:
        raise InputError(f"{pattern}: the glob matches no .parquet, .csv, .tsv or .jsonl file.")
    return files


def _open_batches(file: Path, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    fmt = FORMATS[file.suffix.lower()]
    if file.stat().st_size == 0:
        raise InputError(f"{file}: the file is empty. A URL table needs a header and at least a URL column.")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            reader = pq.ParquetFile(arrow_file(file))
            yield from reader.iter_batches(batch_size=batch_rows, columns=columns)
            return
        if fmt in ("csv", "tsv"):
            import pyarrow.csv as pcsv

            reader = pcsv.open_csv(
                arrow_file(file),
                read_options=pcsv.ReadOptions(block_size=1 << 24),
                parse_options=pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                convert_options=pcsv.ConvertOptions(include_columns=columns),
            )
        else:
            import pyarrow.json as pjson

            reader = pjson.open_json(arrow_file(file), read_options=pjson.ReadOptions(block_size=1 << 24))
        for batch in reader:
            if columns is not None and fmt == "jsonl":
                batch = batch.select(columns)
            yield from batch.to_batches(max_chunksize=batch_rows) if hasattr(batch, "to_batches") else [batch]
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        hint = "check that it is a real" if fmt == "parquet" else "check that it is valid"
        raise InputError(
            f"{file}: cannot be read as {fmt} ({str(err).splitlines()[0]}); {hint} {fmt} file, "
            f"or give it the extension of its real format (.parquet, .csv, .tsv, .jsonl)."
        ) from None


def read_schema(file: Path) -> pa.Schema:
    """The schema of one table file, read without loading its rows (csv/jsonl: the first block)."""
    if FORMATS[file.suffix.lower()] == "parquet" and file.stat().st_size > 0:
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(arrow_file(file))
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(
                f"{file}: cannot be read as parquet ({str(err).splitlines()[0]}); check that it is a real "
                f"parquet file, or give it the extension of its real format (.csv, .tsv, .jsonl)."
            ) from None
    for batch in _open_batches(file, None, BATCH_ROWS):
        return batch.schema
    raise InputError(f"{file}: the table has no rows.")


def resolve_columns(
    schema: pa.Schema, source: Path, names: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """Map each role (url, caption, width, ...) to a column of `schema`.

    An explicitly named column must exist; a role without a name takes the first default that exists,
    or is absent. The URL column is required. Types are checked: text roles need strings, the
    others numbers.
    """
    names = dict(names or {})
    found = list(schema.names)
    columns: dict[str, str] = {}
    for role, defaults in DEFAULT_COLUMNS.items():
        wanted = names.get(role)
        if wanted:
            if wanted not in found:
                raise InputError(
                    f"{source}: no column '{wanted}' (asked for by {ROLE_OPTION[role]}). Columns found: {', '.join(found)}."
                )
            columns[role] = wanted
        else:
            match = next((c for c in defaults if c in found), None)
            if match:
                columns[role] = match
    if "url" not in columns:
        raise InputError(
            f"{source}: no URL column (looked for {' or '.join(DEFAULT_COLUMNS['url'])}). "
            f"Columns found: {', '.join(found)}. Name it with --url-col."
        )
    for role, column in columns.items():
        kind = schema.field(column).type
        if role in TEXT_ROLES and not (
            pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
        ):
            raise InputError(
                f"{source}: column '{column}' ({role}) has type {kind}, expected text. "
                f"Name the right column with {ROLE_OPTION[role]}."
            )
        if role in NUMERIC_ROLES and not (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)
        ):
            raise InputError(
                f"{source}: column '{column}' ({role}) has type {kind}, expected a number. "
                f"Name the right column with {ROLE_OPTION[role]}, or convert it."
            )
    return columns


@dataclass
class UrlTable:
    """A URL table (one file or a folder of files) with its roles resolved; rows are streamed."""

    path: Path
    files: list[Path]
    schema: pa.Schema
    columns: dict[str, str]

    @classmethod
    def open(cls, path: str | Path, names: Mapping[str, str | None] | None = None) -> UrlTable:
        """Open and validate a table: every file must be readable and hold the resolved columns."""
        files = table_files(path)
        schema = read_schema(files[0])
        columns = resolve_columns(schema, files[0], names)
        for file in files[1:]:
            other = read_schema(file)
            missing = [c for c in columns.values() if c not in other.names]
            if missing:
                raise InputError(
                    f"{file}: missing column(s) {', '.join(missing)} that {files[0].name} has. "
                    f"Columns found: {', '.join(other.names)}."
                )
        return cls(location(path), files, schema, columns)

    def num_rows(self) -> int | None:
        """Row count from parquet metadata, or None where it would need a full read."""
        if any(FORMATS[f.suffix.lower()] != "parquet" for f in self.files):
            return None
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(arrow_file(f)).metadata.num_rows for f in self.files)

    def batches(
        self, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches of every file, cast to the first file's schema."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        for file in self.files:
            for batch in _open_batches(file, columns, batch_rows):
                if batch.num_rows == 0:
                    continue
                if batch.schema != schema:
                    batch = _cast(batch, schema, file)
                yield batch


def _cast(batch: pa.RecordBatch, schema: pa.Schema, file: Path) -> pa.RecordBatch:
    arrays = []
    for field in schema:
        if field.name not in batch.schema.names:
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(batch.schema.get_field_index(field.name))
        try:
            arrays.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(
                f"{file}: column '{field.name}' has type {column.type} here but {field.type} in the first file."
            ) from None
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def columns_field():
    """The `columns` setting of the stages that read a URL table: role -> column (the --ROLE-col options)."""
    from latentmill.schema import opt

    return opt(factory=dict, cli=False, help="role -> column name (the --ROLE-col options).")
