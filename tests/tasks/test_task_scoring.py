"""score_responses: one failing, looping or misbehaving scorer never stops the batch."""

import sys
import threading
import time

import pytest

from recpipe.tasks import ArithmeticTask, Prompt, RewardResult, score_responses

PROMPT = Prompt(prompt_id="add_3_4", messages=[], answer="7")


class Picky:
    """A user scorer that misbehaves on cue, and is right otherwise."""

    name = "picky"

    def __init__(self):
        self.loop_started = threading.Event()
        self.loop_exited = threading.Event()

    def prompts(self, split, limit=None, seed=0):
        return [PROMPT]

    def score(self, prompt, response):
        if response == "raise":
            raise KeyError("boom")
        if response == "exit":
            sys.exit(3)
        if response == "loop":
            self.loop_started.set()
            try:
                n = 0
                while True:  # pure Python: the async exception from the timeout stops it
                    n += 1
            finally:
                self.loop_exited.set()
        if response == "sleep":
            time.sleep(2)  # one C call: keeps running in the background, the batch goes on anyway
        if response == "float":
            return 1.0
        if response == "nan":
            return RewardResult(reward=float("nan"), correctness=0.0, format=0.0)
        return ArithmeticTask().score(prompt, response)


def run(responses, timeout_s=0.2):
    task = Picky()
    return task, score_responses(task, [PROMPT] * len(responses), responses, timeout_s=timeout_s)


def test_exceptions_are_recorded_and_the_rest_is_scored():
    _, results = run(["7", "raise", "8", "exit", "The answer is 7", "float", "nan", None])
    assert [r.reward for r in results[:3]] == [pytest.approx(1.1), 0.0, pytest.approx(0.1)]
    assert results[1].error == "KeyError: 'boom'"
    assert results[3].error == "SystemExit: 3"
    assert results[4].reward == pytest.approx(0.9) and results[4].error is None
    assert results[5].error == "TypeError: score returned float, expected RewardResult"
    assert results[6].error.startswith("ValueError: RewardResult.reward=nan")
    assert results[7].error == "ValueError: response=NoneType: expected str"
    for r in (results[1], results[3], results[5], results[6], results[7]):
        assert (r.reward, r.correctness, r.format) == (0.0, 0.0, 0.0)


def test_a_looping_scorer_times_out_and_is_stopped():
    task, results = run(["7", "loop", "8", "loop", "The answer is 7"])
    assert [r.error for r in results] == [None, "timeout after 0.2s", None, "timeout after 0.2s", None]
    assert [r.reward for r in results] == pytest.approx([1.1, 0.0, 0.1, 0.0, 0.9])
    assert task.loop_started.is_set()
    # The abandoned worker got an asynchronous exception: its loop ends instead of burning a core.
    assert task.loop_exited.wait(timeout=30)


def test_a_scorer_blocked_in_c_code_times_out():
    _, results = run(["sleep", "7"])
    assert results[0].error == "timeout after 0.2s"
    assert results[1].reward == pytest.approx(1.1)


def test_huge_exception_messages_are_truncated():
    class Echo(Picky):
        def score(self, prompt, response):
            raise ValueError(response)

    results = score_responses(Echo(), [PROMPT], ["x" * 10_000_000])
    assert len(results[0].error) == 500 and results[0].error.startswith("ValueError: xxx")


def test_inline_mode_and_empty_batch():
    task = ArithmeticTask()
    assert score_responses(task, [], []) == []
    inline = score_responses(task, [PROMPT] * 3, ["7", "x", "raise"], timeout_s=None)
    assert [r.reward for r in inline] == pytest.approx([1.1, -0.1, -0.1])


@pytest.mark.parametrize("timeout_s", [0, -1, float("inf"), float("nan"), "2"])
def test_bad_timeout(timeout_s):
    with pytest.raises(ValueError, match="timeout_s="):
        score_responses(ArithmeticTask(), [PROMPT], ["7"], timeout_s=timeout_s)


def test_length_mismatch():
    with pytest.raises(ValueError, match="len\\(prompts\\)=2"):
        score_responses(ArithmeticTask(), [PROMPT, PROMPT], ["7"])


def test_as_row_matches_the_rollout_columns():
    row = RewardResult.from_parts(correct=True, formatted=False).as_row()
    assert row == {"reward": 0.9, "reward_parts": {"correctness": 1.0, "format": -0.1},
                   "reward_terms": [{"name": "task", "weight": 1.0, "value": 0.9}], "reward_error": None}
    failed = RewardResult.failed("timeout after 2s").as_row()
    assert failed["reward_error"] == "timeout after 2s" and failed["reward_terms"] == []
    from recpipe.schema import table_schema

    rollout_columns = {n for n in table_schema("rollouts").names if n.startswith("reward")}
    assert set(row) == rollout_columns
