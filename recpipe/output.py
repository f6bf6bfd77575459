"""Query results as the formats ``recpipe sql`` writes: a rich table, CSV, JSON lines and Parquet.

Each format keeps what tells values apart: CSV writes NULL as an empty field and '' as ``""``; JSON has
no NaN or Infinity (they become null), structs and maps are objects, lists arrays, times ISO 8601; the
table shows NULL as a dim ``NULL``, never Python's ``None``.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from recpipe.errors import RecpipeError

FORMATS = ("table", "csv", "json", "parquet")
FILE_FORMATS = ("csv", "json", "parquet")
CELL_CHARS = 200


class OutputRefused(RecpipeError, ValueError):
    """The output path is not one recpipe writes a result to."""


def rows(table: pa.Table) -> Iterator[list[Any]]:
    """Rows as lists of Python values (column by column: a result may repeat a column name), maps as dicts."""
    for batch in table.to_batches(max_chunksize=4096):
        columns = [column.to_pylist(maps_as_pydicts="lossy") for column in batch.columns]
        yield from (list(values) for values in zip(*columns, strict=True))


def unique_names(names: list[str]) -> list[str]:
    """Column names as JSON keys: a repeated name gets a suffix (a, a_1) instead of overwriting the first."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        key = name
        while key in seen:
            seen[name] += 1
            key = f"{name}_{seen[name]}"
        seen.setdefault(key, 0)
        result.append(key)
    return result


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: NaN/Infinity -> None, times -> ISO 8601, bytes -> base64, a Decimal a
    float would round -> its text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):  # a number where a float holds it exactly, else its exact text
        as_float = float(value)
        return as_float if math.isfinite(as_float) and decimal.Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def text(value: Any) -> str | None:
    """One value as CSV or table text; None for NULL. Nested values are JSON, floats round-trip (repr)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {"inf": "Infinity", "-inf": "-Infinity"}.get(repr(value), "NaN")
    if isinstance(value, dict | list | tuple):
        return json.dumps(jsonable(value), ensure_ascii=False)
    if isinstance(value, bool | int):
        return str(value).lower() if isinstance(value, bool) else str(value)
    encoded = jsonable(value)
    return encoded if isinstance(encoded, str) else str(encoded)


def _csv_field(value: Any) -> str:
    """RFC 4180 quoting, except that NULL is an empty field and the empty string is ``""``: the two differ."""
    field = text(value)
    if field is None:
        return ""
    if field == "" or any(c in field for c in ',"\n\r') or field != field.strip():
        return '"' + field.replace('"', '""') + '"'
    return field


def write_csv(table: pa.Table, stream: IO[str]) -> None:
    """A header line, then one line per row; ``\\n`` line endings (not the csv module's ``\\r\\n``)."""
    stream.write(",".join(_csv_field(name) for name in table.column_names) + "\n")
    for row in rows(table):
        stream.write(",".join(_csv_field(v) for v in row) + "\n")


def write_json_lines(table: pa.Table, stream: IO[str]) -> None:
    """One JSON object per row and line (JSON Lines: ``jq``, ``pandas.read_json(lines=True)``)."""
    keys = unique_names(table.column_names)
    for row in rows(table):
        record = dict(zip(keys, row, strict=True))
        stream.write(json.dumps(jsonable(record), ensure_ascii=False, allow_nan=False) + "\n")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def output_target(output: str | None, fmt: str, store_root: Path | str | None) -> Path:
    """Where ``--output`` may write: a file whose folder exists, outside the archive (SQL here never writes
    into the store), on the local file system (the archive's object store is not an output)."""
    if not output:
        raise OutputRefused("--format parquet writes a file: name it with --output PATH (e.g. --output out/result.parquet)")
    if fmt not in FILE_FORMATS:
        raise OutputRefused(f"--output writes {', '.join(FILE_FORMATS)}; give one with --format (got {fmt!r})")
    if "://" in output:
        raise OutputRefused(f"--output must be a local file path, not a URI (got {output!r})")
    path = Path(output).expanduser().resolve()
    if path.is_dir():
        raise OutputRefused(f"--output {output} is a directory: name a file in it, e.g. {Path(output) / 'result.parquet'}")
    if not path.parent.is_dir():
        raise OutputRefused(f"--output {output}: folder {path.parent} does not exist (create it first)")
    if store_root is not None and "://" not in str(store_root) and _inside(path, Path(store_root).resolve()):
        raise OutputRefused(f"--output {output} is inside the archive {store_root}: the archive is read-only "
                            "through SQL; write the result somewhere else")
    return path


def write_file(table: pa.Table, fmt: str, path: Path) -> None:
    """Write atomically: a reader never sees half a file, and a failure leaves any previous file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as stream:
                (write_csv if fmt == "csv" else write_json_lines)(table, stream)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cell(value: Any) -> Any:
    """A table cell: NULL as a dim NULL, floats to 4 significant digits, long text cut."""
    from rich.text import Text

    if value is None:
        return Text("NULL", style="dim")
    if isinstance(value, float):
        return Text(f"{value:.4g}" if math.isfinite(value) else text(value))
    shown = text(value) or ""
    return Text(shown if len(shown) <= CELL_CHARS else shown[:CELL_CHARS - 3] + "...")


def rich_table(table: pa.Table, title: str | None = None) -> Any:
    from rich.table import Table

    view = Table(title=title, show_lines=False)
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in rows(table):
        view.add_row(*(cell(v) for v in row))
    return view
