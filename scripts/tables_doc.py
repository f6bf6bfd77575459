"""Write the generated part of docs/tables.md from schemas/tables.yaml, so the doc cannot drift.

    python scripts/tables_doc.py           # rewrite docs/tables.md below its marker line
    python scripts/tables_doc.py --check   # exit 1 if docs/tables.md is not current (tests/test_docs.py)

Everything above the marker line is hand-written prose; everything below it is rendered here from
the YAML file (the one definition of the tables), table by table, in the file's order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from recpipe.schema import CHECKPOINT_INTERVAL

ROOT = Path(__file__).resolve().parents[1]
TABLES_YAML = ROOT / "schemas" / "tables.yaml"
DOC = ROOT / "docs" / "tables.md"
MARKER = "<!-- generated from schemas/tables.yaml by scripts/tables_doc.py: edit those, not below -->"


def _type(column: dict[str, Any]) -> str:
    return f"`{column['type']}`"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").strip()


def _columns(columns: list[dict[str, Any]], prefix: str = "") -> list[str]:
    rows = []
    for c in columns:
        nullable = "yes" if c.get("nullable", True) else "no"
        rows.append(f"| `{prefix}{c['name']}` | {_type(c)} | {nullable} | {_cell(c.get('description'))} |")
        if "fields" in c:  # struct, or list<struct>: one row per field, named as SQL reaches it
            inner = f"{prefix}{c['name']}" + ("[]." if c["type"].startswith("list<") else ".")
            rows += _columns(c["fields"], prefix=inner)
    return rows


def render(document: dict[str, Any]) -> str:
    """The generated part of docs/tables.md for a parsed tables.yaml."""
    out = [f"Schema version {document['schema_version']}.", ""]
    for name, table in document["tables"].items():
        out += [f"### {name}", "", _cell(table.get("description")), ""]
        partition = ", ".join(f"`{p}`" for p in table.get("partition_by", ())) or "none"
        out.append(f"- Partitioned by: {partition}")
        out.append(f"- Key: {', '.join(f'`{k}`' for k in table.get('key', ()))}")
        if table.get("shard"):
            out.append(f"- Shard id of a row: `{table['shard']}`")
        out.append(f"- Delta checkpoint every {table.get('checkpoint_interval', CHECKPOINT_INTERVAL)} commits")
        out += ["", "| column | type | nullable | description |", "|---|---|---|---|"]
        out += _columns(table["columns"])
        out.append("")
    migrations = document.get("migrations") or {}
    if migrations:
        out += ["### Columns added since older schema versions", "",
                "Rows written at an older schema version read these columns with the value shown.", "",
                "| rows of schema version up to | table | column | value in those rows |", "|---|---|---|---|"]
        for version, tables in sorted(migrations.items()):
            for table, added in tables.items():
                for column in added:
                    default = column.get("default")
                    value = "null" if default is None else f"`{default!r}`" if default == "" else f"`{default}`"
                    out.append(f"| {version} | {table} | `{column['name']}` | {value} |")
        out.append("")
    return "\n".join(out)


def expected_doc(doc_text: str, yaml_text: str) -> str:
    """doc_text with everything after its marker line replaced by the rendering of yaml_text."""
    head, found, _ = doc_text.partition(MARKER)
    if not found:
        raise ValueError(f"{DOC} has no marker line {MARKER!r}")
    return head + MARKER + "\n\n" + render(yaml.safe_load(yaml_text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/tables.md is not current")
    args = parser.parse_args()
    current = DOC.read_text()
    wanted = expected_doc(current, TABLES_YAML.read_text())
    if args.check:
        if current != wanted:
            print(f"{DOC} is out of date: run python scripts/tables_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
