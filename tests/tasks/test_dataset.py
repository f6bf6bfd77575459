"""The ``dataset`` task: prompts and answers from JSONL, CSV, Parquet or a save_to_disk folder."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recpipe.tasks import DatasetTask, get_task, score_responses

ROWS = [{"question": f"What is {a} + {b}?", "solution": f"{a} plus {b}. #### {a + b}", "uid": f"q{a}"}
        for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (20, 22), (2, 9), (6, 1), (8, 8), (30, 3), (4, 4)]]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_each_file_format_gives_the_same_prompts(tmp_path, suffix):
    path = write(tmp_path / f"qa{suffix}", ROWS)
    task = get_task("dataset", path=str(path), answer_column="solution", id_column="uid",
                    template="{question}\nEnd with #### <number>.", system="Be brief.")
    train, test = task.prompts("train", seed=None), task.prompts("test", seed=None)
    assert len(train) == 9 and len(test) == 1  # test_fraction 0.1
    first = next(p for p in train + test if p.prompt_id == "dataset-q1")
    assert first.messages == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is 1 + 2?\nEnd with #### <number>."}]
    assert first.answer == "3"  # "#### 3" solutions reduced to the answer
    assert task.match == "number"
    again = DatasetTask(path=write(tmp_path / f"reversed{suffix}", ROWS[::-1]), answer_column="solution",
                        id_column="uid")
    assert [p.prompt_id for p in again.prompts("test")] == [p.prompt_id for p in test]  # not by row order


def test_save_to_disk_folders_are_read_with_their_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list([{"problem": r["question"], "answer": r["solution"]} for r in ROWS])
    data.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": data.select(range(8)), "validation": data.select([8, 9])}).save_to_disk(
        str(tmp_path / "dict"))
    one = get_task("dataset", path=str(tmp_path / "one"))  # columns found: problem, answer
    assert len(one.prompts("train")) + len(one.prompts("test")) == 10
    both = get_task("dataset", path=str(tmp_path / "dict"))
    assert sorted(p.answer for p in both.prompts("test")) == ["33", "8"]
    assert len(both.prompts("train", limit=3)) == 3


def test_chat_messages_column_and_split_column(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris", "split": "train"},
            {"prompt": [{"role": "user", "content": "Half of one?"}], "answer": "\\frac{1}{2}", "split": "test"},
            {"prompt": [{"role": "user", "content": "Capital of Italy?"}], "answer": "Rome", "split": "train"}]
    task = get_task("dataset", path=str(write(tmp_path / "chat.jsonl", rows)), split_column="split")
    assert task.match == "math"  # not every answer is a number
    [test] = task.prompts("test")
    assert test.messages == [{"role": "user", "content": "Half of one?"}]
    responses = ["so it is $\\boxed{0.5}$", "The answer is 1/2", "The answer is 2", "1/3"]
    got = [(r.correctness, r.format) for r in score_responses(task, [test] * 4, responses)]
    assert got == [(1.0, 0.1), (1.0, 0.1), (0.0, 0.1), (0.0, -0.1)]
    paris = next(p for p in task.prompts("train") if p.answer == "Paris")
    assert task.score(paris, "It is\nThe answer is paris.").correctness == 1.0
    assert task.score(paris, "London").correctness == 0.0


def test_number_and_text_matching(tmp_path):
    task = get_task("dataset", path=str(write(tmp_path / "qa.jsonl", ROWS)), answer_column="solution")
    prompt = next(p for p in task.prompts("train") + task.prompts("test") if p.answer == "42")
    cases = {"20 + 22 = 42\n#### 42": (1.0, 0.1), "\\boxed{42}": (1.0, 0.1), "It is 42": (1.0, -0.1),
             "#### 41": (0.0, 0.1), "": (0.0, -0.1)}
    for response, want in cases.items():
        result = task.score(prompt, response)
        assert (result.correctness, result.format) == want, response
    words = [{"q": "Colour of the sky?", "a": "Blue"}, {"q": "Opposite of up?", "a": "down"}]
    text = get_task("dataset", path=str(write(tmp_path / "w.jsonl", words)), prompt_column="q",
                    answer_column="a", match="text")
    sky = next(p for p in text.prompts("train") + text.prompts("test") if p.answer == "Blue")
    assert text.score(sky, "Clearly.\nAnswer: blue.").correctness == 1.0
    assert text.score(sky, "Answer: light blue").correctness == 0.0
    with pytest.raises(ValueError, match=r"no prompt_column given and none of .* the data has \['q', 'a'\]"):
        get_task("dataset", path=str(tmp_path / "w.jsonl"))


@pytest.mark.parametrize(("options", "message"), [
    ({"path": "missing.jsonl"}, "does not exist"),
    ({"answer_column": "nope"}, "answer_column='nope' is not a column; the data has"),
    ({"template": "{question} {missing}", "answer_column": "solution"}, "template="),
    ({"match": "fuzzy", "answer_column": "solution"}, "match='fuzzy'"),
])
def test_bad_options_say_what_to_fix(tmp_path, options, message):
    path = write(tmp_path / "qa.jsonl", ROWS)
    with pytest.raises(ValueError, match=message):
        get_task("dataset", **{"path": str(path), **options} if "path" not in options else
                 {**options, "path": str(tmp_path / options["path"])})


def test_the_chat_template_of_the_model_wraps_the_prompts(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from recpipe.generate import tokenize_prompts

    task = get_task("dataset", path=str(write(tmp_path / "qa.csv", ROWS)), answer_column="solution",
                    system="Be brief.")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    [ids] = tokenize_prompts(tokenizer, task.prompts("test"))
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is ")
    assert text.endswith("<|im_start|>assistant\n")


QA = [{"question": "What is 3 + 4?", "answer": "7"}, {"question": "What is 10 - 2?", "answer": "8"},
      {"question": "What is 2 + 2?", "answer": "4"}]


@pytest.fixture
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize(("chat_template", "rendered"), [
    ("Q: {{ messages[-1]['content'] }}\nA:", "Q: {q}\nA:"),
    ("none", "Be brief.\n\n{q}"),  # the raw text: the messages' contents, no special tokens
    ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}[assistant]{% endif %}", "<|im_start|>[system] Be brief.\n[user] {q}\n[assistant]"),
])
def test_a_chat_template_of_the_task_makes_the_prompt_token_ids(tmp_path, tiny_tokenizer, chat_template, rendered):
    from recpipe.generate.rollouts import prompt_token_ids

    task = get_task("dataset", path=str(write(tmp_path / "qa.jsonl", QA)), system="Be brief.",
                    chat_template=chat_template)
    prompts = task.prompts("train", seed=None)
    for prompt, ids in zip(prompts, prompt_token_ids(tiny_tokenizer, task, prompts), strict=True):
        text = rendered.format(q=prompt.messages[-1]["content"])
        assert ids == tiny_tokenizer(text, add_special_tokens=False).input_ids
        assert tiny_tokenizer.decode(ids) == text


def test_a_chat_template_file_reaches_the_rollouts_and_the_weighted_rewards(tmp_path, tiny_model, tiny_tokenizer):
    from recpipe.generate import evaluate_greedy, generate_rollouts, make_engine

    template = tmp_path / "plain.jinja"
    template.write_text("Question: {{ messages[-1]['content'] }}\nAnswer:")
    task = get_task("dataset", path=str(write(tmp_path / "qa.jsonl", QA)), chat_template=str(template),
                    reward_funcs=["task"])  # wrapped in WeightedRewards: the template goes with the task
    assert task.chat_template == template.read_text()
    prompts = task.prompts("train", seed=None)
    engine = make_engine(tiny_model, backend="hf", seed=0)
    try:
        rows = generate_rollouts(engine, task, prompts, run="r", policy_version=0, shard_id="s", n=1,
                                 temperature=1.0, top_p=1.0, max_tokens=2, seed=0).to_pylist()
        assert evaluate_greedy(engine, task, prompts, max_tokens=2)[2] == len(prompts)
    finally:
        engine.close()
    by_id = {p.prompt_id: p for p in prompts}
    for row in rows:
        text = f"Question: {by_id[row['prompt_id']].messages[-1]['content']}\nAnswer:"
        assert row["prompt_token_ids"] == tiny_tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize(("chat_template", "message"), [
    ("chatml", "neither a file nor a Jinja template"),
    ("{% for m in messages %}{{ m['content'] }}", "chat_template: line 1: .*endfor"),
    ("", "expected a Jinja template"),
])
def test_a_bad_chat_template_is_refused_when_the_task_is_made(tmp_path, chat_template, message):
    with pytest.raises(ValueError, match=message):
        get_task("dataset", path=str(write(tmp_path / "qa.jsonl", QA)), chat_template=chat_template)
