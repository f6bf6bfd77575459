"""Tasks: prompts and reward functions, behind a small plugin interface.

    from recpipe.tasks import get_task, score_responses
    task = get_task("arithmetic")                  # or "gsm8k", "dataset", a registered name, or "module:callable"
    prompts = task.prompts("train", limit=8, seed=0)
    results = score_responses(task, prompts, responses, timeout_s=2.0)
    rows = [r.as_row() for r in results]          # reward, reward_parts, reward_terms, reward_error

Files: base.py (Prompt, RewardResult, Task), registry.py (register_task, get_task, task_names),
scoring.py (score_responses: errors and timeouts per response), answers.py (number parsing),
arithmetic.py and gsm8k.py (the built-in tasks), dataset.py (prompts and answers from your own file),
math_reward.py (math-verify), rewards.py (weighted reward functions).
"""

from recpipe.tasks.arithmetic import ArithmeticTask
from recpipe.tasks.base import Prompt, RewardResult, RewardTerm, Task, TaskError
from recpipe.tasks.dataset import DatasetTask
from recpipe.tasks.gsm8k import GSM8KTask
from recpipe.tasks.registry import ENTRY_POINT_GROUP, get_task, register_task, task_names
from recpipe.tasks.scoring import score_responses

register_task("arithmetic", ArithmeticTask)
register_task("gsm8k", GSM8KTask)
register_task("dataset", DatasetTask)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ArithmeticTask",
    "DatasetTask",
    "GSM8KTask",
    "Prompt",
    "RewardResult",
    "RewardTerm",
    "Task",
    "TaskError",
    "get_task",
    "register_task",
    "score_responses",
    "task_names",
]
