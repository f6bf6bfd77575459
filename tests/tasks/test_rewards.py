"""Weighted reward functions by "module:function" (TRL's reward_funcs / reward_weights) and math-verify."""

from __future__ import annotations

import pytest

from recpipe.tasks import Prompt, RewardTerm, get_task, score_responses
from recpipe.tasks.math_reward import math_reward

MODULE = '''
def brevity(prompt, response):
    return -len(response) / 100

def broken(prompt, response):
    raise RuntimeError("no")

def nan(prompt, response):
    return float("nan")
'''


@pytest.fixture
def my_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_weighted_sum_with_each_part_kept(my_rewards):
    task = get_task("arithmetic", reward_funcs=["task", f"{my_rewards}:brevity"], reward_weights=[1.0, 0.5])
    [prompt] = task.prompts("train", limit=1)
    own = get_task("arithmetic").score(prompt, prompt.answer)
    result = task.score(prompt, prompt.answer)
    brevity = -len(prompt.answer) / 100
    assert result.terms == (RewardTerm("task", 1.0, own.reward), RewardTerm(f"{my_rewards}:brevity", 0.5, brevity))
    assert result.as_row()["reward_terms"] == [{"name": "task", "weight": 1.0, "value": own.reward},
                                               {"name": f"{my_rewards}:brevity", "weight": 0.5, "value": brevity}]
    assert result.reward == pytest.approx(own.reward + 0.5 * brevity)
    assert (result.correctness, result.format) == (own.correctness, own.format)  # what evaluation counts
    assert task.name == "arithmetic" and task.prompts("test", limit=2) == get_task("arithmetic").prompts("test", limit=2)


def test_a_failing_reward_function_fails_that_response_only(my_rewards):
    task = get_task("arithmetic", reward_funcs=["task", f"{my_rewards}:broken"])
    prompts = task.prompts("train", limit=2)
    results = score_responses(task, prompts, [p.answer for p in prompts])
    assert all(r.error == "RuntimeError: no" and r.reward == 0.0 for r in results)
    assert all(r.as_row()["reward_terms"] == [] for r in results)  # no function's value: an empty sum
    bad = get_task("arithmetic", reward_funcs=[f"{my_rewards}:nan"])
    [result] = score_responses(bad, prompts[:1], ["1"])
    assert "returned nan, expected a finite number" in result.error


@pytest.mark.parametrize(("options", "message"), [
    ({"reward_funcs": ["task"], "reward_weights": [1, 2]}, "reward_weights has 2 entries, reward_funcs 1"),
    ({"reward_funcs": ["nowhere:fn"]}, "cannot import module 'nowhere'"),
    ({"reward_funcs": "task"}, "expected a non-empty list"),
    ({"reward_funcs": ["task", "task"]}, "names 'task' twice"),
    ({"reward_weights": [1.0]}, "reward_weights given without reward_funcs"),
])
def test_bad_reward_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        get_task("arithmetic", **options)


@pytest.mark.parametrize(("gold", "response", "correct"), [
    ("0.5", "so $\\boxed{\\frac{1}{2}}$", True),
    ("\\frac{3}{4}", "The answer is 0.75", True),
    ("(x+1)^2", "$\\boxed{x^2+2x+1}$", True),
    ("\\{1,2\\}", "\\boxed{\\{2, 1\\}}", True),
    ("3", "the answer is 4", False),
    ("\\sqrt{2}", "\\boxed{1.5}", False),
])
def test_math_verify_reward(gold, response, correct):
    result = math_reward(Prompt("p", [], gold), response)
    assert result.correctness == (1.0 if correct else 0.0)


def test_math_as_one_of_the_rewards_of_gsm8k():
    task = get_task("gsm8k", reward_funcs=["math"])
    [prompt] = task.prompts("test", limit=1)
    right = task.score(prompt, f"Step by step... so \\boxed{{{prompt.answer}}}")
    assert right.correctness == 1.0 and right.terms == (RewardTerm("math", 1.0, right.reward),)
