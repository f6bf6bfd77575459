"""Task plugins: built-ins, register_task, "module:callable" strings, entry points, errors."""

import sys

import pytest

from recpipe.tasks import ArithmeticTask, Prompt, RewardResult, get_task, register_task, registry, task_names

PLUGIN_SOURCE = """
from recpipe.tasks import Prompt, RewardResult


class EchoTask:
    name = "echo"

    def __init__(self, word="hi"):
        self.word = word

    def prompts(self, split, limit=None, seed=0):
        return [Prompt(prompt_id=f"echo-{split}-0", messages=[{"role": "user", "content": self.word}],
                       answer=self.word)][:limit]

    def score(self, prompt, response):
        return RewardResult.from_parts(correct=response == prompt.answer, formatted=True)


def make_task(**options):
    return EchoTask(**options)


NOT_CALLABLE = 3
"""


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    # Tests register names; keep them out of the process-wide registry.
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_recpipe_plugin.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_recpipe_plugin"
    sys.modules.pop("my_recpipe_plugin", None)


def test_builtins_are_registered():
    assert {"arithmetic", "gsm8k"} <= set(task_names())
    assert get_task("arithmetic").name == "arithmetic" and get_task("gsm8k").name == "gsm8k"
    assert get_task("arithmetic", operation="mul").operation == "mul"


def test_unknown_task_lists_the_registered_names():
    with pytest.raises(
        ValueError, match=r"task='nope' is unknown: registered tasks are \[.*'arithmetic'.*'gsm8k'"
    ):
        get_task("nope")


def test_register_task(plugin_module):
    module = __import__(plugin_module)
    register_task("echo", module.EchoTask)
    task = get_task("echo", word="yo")
    assert "echo" in task_names()
    prompt = task.prompts("train")[0]
    assert prompt == Prompt(
        prompt_id="echo-train-0", messages=[{"role": "user", "content": "yo"}], answer="yo"
    )
    assert task.score(prompt, "yo") == RewardResult(reward=1.1, correctness=1.0, format=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register_task("echo", module.make_task)
    register_task("echo", module.make_task, overwrite=True)
    assert get_task("echo").word == "hi"


@pytest.mark.parametrize(("name", "factory"), [("", ArithmeticTask), ("a:b", ArithmeticTask), ("x", 3)])
def test_register_task_rejects_bad_arguments(name, factory):
    with pytest.raises(ValueError, match="name=|factory="):
        register_task(name, factory)


def test_module_callable_string(plugin_module):
    task = get_task(f"{plugin_module}:make_task", word="abc")
    assert task.name == "echo" and task.prompts("test")[0].answer == "abc"
    assert get_task(f"{plugin_module}:EchoTask").word == "hi"
    assert isinstance(
        get_task("recpipe.tasks.arithmetic:ArithmeticTask", high=2, n_train=2, n_test=2), ArithmeticTask
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:make", "cannot import module"),
        ("{module}:missing", "has no attribute"),
        ("{module}:NOT_CALLABLE", "is not callable"),
        ("{module}:", "expected 'module:callable'"),
        ("recpipe.tasks.base:Prompt", "Prompt"),  # callable, but what it builds is no Task
    ],
)
def test_module_callable_errors(plugin_module, spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        get_task(spec.format(module=plugin_module))


def test_factory_must_return_a_task():
    register_task("broken", lambda: object())
    with pytest.raises(ValueError, match="factory returned object"):
        get_task("broken")


def test_entry_point_plugin(plugin_module, tmp_path):
    # A real installed-distribution layout on sys.path: importlib.metadata discovers it like a pip install.
    dist_info = tmp_path / "my_recpipe_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-recpipe-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[recpipe.tasks]\necho_ep = {plugin_module}:make_task\n")
    assert "echo_ep" in task_names()
    assert get_task("echo_ep", word="ep").prompts("train")[0].answer == "ep"
