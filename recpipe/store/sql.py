"""Read-only SQL over the archive, for ``recpipe sql`` and user selection queries.

Defence in depth, each layer tested in tests/store/test_sql.py:
1. only SELECT-like statements (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN)
   run; DuckDB's own parser classifies them, so no regex guesses;
2. the connection is in memory and may read files only inside the store
   (``allowed_directories`` + ``enable_external_access = false``), may not load
   or install extensions, and its configuration is then locked;
3. a query running longer than the timeout is interrupted.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class QueryRefused(ValueError):
    """The statement would write, reach outside the store or change settings."""


class QueryTimeout(TimeoutError):
    """The query ran past its time limit and was interrupted."""


def lock_down(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Allow reads only under ``root``; no extensions; freeze every setting."""
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allowed_directories = $dirs", {"dirs": [str(root) + "/"]})
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


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
    """Run a read-only query on a locked-down connection; return the last statement's result."""
    statements = check_read_only(con, sql)
    timer = None
    timed_out = threading.Event()
    if timeout_s:
        def stop() -> None:
            timed_out.set()
            con.interrupt()

        timer = threading.Timer(timeout_s, stop)
        timer.start()
    try:
        for statement in statements[:-1]:
            con.execute(statement.query)
        return con.sql(statements[-1].query, params=params or None).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise QueryRefused(f"refused: {exc}".split("\n")[0]) from None
    except duckdb.InterruptException:
        if timed_out.is_set():
            raise QueryTimeout(f"query interrupted after {timeout_s:g} s (time limit)") from None
        raise
    finally:
        if timer:
            timer.cancel()
