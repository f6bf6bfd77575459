"""GSM8K: gold answers of the real bundled files, prompts, rewards, data_dir."""

import json
import shutil
from pathlib import Path

import pytest

from recpipe.tasks import GSM8KTask, Prompt, get_task
from recpipe.tasks.gsm8k import default_data_dir, extract_answer, gold_answer, has_final_line, load_split

DATA = Path(__file__).resolve().parents[2] / "data" / "gsm8k"


def test_bundled_data_is_found_and_licensed():
    assert default_data_dir() == DATA
    assert "MIT License" in (DATA / "LICENSE").read_text()


@pytest.mark.parametrize(("split", "n_rows", "first_answer"), [("train", 7473, "72"), ("test", 1319, "18")])
def test_gold_answers_of_the_real_files(split, n_rows, first_answer):
    rows = load_split(DATA / f"{split}.jsonl")
    assert len(rows) == n_rows
    assert rows[0][1] == first_answer
    raw = [json.loads(line) for line in (DATA / f"{split}.jsonl").open()]
    for (question, gold), record in zip(rows, raw, strict=True):
        assert question == record["question"]
        assert gold == record["answer"].rpartition("####")[2].strip().replace(",", "")
    # The reference solution itself is a perfect response: right number and "#### N" as its last line.
    task = GSM8KTask()
    prompts = task.prompts(split, seed=None)
    assert all(
        task.score(p, r["answer"]).reward == pytest.approx(1.1) for p, r in zip(prompts, raw, strict=True)
    )


def test_gold_answer_parsing():
    assert gold_answer("a\n#### 1,234") == "1234"
    assert gold_answer("#### 3 #### -5") == "-5"
    for bad in ["no marker 5", "#### five", "#### 3 apples"]:
        with pytest.raises(ValueError, match="answer="):
            gold_answer(bad)


def test_prompts_deterministic_seeded_and_ids():
    task = get_task("gsm8k")
    first = task.prompts("test", limit=5, seed=3)
    assert first == get_task("gsm8k").prompts("test", limit=5, seed=3)
    assert first != task.prompts("test", limit=5, seed=4)
    in_order = task.prompts("test", limit=2, seed=None)
    assert [p.prompt_id for p in in_order] == ["gsm8k-test-00000", "gsm8k-test-00001"]
    content = in_order[0].messages[0]["content"]
    assert content.startswith("Janet’s ducks lay 16 eggs") and content.endswith('as "#### <number>".')
    assert in_order[0].answer == "18"
    train_ids = {p.prompt_id for p in task.prompts("train")}
    assert len(train_ids) == 7473 and not train_ids & {p.prompt_id for p in task.prompts("test")}


EIGHTEEN = Prompt(prompt_id="gsm8k-test-00000", messages=[], answer="18")


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("16 - 3 - 4 = 9 eggs. 9 * 2 = 18.\n#### 18", 1.1),
        ("9 * $2 = $18\nThe answer is 18.", 1.1),
        ("...\nThe final answer is $18", 1.1),
        ("...\n####18", 1.1),
        ("She makes 9 * 2 = 18 dollars.", 0.9),  # right, no final line: last number
        ("#### 18\nI hope this helps, 5 stars!", 0.9),  # "####" wins over a later number; not the last line
        ("The answer is 18, not 20.", 0.9),
        ("18", 0.9),  # bare number is not the gsm8k format
        ("#### 20", 0.1),  # wrong, well formatted
        ("9 * 2 = 18, plus 2 is 20.", -0.1),
        ("", -0.1),
        ("#### ١٨", -0.1),  # Arabic-Indic digits are not an answer
        ("__import__('os').system('rm -rf /')", -0.1),
    ],
)
def test_rewards(response, reward):
    result = GSM8KTask().score(EIGHTEEN, response)
    assert result.reward == pytest.approx(reward)
    assert result.error is None


def test_hostile_sizes_are_bounded():
    task = GSM8KTask()
    ten_mb = 10 * 1024 * 1024
    assert task.score(EIGHTEEN, "x" * ten_mb + "\n#### 18").reward == pytest.approx(1.1)
    assert task.score(EIGHTEEN, "\n" * ten_mb).reward == pytest.approx(-0.1)
    assert task.score(EIGHTEEN, "#### " * (ten_mb // 5)).reward == pytest.approx(-0.1)
    assert task.score(EIGHTEEN, "#### 1" + "0" * 5000).reward == pytest.approx(0.1)
    assert extract_answer("no numbers") is None and not has_final_line("")


def test_data_dir_option(tmp_path):
    for split in ("train", "test"):
        shutil.copy(DATA / f"{split}.jsonl", tmp_path / f"{split}.jsonl")
    assert get_task("gsm8k", data_dir=str(tmp_path)).prompts("test", limit=1, seed=None)[0].answer == "18"
    with pytest.raises(ValueError, match="data_dir="):
        GSM8KTask(data_dir=tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match="test.jsonl:2"):
        GSM8KTask(data_dir=bad).prompts("test")
