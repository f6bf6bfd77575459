"""Read-only SQL over the archive, for ``recpipe sql``, ``recpipe.connect()`` and user selection queries.

Defence in depth, each layer tested in tests/store/test_sql.py:
1. only SELECT-like statements (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) run; DuckDB's own
   parser classifies them, so no regex guesses;
2. the connection has no file system access at all: ``enable_external_access = false`` with no
   allowed directories, no temp directory (it does not spill; DuckDB would otherwise allow its temp
   directory for reads and writes), no extension loading, and its configuration is then locked. So
   whatever a statement manages to run - ``EXPLAIN ANALYZE`` executes its inner statement, COPY
   included - cannot open a file, inside the store or outside. The tables are the interface: they
   reach DuckDB as Python objects (recpipe.store.datasets.TableDataset), which read the files
   themselves; ``read_parquet``/``read_text``/``COPY``/``ATTACH`` on a path are refused;
3. memory is bounded (``memory_limit``, default min(25% of RAM, 4 GB)) and a query running longer
   than the timeout is interrupted.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import duckdb
import pyarrow as pa

from recpipe.errors import RecpipeError
from recpipe.schema import table_names

READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
MEMORY_LIMIT_CAP = 4 * 1024**3


class QueryRefused(RecpipeError, ValueError):
    """The statement would write, touch a file or change settings."""


class QueryTimeout(RecpipeError, TimeoutError):
    """The query ran past its time limit and was interrupted."""


def default_memory_limit() -> str:
    """min(25% of physical memory, 4 GB), in MiB as DuckDB takes it."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 4 * MEMORY_LIMIT_CAP
    return f"{min(ram // 4, MEMORY_LIMIT_CAP) // 2**20}MiB"


def lock_down(con: duckdb.DuckDBPyConnection, memory_limit: str | None = None) -> None:
    """No file system access, no extensions, bounded memory; then freeze every setting."""
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET memory_limit = $m", {"m": memory_limit or default_memory_limit()})
    # No temp directory: DuckDB adds it to the allowed directories once external access is off
    # (COPY could write there), and the in-memory default would be `.tmp` in the current directory.
    con.execute("SET temp_directory = ''")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def locked_connection(memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection, locked down (see ``lock_down``)."""
    con = duckdb.connect()
    lock_down(con, memory_limit)
    return con


def scan_failure(exc: duckdb.Error) -> str | None:
    """The message of an error raised inside a table's Python scan (a damaged file: recpipe.store.datasets
    names it and the doctor command), without the Python traceback DuckDB appends; None for other errors."""
    text = str(exc)
    if "Detail: Python exception" in text:
        return text.split(". Detail: Python exception")[0]
    stream = re.search(r"exporting a stream from the object registered as '\w+' failed: \w+: (.*)", text, re.S)
    return stream.group(1).strip() if stream else None


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list[Any]:
    """Parse ``sql``; raise QueryRefused unless every statement only reads."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"cannot parse query: {exc}") from None
    if not statements:
        raise QueryRefused("empty query")
    for statement in statements:
        if statement.type not in READ_STATEMENTS:
            name = statement.type.name
            raise QueryRefused(
                f"{name} statements are not allowed: the archive is read-only through SQL "
                "(only SELECT / WITH / DESCRIBE / SHOW / EXPLAIN run)"
            )
    return statements


def run_read_only(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None,
                  timeout_s: float | None = 60.0) -> pa.Table:
    """Run one read-only statement on a locked-down connection; return its result."""
    statements = check_read_only(con, sql)
    if len(statements) > 1:  # each would need its own result; a second used to fail with ResourceInUseException
        raise QueryRefused(f"one statement at a time: found {len(statements)} statements separated by ';'; "
                           "run each on its own")
    timer = None
    timed_out = threading.Event()
    if timeout_s:
        def stop() -> None:
            timed_out.set()
            con.interrupt()

        timer = threading.Timer(timeout_s, stop)
        timer.start()
    try:
        return con.sql(statements[0].query, params=params or None).to_arrow_table()
    except duckdb.PermissionException as exc:
        first = str(exc).split("\n")[0]
        if "disabled by configuration" in first and "file" in first:
            raise QueryRefused(f"refused: {first}. SQL here cannot read or write files; the tables are the "
                               f"interface: query {', '.join(table_names())}") from None
        raise QueryRefused(f"refused: {first}") from None
    except duckdb.InterruptException:
        if timed_out.is_set():
            raise QueryTimeout(f"query interrupted after {timeout_s:g} s (time limit)") from None
        raise
    except duckdb.OutOfMemoryException as exc:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
        raise duckdb.OutOfMemoryException(
            f"query needs more than the memory limit ({limit}); read-only SQL does not spill to disk - "
            f"select fewer columns or rows ({str(exc).splitlines()[0]})") from None
    except duckdb.Error as exc:
        text = scan_failure(exc)
        if text is not None:
            raise type(exc)(text) from None
        raise
    finally:
        if timer:
            timer.cancel()
