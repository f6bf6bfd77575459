"""The arithmetic task: seeded, deterministic, disjoint splits; rewards on good, bad and hostile answers."""

import pytest

from recpipe.tasks import ArithmeticTask, Prompt, get_task
from recpipe.tasks.arithmetic import extract_answer

SEVEN = Prompt(prompt_id="add_3_4", messages=[{"role": "user", "content": "What is 3 + 4?"}], answer="7")


def test_prompts_are_deterministic_and_seeded():
    task = get_task("arithmetic")
    first = task.prompts("train", limit=10, seed=1)
    assert first == get_task("arithmetic").prompts("train", limit=10, seed=1)
    assert first != task.prompts("train", limit=10, seed=2)
    # The seed orders a fixed split: same problems, same ids.
    assert {p.prompt_id for p in task.prompts("train", seed=1)} == {
        p.prompt_id for p in task.prompts("train", seed=2)
    }
    assert task.prompts("train", limit=3, seed=5) == task.prompts("train", seed=5)[:3]
    unordered = task.prompts("train", seed=None)
    assert unordered == sorted(unordered, key=lambda p: tuple(int(x) for x in p.prompt_id.split("_")[1:]))


def test_default_prompt_text_and_answers():
    task = get_task("arithmetic")
    prompts = task.prompts("train", seed=0)
    assert len(prompts) == 80 and len(task.prompts("test")) == 20
    for p in prompts:
        _, a, b = p.prompt_id.split("_")
        assert 1 <= int(a) <= 10 and 1 <= int(b) <= 10
        assert p.messages == [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}]
        assert p.answer == str(int(a) + int(b))


def test_splits_are_disjoint_and_cover_the_pairs():
    task = ArithmeticTask()
    train = {p.prompt_id for p in task.prompts("train")}
    test = {p.prompt_id for p in task.prompts("test")}
    assert not train & test
    assert len(train | test) == 100  # every ordered pair of 1..10 exactly once
    other = ArithmeticTask(split_seed=1)
    assert {p.prompt_id for p in other.prompts("test")} != test


def test_mul_and_wide_range():
    task = get_task("arithmetic", operation="mul", low=2, high=12, n_train=50, n_test=10)
    for p in task.prompts("test"):
        _, a, b = p.prompt_id.split("_")
        assert " * " in p.messages[0]["content"] and p.answer == str(int(a) * int(b))
    wide = ArithmeticTask(low=1, high=10**6, n_train=1000, n_test=100)
    assert len({p.prompt_id for p in wide.prompts("train")}) == 1000


def test_chained_operations_follow_precedence_and_split_without_overlap():
    task = ArithmeticTask(operation="mul-add", low=1, high=20, n_train=4000, n_test=400)
    test = task.prompts("test", seed=None)
    train = task.prompts("train", seed=0)
    assert len(test) == 400 and len(train) == 4000
    assert not {p.prompt_id for p in test} & {p.prompt_id for p in train}
    for p in test[:50] + train[:50]:
        op, a, b, c = p.prompt_id.split("_")
        assert op == "mul-add" and all(1 <= int(x) <= 20 for x in (a, b, c))
        assert p.messages[0]["content"] == f"What is {a} * {b} + {c}? Answer with just the number."
        assert p.answer == str(int(a) * int(b) + int(c))
    assert task.prompts("train", limit=7, seed=3) == ArithmeticTask(
        operation="mul-add", low=1, high=20, n_train=4000, n_test=400).prompts("train", limit=7, seed=3)
    # * binds tighter wherever it stands; - subtracts (answers may be negative).
    for operation, values, text, answer in [
        ("add-mul", (2, 3, 4), "What is 2 + 3 * 4?", "14"),
        ("sub-mul", (2, 3, 4), "What is 2 - 3 * 4?", "-10"),
        ("add-add", (1, 2, 3), "What is 1 + 2 + 3?", "6"),
        ("sub-add-mul", (9, 3, 2, 5), "What is 9 - 3 + 2 * 5?", "16"),
        ("sub", (3, 7), "What is 3 - 7?", "-4"),
    ]:
        prompt = ArithmeticTask(operation=operation, n_train=0, n_test=1)._prompt(values)
        assert prompt.messages[0]["content"].startswith(text) and prompt.answer == answer, operation
    # A three-operand space is width ** 3: 1..10 holds 1000 triples, sorted like tuples when unshuffled.
    small = ArithmeticTask(operation="add-add", n_train=990, n_test=10)
    ids = [tuple(map(int, p.prompt_id.split("_")[1:])) for p in small.prompts("train", seed=None)]
    assert ids == sorted(ids) and len(set(ids)) == 990


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"operation": "div"}, "operation"),
        ({"operation": "add-div"}, "operation"),
        ({"operation": "add-add-add-add"}, "operation"),
        ({"operation": "add-add", "n_train": 1000, "n_test": 1}, "n_train"),
        ({"low": 5, "high": 1}, "low"),
        ({"n_train": 100, "n_test": 1}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"low": 1.5}, "low"),
    ],
)
def test_bad_options_raise_value_error_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        ArithmeticTask(**options)


def test_bad_prompts_arguments():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="split='dev'"):
        task.prompts("dev")
    with pytest.raises(ValueError, match="limit=-1"):
        task.prompts("train", limit=-1)


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("7", 1.1),  # bare number: right and well formatted
        ("7.", 1.1),
        ("  7\n", 1.1),
        ("The answer is 7.", 0.9),  # right, free text
        ("3 + 4 = 7", 0.9),
        ("What is 3 + 4? 3 + 4 is 7.", 0.9),  # the echoed "is 3 + 4" is an expression, skipped
        ("Adding 3 and 4 gives 7.", 0.9),
        ("Answer: **7**", 0.9),
        ("The answer is 7. Check: 7 - 4 = 3.", 0.9),  # the answer cue wins over a later "= 3"
        ("I count 3, 4, 5, 6, 7", 0.9),  # no cue: the last number
        ("8", 0.1),  # wrong, well formatted
        ("The answer is 8.", -0.1),
        ("3 + 4 = 8", -0.1),
        ("7 8", -0.1),  # malformed: two numbers, the last one is taken
        ("seven", -0.1),
        ("", -0.1),
        ("   ", -0.1),
        ("None", -0.1),
        ("٧", -0.1),  # Arabic-Indic seven: not an ASCII number
        ("The answer is ٧", -0.1),
        ("７", -0.1),  # full-width seven
    ],
)
def test_rewards(response, reward):
    result = ArithmeticTask().score(SEVEN, response)
    assert result.reward == pytest.approx(reward)
    assert result.error is None
    assert result.reward == pytest.approx(result.correctness + result.format)


def test_number_forms_match_the_gold_answer():
    gold = Prompt(prompt_id="mul_1234_1", messages=[], answer="1234")
    for response in ["1,234", "$1234", "1234.0", "The answer is 1,234.00."]:
        assert ArithmeticTask().score(gold, response).correctness == 1.0, response
    negative = Prompt(prompt_id="x", messages=[], answer="-3")
    assert ArithmeticTask().score(negative, "-3").reward == pytest.approx(1.1)
    assert ArithmeticTask().score(negative, "3").correctness == 0.0


def test_gold_answer_is_compared_in_canonical_form():
    task = ArithmeticTask()
    assert task.score(Prompt("p", [], "1,234.0"), "1234").reward == pytest.approx(1.1)
    with pytest.raises(ValueError, match="prompt.answer='seven'"):
        task.score(Prompt("p", [], "seven"), "7")


def test_code_like_text_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    task = ArithmeticTask()
    for response in [
        f"__import__('pathlib').Path({str(marker)!r}).write_text('x')",
        "__import__('os').system('rm -rf /')",
        "eval('3+4')",
        "The answer is {{7}} ${__import__('os').getcwd()}",
    ]:
        result = task.score(SEVEN, response)
        assert result.format == -0.1 and result.error is None
    assert not marker.exists()
    assert task.score(SEVEN, "eval('3+4')").correctness == 0.0  # "3+4" is text, not 7


def test_hostile_sizes_are_bounded():
    task = ArithmeticTask()
    ten_mb = 10 * 1024 * 1024
    assert task.score(SEVEN, "9" * ten_mb).reward == pytest.approx(-0.1)
    assert task.score(SEVEN, " " * ten_mb + "7").reward == pytest.approx(1.1)  # the tail is parsed
    assert task.score(SEVEN, "7" + " " * ten_mb).reward == pytest.approx(1.1)  # and the head
    # The middle of a long response is skipped (answers.MAX_PARSE_CHARS): documented bound, no answer.
    assert task.score(SEVEN, " " * ten_mb + "7" + " " * ten_mb).reward == pytest.approx(-0.1)
    assert task.score(SEVEN, "The answer is 7. " + "blah " * (ten_mb // 5)).reward == pytest.approx(0.9)
    for junk in ["1,234" * (ten_mb // 5), "=" * ten_mb, "answer is " * (ten_mb // 10), "-$" * (ten_mb // 2)]:
        assert task.score(SEVEN, junk).correctness == 0.0
    huge = "1" + "0" * 5000
    assert task.score(Prompt("h", [], huge), huge).reward == pytest.approx(1.1)
    assert task.score(SEVEN, "1" + "0" * 100_000).correctness == 0.0


def test_non_text_response_raises_value_error():
    with pytest.raises(ValueError, match="NoneType"):
        ArithmeticTask().score(SEVEN, None)
    with pytest.raises(ValueError, match="bytes"):
        ArithmeticTask().score(SEVEN, b"7")


def test_extract_answer_none_without_numbers():
    assert extract_answer("no digits here") is None
