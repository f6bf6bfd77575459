"""Selection queries as data: ``schemas/queries/<name>.sql``, one query per file, typed by its header.

    q = load_query("fresh")                       # a named query, or load_query("my/query.sql")
    q.params["max_staleness"]                     # Param(name='max_staleness', type='INTEGER', default=4, ...)
    values = bind(q.params, {"max_staleness": 2}, {"run": "a", "step": 7, "groups": 8}, q.name)
                                                  # typed, defaults filled in (select() binds this way)

Header format (comment lines before the SQL; descriptions after a second ``--``):

    -- name: fresh
    -- description: what it selects (continued on following comment lines)
    -- param run: VARCHAR                    -- no default: required
    -- param max_staleness: INTEGER = 4      -- default 4
    -- param runs: VARCHAR[] = NULL          -- NULL default: None allowed
    -- output: run VARCHAR, group_id VARCHAR, ...
    -- scope: run                            -- optional: reads only $run's partitions (default: archive)

Values reach DuckDB as ``$name`` prepared-statement parameters, never by string formatting. Types:
VARCHAR, INTEGER, BIGINT, DOUBLE, BOOLEAN, and lists VARCHAR[] / INTEGER[]. Files whose name starts
with ``_`` are templates the selection stage composes around a query (``_eligible``, ``_advantages``).
A user's .sql file needs no header; its ``$name`` parameters are then untyped and required.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import yaml

from recpipe.algorithms.staleness import behaviour_version
from recpipe.errors import RecpipeError, as_int
from recpipe.schema import schemas_dir

NAME = re.compile(r"^_?[a-z][a-z0-9_]*$")
_PARAM = re.compile(r"^param\s+(?P<name>[A-Za-z_]\w*)\s*:\s*(?P<type>[A-Z]+(?:\[\])?)\s*(?:=\s*(?P<default>.*?))?\s*$")
SCOPES = ("archive", "run")
TYPES = ("VARCHAR", "INTEGER", "BIGINT", "DOUBLE", "BOOLEAN", "VARCHAR[]", "INTEGER[]", "ANY")
_REQUIRED = object()  # a Param default meaning "no default: the caller must give a value"
CONTEXT = ("run", "step", "groups", "seed")  # parameters select() fills from its own arguments
# Parameters select() computes from other parameters (a query declares them like any other): the
# off-policy schedule's v(s) is recpipe.algorithms.behaviour_version, defined once, in Python.
DERIVED: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    "behaviour_version": (("step", "sync_interval", "sync_offset"), behaviour_version),
}
SET_BY_SELECT = (*CONTEXT, *DERIVED)


class QueryError(RecpipeError, ValueError):
    """A query file is missing, malformed, or given parameters that do not fit its header."""


def queries_dir() -> Path:
    return schemas_dir() / "queries"


def query_names() -> list[str]:
    """Named selection queries (templates, whose names start with ``_``, left out)."""
    return sorted(p.stem for p in queries_dir().glob("*.sql") if not p.stem.startswith("_"))


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any = _REQUIRED
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` checked against the declared type; raises QueryError naming the parameter."""
        if value is None:
            if self.default is None:
                return None
            raise QueryError(f"{where}: parameter {self.name!r} must be a {self.type}, got None")
        if self.type == "ANY":
            return value
        try:
            return _coerce(self.type, value)
        except (TypeError, ValueError):
            raise QueryError(
                f"{where}: parameter {self.name!r} must be a {self.type}; got {value!r} ({type(value).__name__})"
            ) from None


def _coerce(kind: str, value: Any) -> Any:
    if kind.endswith("[]"):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise TypeError("not a list")
        return [_coerce(kind[:-2], v) for v in value]
    if kind == "VARCHAR":
        if not isinstance(value, str):
            raise TypeError("not a str")
        return value
    if kind in ("INTEGER", "BIGINT"):
        value = as_int(value)
        bits = 31 if kind == "INTEGER" else 63
        if not -(2**bits) <= value < 2**bits:
            raise ValueError("out of range")
        return value
    if kind == "DOUBLE":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TypeError("not a finite number")
        return float(value)
    if kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise TypeError("not a bool")
        return value
    raise ValueError(f"unknown type {kind}")


@dataclass(frozen=True)
class Query:
    """One selection query: its SQL text and the parameters its header declares."""

    name: str  # the file stem of a named query, the resolved path of a user's file
    path: Path
    text: str
    params: dict[str, Param] = field(default_factory=dict)
    description: str = ""
    output: str = ""
    scope: str = "archive"  # "run": the query only reads $run's partitions, so only those are scanned
    builtin: bool = True

    @property
    def sha256(self) -> str:
        """Hash of the file's text: ``sha256sum schemas/queries/<name>.sql`` gives the same."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def body(self) -> str:
        """The single SQL statement, without a trailing semicolon, ready to nest as a subquery."""
        return _strip_terminator(self.text)


def param_table(*queries: Query) -> dict[str, Param]:
    """The union of the queries' declared parameters; one name must mean one type everywhere."""
    merged: dict[str, Param] = {}
    for q in queries:
        for name, param in q.params.items():
            other = merged.get(name)
            if other is not None and other.type != param.type and "ANY" not in (other.type, param.type):
                raise QueryError(f"parameter {name!r} is {other.type} in one query and {param.type} in {q.name}")
            if other is None or other.type == "ANY":
                merged[name] = param
    return merged


def bind(table: Mapping[str, Param], given: Mapping[str, Any], context: Mapping[str, Any],
         where: str) -> dict[str, Any]:
    """Every parameter of ``table`` with its typed value: from ``context`` (what select() sets from its
    arguments), else ``given`` (the caller's params), else the declared default; then the DERIVED ones,
    from those.

    Raises QueryError for a name ``table`` does not declare, a name given that the context sets, a
    required parameter without a value, or a value that does not fit the declared type.
    """
    unknown = sorted(set(given) - set(table))
    if unknown:
        allowed = sorted(set(table) - set(SET_BY_SELECT))
        raise QueryError(f"{where}: unknown parameter(s) {unknown}; allowed: {', '.join(allowed)}")
    clash = sorted(set(given) & (set(context) | set(DERIVED)))
    if clash:
        raise QueryError(f"{where}: parameter(s) {clash} are set by select() (from its run/step/groups/seed/"
                         "loss_config arguments and the other parameters), not through params")
    values: dict[str, Any] = {}
    for name, param in sorted(table.items()):
        if name in DERIVED:
            continue
        if name in context:
            values[name] = context[name] if param.type == "ANY" else param.coerce(context[name], where)
        elif name in given:
            values[name] = param.coerce(given[name], where)
            if param.type == "ANY":  # an untyped parameter of a user's file: it must still go into lineage JSON
                try:
                    json.dumps(values[name])
                except (TypeError, ValueError):
                    raise QueryError(f"{where}: parameter {name!r} = {given[name]!r} is not a plain value "
                                     "(str, int, float, bool, None or a list of them)") from None
        elif param.required:
            raise QueryError(f"{where}: parameter {name!r} ({param.type}) has no default and was not given"
                             + (f" - {param.description}" if param.description else ""))
        else:
            values[name] = param.default
    for name, (inputs, compute) in DERIVED.items():
        if name in table:
            lacking = [i for i in inputs if i not in values]
            if lacking:
                raise QueryError(f"{where}: parameter {name!r} is computed from {', '.join(inputs)}; "
                                 f"declare {', '.join(lacking)} too")
            try:
                values[name] = table[name].coerce(compute(*(values[i] for i in inputs)), where)
            except ValueError as exc:
                raise QueryError(f"{where}: {exc}") from None
    return values


def _strip_terminator(text: str) -> str:
    body = text.rstrip()
    while True:  # trailing comment lines, then one trailing ';'
        lines = body.splitlines()
        if lines and lines[-1].lstrip().startswith("--"):
            body = "\n".join(lines[:-1]).rstrip()
            continue
        break
    body = re.sub(r";\s*(--[^\n]*)?$", "", body).rstrip()
    return body


def _parse_default(text: str, param: str, where: str) -> Any:
    if text.upper() == "NULL":
        return None
    try:
        return yaml.safe_load(text)  # true/false, numbers, 'strings', [lists]
    except yaml.YAMLError:
        raise QueryError(f"{where}: default of parameter {param!r} is not a value: {text!r}") from None


def parse_header(text: str, where: str) -> tuple[dict[str, Param], dict[str, str]]:
    """Params and the other header fields (name, description, output) of a query file."""
    params: dict[str, Param] = {}
    fields: dict[str, str] = {}
    last = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("--"):
            if line:
                break  # the header ends where the SQL starts
            continue
        content = line[2:].strip()
        content, _, note = content.partition(" --")
        content, note = content.strip(), note.strip()
        match = _PARAM.match(content)
        if match:
            name, kind = match.group("name"), match.group("type")
            if kind not in TYPES:
                raise QueryError(f"{where}: parameter {name!r} has unknown type {kind}; allowed: {', '.join(TYPES)}")
            if name in params:
                raise QueryError(f"{where}: parameter {name!r} is declared twice")
            default = _REQUIRED
            if match.group("default") is not None:
                default = _parse_default(match.group("default"), name, where)
                if default is not None:
                    default = Param(name, kind).coerce(default, where)
            params[name] = Param(name, kind, default, note)
            last = None
            continue
        key, sep, value = content.partition(":")
        if sep and key.strip() in ("name", "description", "output", "input", "scope"):
            last = key.strip()
            fields[last] = value.strip()
        elif last and content:
            fields[last] += " " + content  # continuation line
    return params, fields


def _from_file(path: Path, builtin: bool) -> Query:
    stat = path.stat()
    return _parse_file(path, builtin, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _parse_file(path: Path, builtin: bool, mtime_ns: int, size: int) -> Query:
    """Parsed once per file version (mtime and size are part of the cache key, so edits are seen)."""
    text = path.read_text()
    params, fields = parse_header(text, str(path))
    name = path.stem if builtin else str(path)
    if not builtin:
        # A user's file may skip the header: every $name it uses becomes an untyped, required parameter.
        try:
            statements = duckdb.connect().extract_statements(text)
        except duckdb.Error as exc:
            raise QueryError(f"{path}: cannot parse the SQL: {exc}") from None
        used = set().union(*(s.named_parameters for s in statements)) if statements else set()
        for p in sorted(used - set(params)):
            params[p] = Param(p, "ANY")
    scope = fields.get("scope", "archive")
    if scope not in SCOPES:
        raise QueryError(f"{path}: scope {scope!r} is not one of {', '.join(SCOPES)}")
    if scope == "run" and "run" not in params:
        raise QueryError(f"{path}: scope 'run' needs a $run parameter")
    return Query(
        name=name, path=path, text=text, params=params, description=fields.get("description", ""),
        output=fields.get("output", ""), scope=scope, builtin=builtin,
    )


def load_query(query: str | Path) -> Query:
    """A named query (``"schedule"``) or a path to a user's ``.sql`` file."""
    if isinstance(query, str) and NAME.match(query):
        path = queries_dir() / f"{query}.sql"
        if not path.is_file():
            raise QueryError(f"no query named {query!r}; named queries: {', '.join(query_names())} "
                             "(or give a path to a .sql file)")
        return _from_file(path, builtin=True)
    path = Path(query).expanduser()
    if path.suffix != ".sql":
        raise QueryError(f"query {str(query)!r} is neither a query name ({', '.join(query_names())}) "
                         "nor a path to a .sql file")
    if not path.is_file():
        raise QueryError(f"query file {path} does not exist")
    return _from_file(path.resolve(), builtin=False)
