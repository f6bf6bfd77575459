"""The repo's docs stand alone and stay current: every file and section they and the code cite exists,
docs/tables.md matches schemas/tables.yaml, and its SQL examples run."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from recpipe.schema import table_names, table_schema
from recpipe.store import Store

ROOT = Path(__file__).resolve().parents[1]
TABLES_DOC = ROOT / "docs" / "tables.md"


def _repo_files() -> list[str]:
    """The repo's files: git's list, or (a copy without .git) every file outside ignored build folders."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        return listed.stdout.split()
    skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(ROOT).parts))


TRACKED = _repo_files()
TEXT_FILES = [f for f in TRACKED if f.endswith((".py", ".md", ".sql", ".yaml", ".sh", ".toml", ".lock"))
              and (ROOT / f).is_file()]  # not a file deleted but not yet committed
DIRS = ("recpipe/", "flows/", "schemas/", "tests/", "bench/", "scripts/", "configs/", "docs/", "data/")
# A repo path in prose or code: starts at a top-level folder, ends with a file extension.
REPO_PATH = re.compile(r"(?<![\w./<{-])((?:" + "|".join(map(re.escape, DIRS))
                       + r")[\w./-]*\.(?:md|py|sql|yaml|sh|toml|lock|jsonl))\b")
# A bare Markdown file name ("see algorithms.md"); comparison.md is a file recpipe writes, not a doc.
BARE_MD = re.compile(r"(?<![\w./<{-])([\w-]+\.md)\b")
WRITTEN_FILES = {"comparison.md"}
# A cited section: docs/algorithms.md, "Named presets" or docs/algorithms.md ("Named presets").
SECTION = re.compile(r"((?:docs/)?[\w-]+\.md),? \(?\"([^\"\n]{3,80})\"")


def _load_tables_doc_script():
    spec = importlib.util.spec_from_file_location("tables_doc", ROOT / "scripts" / "tables_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cited() -> list[tuple[str, str]]:
    out = []
    for name in TEXT_FILES:
        text = (ROOT / name).read_text(errors="ignore")
        out += [(name, m.group(1).rstrip(".")) for m in REPO_PATH.finditer(text)]
        out += [(name, m.group(1)) for m in BARE_MD.finditer(text) if m.group(1) not in WRITTEN_FILES]
    return out


def _exists(path: str) -> bool:
    if "/" not in path:  # a bare doc name: top level or docs/
        return path in TRACKED or f"docs/{path}" in TRACKED
    return path in TRACKED or any(f.startswith(path.rstrip("/") + "/") for f in TRACKED)


def test_every_cited_file_is_in_the_repo():
    cited = _cited()
    assert any(path == "docs/algorithms.md" for _, path in cited)  # the scan sees the citations
    missing = sorted({f"{where}: {path}" for where, path in cited if not _exists(path)})
    assert missing == [], "cited but not in the repo (a clone has no ../shared):\n" + "\n".join(missing)


def test_every_cited_section_is_a_heading_of_its_doc():
    bad, seen = [], 0
    for name in TEXT_FILES:
        for m in SECTION.finditer((ROOT / name).read_text(errors="ignore")):
            doc = m.group(1) if "/" in m.group(1) or m.group(1) in TRACKED else f"docs/{m.group(1)}"
            if doc not in TRACKED:
                continue  # the file itself is checked above
            seen += 1
            headings = re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(), re.M)
            if not any(h.startswith(m.group(2)) for h in headings):
                bad.append(f'{name}: {doc}, "{m.group(2)}"')
    assert seen > 0
    assert bad == [], "sections cited but not in their doc:\n" + "\n".join(bad)


def test_tables_doc_is_generated_from_tables_yaml():
    script = _load_tables_doc_script()
    current = TABLES_DOC.read_text()
    wanted = script.expected_doc(current, (ROOT / "schemas" / "tables.yaml").read_text())
    assert current == wanted, "docs/tables.md is out of date: run python scripts/tables_doc.py"


def _fields(schema_fields, prefix=""):
    for field in schema_fields:
        yield prefix + field.name
        kind = field.type
        if pa.types.is_list(kind) and pa.types.is_struct(kind.value_type):
            yield from _fields(kind.value_type, prefix + field.name + "[].")
        elif pa.types.is_struct(kind):
            yield from _fields(kind, prefix + field.name + ".")


def test_tables_doc_lists_every_table_and_column_of_the_schema():
    # Read through recpipe.schema (what the writers use), not through the generator's own parsing.
    text = TABLES_DOC.read_text()
    sections = dict(re.findall(r"^### (\w+)\n(.*?)(?=^### |\Z)", text, re.M | re.S))
    assert list(sections)[: len(table_names())] == table_names()
    for table in table_names():
        listed = re.findall(r"^\| `([\w.\[\]]+)` \| `([^`]+)` \| (yes|no) \|", sections[table], re.M)
        schema = table_schema(table)
        assert [name for name, _, _ in listed] == list(_fields(schema)), table
        top = {name: nullable for name, _, nullable in listed if "." not in name}
        assert top == {f.name: "yes" if f.nullable else "no" for f in schema}, table


def test_tables_doc_sql_examples_run(tmp_path):
    blocks = re.findall(r"^```sql\n(.*?)^```$", TABLES_DOC.read_text(), re.M | re.S)
    assert len(blocks) >= 4
    con = Store.create(tmp_path / "store").connect(read_only=True)
    for sql in blocks:
        # An empty store still binds every table and column the query names: a typo fails here.
        assert con.execute(sql).fetchall() == [], sql


@pytest.mark.parametrize("doc", sorted(f for f in TRACKED if f.startswith("docs/") and f.endswith(".md")))
def test_docs_are_listed_in_the_readme(doc):
    assert doc in (ROOT / "README.md").read_text()


# ---- docs/architecture.md, "Layers": every import in recpipe/ and flows/ points down (or sideways)

def _layers() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \| .+ \|$", section, re.M)
    return {name: int(layer) for layer, names in rows for name in re.findall(r"`([\w.]+)`", names)}


def _group(module: str, layers: dict[str, int]) -> str | None:
    """The layers-table entry of a dotted module name (the most specific one listed); None outside recpipe."""
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if parts[0] != "recpipe":
        return None
    for n in range(len(parts), 1, -1):
        if ".".join(parts[1:n]) in layers:
            return ".".join(parts[1:n])
    return parts[1] if len(parts) > 1 else "recpipe"


def _imports(path: Path) -> list[tuple[int, str]]:
    import ast

    tree = ast.parse(path.read_text())
    types_only = {id(n) for node in ast.walk(tree)
                  if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in types_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module in ("recpipe", "flows"):  # from recpipe import store: the submodule
                package = ROOT / node.module
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                        if (package / a.name).is_dir() or (package / f"{a.name}.py").is_file()]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_imports_follow_the_layers_of_the_architecture_doc():
    layers = _layers()
    assert layers["errors"] == 0 and layers["cli"] == max(layers.values())
    stale = [name for name in layers if name not in ("recpipe", "flows")
             and not (ROOT / "recpipe" / name.replace(".", "/")).is_dir()
             and not (ROOT / "recpipe" / (name.replace(".", "/") + ".py")).is_file()]
    assert stale == [], f"the Layers table of docs/architecture.md names modules that do not exist: {stale}"
    sources = sorted([*(ROOT / "recpipe").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])
    unplaced, upward = set(), []
    for path in sources:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        src = _group(module, layers)
        for line, target in _imports(path):
            dst = _group(target, layers)
            if dst is None or dst == src:
                continue  # outside recpipe, or inside one module group
            for name in (src, dst):
                if name not in layers:
                    unplaced.add(name)
            if src in layers and dst in layers and layers[dst] > layers[src]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {src} (layer {layers[src]}) imports {target} "
                              f"(layer {layers[dst]})")
    assert not unplaced, f"modules missing from the Layers table of docs/architecture.md: {sorted(unplaced)}"
    assert upward == [], "imports that point up a layer:\n" + "\n".join(upward)


def test_every_cited_function_is_defined_where_the_docs_say():
    # `recpipe/<module>.py: name` in a doc: the file defines name (a def, a class or an assignment).
    cited = [(doc, path, name) for doc in TEXT_FILES if doc.endswith(".md")
             for path, name in re.findall(r"`((?:recpipe|flows)/[\w/]+\.py): (\w+)`", (ROOT / doc).read_text())]
    assert ("docs/algorithms.md", "recpipe/algorithms/losses.py", "policy_loss") in cited
    wrong = [f"{doc}: {path}: {name}" for doc, path, name in cited
             if not (ROOT / path).is_file()
             or not re.search(rf"^\s*(?:def|class) {name}\b|^\s*{name}\b[^=\n]*=", (ROOT / path).read_text(), re.M)]
    assert wrong == [], "cited but not defined there:\n" + "\n".join(wrong)
