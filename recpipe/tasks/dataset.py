"""Your own prompts and answers from a file, without writing code: the ``dataset`` task.

    recpipe loop --task dataset --set task.options.path=qa.jsonl
    get_task("dataset", path="qa.csv", prompt_column="question", answer_column="solution",
             template="{question}\\nPut the final answer in \\\\boxed{{}}.", system="You are a careful solver.")

Files: JSON lines (.jsonl / .json), CSV (.csv), Parquet (.parquet), or a Hugging Face ``datasets``
folder written by ``save_to_disk`` (a Dataset, or a DatasetDict with train/test splits), read with
pyarrow directly (no ``datasets`` needed).

Columns: ``prompt_column`` (default: the first of prompt, question, problem, input) holds the text that
``template`` wraps ("{prompt}" by default; any column can be named, ``{{ }}`` for literal braces), or a
list of chat messages ([{"role": "user", "content": ...}], TRL's conversational format), used as is.
``answer_column`` (default: the first of answer, solution, target, output) holds the gold answer; a
solution ending in "#### 42" (GSM8K) or holding ``\\boxed{...}`` (MATH) is reduced to that answer.
``id_column`` names a stable id; without it a prompt's id is a hash of its text (same problem, same id).

Chat template: ``chat_template`` (default: the model's own) replaces the model's when the generator turns
a prompt's messages into token ids: a Jinja template in the Hugging Face format (``messages``,
``add_generation_prompt``, ``bos_token``...), or the path of a file holding one, or "none" for the raw
prompt text (the messages' contents joined by blank lines, no special tokens: base models).

Splits: a DatasetDict's "train" and "test" (or "validation"); else ``test_path`` (a second file); else
``split_column`` (rows whose value is "test"); else a fixed ``test_fraction`` of the prompts, chosen by
the hash of their ids (so the split does not depend on the file's row order).

Reward (RewardResult.from_parts: correctness 1/0, format +-0.1), by ``match``:
- "number": the final number of the response (``\\boxed{}``, "####", "the answer is", else the last
  number; answers.py rules) equals the gold number; format: the answer is marked (boxed or a final
  "#### N" / "The answer is N" line).
- "text": the marked answer (``\\boxed{}``, "####", "answer:"/"answer is", else the last non-empty
  line), case- and space-normalised, equals the gold text; format: the answer is marked.
- "math": Hugging Face math-verify (LaTeX, fractions, sets, ``\\boxed{}``; recpipe.tasks.math_reward).
- "auto" (default): "number" when every gold answer is a number, else "math".
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from recpipe.tasks import answers, gsm8k
from recpipe.tasks.base import Prompt, RewardResult, TaskError, check_prompts_args, check_response

PROMPT_COLUMNS = ("prompt", "question", "problem", "input")
ANSWER_COLUMNS = ("answer", "solution", "target", "output")
MATCHES = ("auto", "number", "text", "math")
_BOXED = "\\boxed{"
# chat_template="none": the prompt text as written (a Jinja string literal, so trim_blocks keeps the blank line)
RAW_TEMPLATE = "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}{% endfor %}"
_TEXT_CUE = re.compile(r"(?:####|\banswer\s*(?:is|:)\s*)(?P<answer>[^\n]*)$", re.IGNORECASE)


def read_table(path: Path) -> dict[str, pa.Table]:
    """The rows of a data file or save_to_disk folder, by split ("all" when the source has no splits)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TaskError(f"path={str(path)!r} does not exist")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pj

            table = pj.read_json(path)
        elif suffix == ".csv":
            import csv

            import pyarrow.csv as pc

            # Every column as text: "007" or "1,234" stay what the file says.
            with open(path, newline="", encoding="utf-8") as f:
                names = next(csv.reader(f), [])
            table = pc.read_csv(path, convert_options=pc.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            raise TaskError(f"path={str(path)!r}: expected a .jsonl, .json, .csv or .parquet file, or a "
                             "folder written by datasets' save_to_disk")
    except pa.ArrowInvalid as exc:
        raise TaskError(f"path={str(path)!r}: cannot read it ({exc})") from None
    return {"all": table}


def _read_arrow_files(folder: Path) -> pa.Table:
    """A save_to_disk Dataset folder: state.json lists its Arrow stream files."""
    state = json.loads((folder / "state.json").read_text())
    tables = []
    for entry in state["_data_files"]:
        with pa.OSFile(str(folder / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    if state.get("_indices_data_files"):  # never written by save_to_disk (it flattens), but say so if seen
        raise TaskError(f"{folder}: an indices mapping is not supported; save it with flatten_indices() first")
    return pa.concat_tables(tables) if tables else pa.table({})


def _read_saved_dataset(folder: Path) -> dict[str, pa.Table]:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        return {split: _read_arrow_files(folder / split) for split in splits}
    if (folder / "state.json").is_file():
        return {"all": _read_arrow_files(folder)}
    raise TaskError(f"path={str(folder)!r} is a folder but not one datasets' save_to_disk wrote "
                     "(no dataset_dict.json or state.json)")


def gold_text(answer: Any) -> str:
    """A gold answer as text: "#### 42" solutions (GSM8K) and \\boxed{...} ones (MATH) reduced to the answer."""
    text = answer if isinstance(answer, str) else json.dumps(answer) if isinstance(answer, list | dict) else str(answer)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    head, sep, tail = text.rpartition("####")
    return tail.strip() if sep else text.strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, min(len(text), i + answers.MAX_PARSE_CHARS)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalise(text: str) -> str:
    """Case, spacing and a trailing "." do not count; nor LaTeX text wrappers and $ delimiters."""
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).replace("$", "")
    return " ".join(text.casefold().split()).rstrip(".").strip()


def marked_answer(response: str) -> tuple[str | None, bool]:
    """The answer a response marks (boxed, "####", "answer is"/"answer:" on its last line), and whether it
    marked one; else its last non-empty line, unmarked."""
    text = answers.clip(response)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, True
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None, False
    cue = _TEXT_CUE.search(lines[-1])
    return (cue.group("answer"), True) if cue else (lines[-1], False)


def _column(table: pa.Table, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in table.column_names:
            raise TaskError(f"{what}={given!r} is not a column; the data has {table.column_names}")
        return given
    for name in candidates:
        if name in table.column_names:
            return name
    raise TaskError(f"no {what} given and none of {list(candidates)} is a column; the data has "
                     f"{table.column_names}: pass task.options.{what}=NAME")


def load_chat_template(spec: str) -> str:
    """The Jinja source ``chat_template`` names: "none" (RAW_TEMPLATE), a file, or a template itself."""
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"chat_template={spec!r}: expected a Jinja template, the path of a file holding one, "
                         "or 'none' for the raw prompt text")
    if spec.strip().lower() == "none":
        return RAW_TEMPLATE
    if "{{" in spec or "{%" in spec:
        source = spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TaskError(f"chat_template={spec!r}: neither a file nor a Jinja template (no {{{{ }}}} or "
                             "{% %}); pass a template, the path of a .jinja file, or 'none'")
        source = path.read_text(encoding="utf-8")
    import jinja2

    try:
        jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TaskError(f"chat_template: line {exc.lineno}: {exc.message}") from None
    return source


@dataclass(frozen=True)
class DatasetTask:
    """Prompts and gold answers from a file (see the module docstring for every option)."""

    path: Path
    prompt_column: str | None = None
    answer_column: str | None = None
    id_column: str | None = None
    template: str = "{prompt}"
    system: str | None = None
    match: str = "auto"
    test_path: Path | None = None
    split_column: str | None = None
    test_fraction: float = 0.1
    name: str = "dataset"
    chat_template: str | None = None  # after __post_init__: the Jinja source (RAW_TEMPLATE for "none"), or None
    _splits: dict[str, list[Prompt]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise TaskError(f"match={self.match!r}: expected one of {list(MATCHES)}")
        if not (isinstance(self.test_fraction, int | float) and 0 < self.test_fraction < 1):
            raise TaskError(f"test_fraction={self.test_fraction!r}: expected a number between 0 and 1")
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", load_chat_template(self.chat_template))
        sources = read_table(self.path)
        if self.test_path is not None:
            if "all" not in sources:
                raise TaskError("test_path: the data already has splits (a DatasetDict); give one or the other")
            sources = {"train": sources["all"], "test": read_table(self.test_path).get("all")}
        splits = self._split(sources)
        for split in ("train", "test"):
            if not splits[split]:
                raise TaskError(f"{self.path}: no {split} prompts (rows: "
                                 f"{ {k: len(v) for k, v in splits.items()} })")
        object.__setattr__(self, "_splits", splits)
        if self.match == "auto":
            numeric = all(answers.canonical_number(p.answer) is not None for ps in splits.values() for p in ps)
            object.__setattr__(self, "match", "number" if numeric else "math")
        if self.match == "math":
            from recpipe.tasks.math_reward import warm_up

            warm_up()

    def _split(self, sources: dict[str, pa.Table]) -> dict[str, list[Prompt]]:
        if "all" not in sources:  # a DatasetDict
            test_name = "test" if "test" in sources else "validation" if "validation" in sources else None
            if "train" not in sources or test_name is None:
                raise TaskError(f"{self.path}: a DatasetDict needs a train and a test (or validation) split; "
                                 f"it has {sorted(sources)}")
            return {"train": self._prompts(sources["train"]), "test": self._prompts(sources[test_name])}
        table = sources["all"]
        if self.split_column is not None:
            column = _column(table, self.split_column, (), "split_column")
            values = table.column(column).to_pylist()
            is_test = [str(v).strip().lower() in ("test", "validation", "eval") for v in values]
            prompts = self._prompts(table)
            return {"train": [p for p, t in zip(prompts, is_test, strict=True) if not t],
                    "test": [p for p, t in zip(prompts, is_test, strict=True) if t]}
        prompts = self._prompts(table)
        # The test prompts: a fixed fraction, by hash of the id (not by row order), at least one.
        ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.prompt_id.encode()).hexdigest())
        n_test = max(1, math.ceil(self.test_fraction * len(prompts))) if len(prompts) > 1 else 0
        test_ids = {p.prompt_id for p in ranked[:n_test]}
        return {"train": [p for p in prompts if p.prompt_id not in test_ids],
                "test": [p for p in prompts if p.prompt_id in test_ids]}

    def _prompts(self, table: pa.Table) -> list[Prompt]:
        prompt_col = _column(table, self.prompt_column, PROMPT_COLUMNS, "prompt_column")
        answer_col = _column(table, self.answer_column, ANSWER_COLUMNS, "answer_column")
        if self.id_column is not None:
            _column(table, self.id_column, (), "id_column")
        prompts = []
        for index, row in enumerate(table.to_pylist()):
            messages = self._messages(row, prompt_col, index)
            if self.id_column is not None:
                prompt_id = f"{self.name}-{str(row[self.id_column]).replace('/', '_')}"  # ids nest in group ids
            else:
                digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
                prompt_id = f"{self.name}-{digest}"
            if row[answer_col] is None:
                raise TaskError(f"{self.path}: row {index} has no {answer_col!r}")
            prompts.append(Prompt(prompt_id=prompt_id, messages=messages, answer=gold_text(row[answer_col])))
        return prompts

    def _messages(self, row: dict[str, Any], prompt_col: str, index: int) -> list[dict[str, Any]]:
        value = row[prompt_col]
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            messages = [{"role": m["role"], "content": m["content"]} for m in value]
        elif isinstance(value, str):
            try:
                content = self.template.format_map({**row, "prompt": value})
            except (KeyError, IndexError, ValueError) as exc:
                raise TaskError(f"template={self.template!r}: {type(exc).__name__}: {exc} (columns: "
                                 f"{sorted(row)}; write {{{{ and }}}} for literal braces)") from None
            messages = [{"role": "user", "content": content}]
        else:
            raise TaskError(f"{self.path}: row {index}: {prompt_col!r} is {type(value).__name__}; expected text or "
                             "a list of chat messages ({'role', 'content'})")
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        return messages

    def prompts(self, split: str, limit: int | None = None, seed: int | None = 0) -> list[Prompt]:
        """The split's prompts, shuffled by ``seed`` (None: file order), the first ``limit`` of them."""
        check_prompts_args(split, limit)
        prompts = list(self._splits[split])
        if seed is not None:
            random.Random(seed).shuffle(prompts)
        return prompts[:limit]

    def score(self, prompt: Prompt, response: str) -> RewardResult:
        text = check_response(response)
        if self.match == "math":
            from recpipe.tasks.math_reward import math_reward

            return math_reward(prompt, text)
        marked, formatted = marked_answer(text)
        if self.match == "number":
            boxed = last_boxed(answers.clip(text))
            found = answers.canonical_number(boxed) if boxed is not None else gsm8k.extract_answer(text)
            correct = found is not None and found == answers.canonical_number(prompt.answer)
            return RewardResult.from_parts(correct=correct, formatted=formatted or gsm8k.has_final_line(text))
        correct = marked is not None and normalise(marked) == normalise(prompt.answer)
        return RewardResult.from_parts(correct=correct, formatted=formatted)
