"""Arrow schemas of the archive tables, built from ``schemas/tables.yaml``.

The YAML file is the single definition; this module only turns it into
pyarrow types and checks rows against it before they are written.

    >>> from recpipe.schema import table_schema
    >>> table_schema("rollouts").field("behaviour_logprobs").type
    ListType(list<item: float>)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

_PRIMITIVES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}
_LIST = re.compile(r"^list<(\w+)>$")


def schemas_dir() -> Path:
    """Folder holding tables.yaml and queries/ (repo checkout or installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas", here.parent / "schemas"):
        if (candidate / "tables.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"schemas/tables.yaml not found next to {here}")


CHECKPOINT_INTERVAL = 10  # a table's Delta checkpoint interval unless tables.yaml gives its own


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...]
    key: tuple[str, ...]
    description: str
    shard: str | None = None  # the shard id of a row, e.g. "step-{step:06d}", for tables without a shard_id column
    checkpoint_interval: int = CHECKPOINT_INTERVAL  # a Delta checkpoint every N commits (recpipe.store.table_configuration)

    def shard_filter(self, shard_id: str) -> dict[str, int | str] | None:
        """The column values that select one shard's rows (``{"step": 3}`` for "step-000003"), if the table
        names its shards by a template; None if ``shard_id`` does not match it."""
        if self.shard is None:
            return None
        numbers = set(re.findall(r"\{(\w+):0?\d*d\}", self.shard))
        pattern = re.sub(r"\\\{(\w+):0?\d*d\\\}", r"(?P<\1>\\d+)", re.escape(self.shard))
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+)", pattern)  # greedy: a task name may hold "-"
        match = re.fullmatch(pattern, shard_id)
        if match is None:
            return None
        return {k: int(v) if k in numbers else v for k, v in match.groupdict().items()}

    def shard_id(self, **values: int | str) -> str:
        """The shard id of the rows with ``values`` (the template's fields)."""
        if self.shard is None:
            raise ValueError(f"table {self.name!r} has no shard template")
        return self.shard.format(**values)


def _arrow_type(spec: dict[str, Any], where: str) -> pa.DataType:
    kind = spec["type"]
    if kind in _PRIMITIVES:
        return _PRIMITIVES[kind]
    match = _LIST.match(kind)
    if match and match.group(1) in _PRIMITIVES:
        return pa.list_(_PRIMITIVES[match.group(1)])
    if kind in ("struct", "list<struct>"):
        struct = pa.struct([_field(f, f"{where}.{f['name']}") for f in spec["fields"]])
        return struct if kind == "struct" else pa.list_(struct)
    raise ValueError(f"{where}: unknown type {kind!r}")


_COLUMN_KEYS = {"name", "type", "nullable", "description", "fields"}


def _field(spec: dict[str, Any], where: str) -> pa.Field:
    # An unquoted comma in a YAML flow mapping splits a description into stray keys: refuse them.
    unknown = set(spec) - _COLUMN_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown column keys {sorted(unknown)} (quote a description that has a comma)")
    metadata = {"description": spec["description"]} if spec.get("description") else None
    return pa.field(
        spec["name"], _arrow_type(spec, where), nullable=spec.get("nullable", True), metadata=metadata
    )


@functools.cache
def _document() -> dict[str, Any]:
    with open(schemas_dir() / "tables.yaml") as f:
        return yaml.safe_load(f)


SCHEMA_VERSION: int = int(_document()["schema_version"])


@functools.cache
def table_spec(name: str) -> TableSpec:
    tables = _document()["tables"]
    if name not in tables:
        raise KeyError(f"unknown table {name!r}; tables are {sorted(tables)}")
    doc = tables[name]
    fields = [_field(c, f"{name}.{c['name']}") for c in doc["columns"]]
    return TableSpec(
        name=name,
        schema=pa.schema(fields, metadata={"table": name, "schema_version": str(SCHEMA_VERSION)}),
        partition_by=tuple(doc.get("partition_by", ())),
        key=tuple(doc.get("key", ())),
        description=doc.get("description", ""),
        shard=doc.get("shard"),
        checkpoint_interval=int(doc.get("checkpoint_interval", CHECKPOINT_INTERVAL)),
    )


def table_schema(name: str) -> pa.Schema:
    return table_spec(name).schema


def table_names() -> list[str]:
    return list(_document()["tables"])


def migrations() -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Columns added after each older schema_version, per table."""
    return {int(k): v for k, v in (_document().get("migrations") or {}).items()}


def added_columns(name: str) -> frozenset[str]:
    """The nullable columns (``struct.field`` for a field of a struct column) tables.yaml's migrations add
    to table ``name``: a file written before them lacks them, and reads them as null."""
    schema = table_schema(name)
    out = set()
    for tables in migrations().values():
        for column in tables.get(name, []):
            top, *below = column["name"].split(".")
            field = schema.field(top)
            for part in below:
                field = field.type.field(part)
            if field.nullable:
                out.add(column["name"])
    return frozenset(out)


def fits_older(old: pa.DataType, new: pa.DataType, added: frozenset[str], where: str) -> bool:
    """Whether a column ``where`` of type ``old`` is one of type ``new`` as an older schema version wrote
    it: the same type, or a struct lacking only fields in ``added`` (see added_columns)."""
    if old.equals(new):
        return True
    if not (pa.types.is_struct(old) and pa.types.is_struct(new)) or set(old.names) - set(new.names):
        return False
    have = {f.name: f for f in old}
    return all(have[f.name].type.equals(f.type) or fits_older(have[f.name].type, f.type, added, f"{where}.{f.name}")
               if f.name in have else f"{where}.{f.name}" in added for f in new)


def conform(name: str, data: pa.Table | list[dict[str, Any]]) -> pa.Table:
    """Cast rows to the table's schema; raise ValueError naming what does not fit."""
    schema = table_schema(name)
    if isinstance(data, list):
        present = set().union(*(row.keys() for row in data)) if data else set(schema.names)
        missing = set(schema.names) - present
        if missing:
            raise ValueError(f"{name}: rows lack columns {sorted(missing)}")
        try:
            data = pa.Table.from_pylist(data, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ValueError(f"{name}: rows do not fit the schema: {exc}") from exc
    extra = set(data.column_names) - set(schema.names)
    missing = set(schema.names) - set(data.column_names)
    if extra or missing:
        raise ValueError(
            f"{name}: columns differ from the schema: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for field in schema:
        if not field.nullable and data.column(field.name).null_count:
            raise ValueError(f"{name}: column {field.name!r} must not be null")
    try:
        return data.select(schema.names).cast(schema).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as exc:
        raise ValueError(f"{name}: rows do not fit the schema: {exc}") from exc
