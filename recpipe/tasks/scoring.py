"""Score a batch of responses so that no single response can break or stall the batch.

    results = score_responses(task, prompts, responses, timeout_s=2.0)

Guarantees, per response:
- `task.score` raises (anything, SystemExit included) -> RewardResult.failed("ExcType: message").
- `task.score` returns something other than a RewardResult -> failed("TypeError: ...").
- `task.score` runs longer than `timeout_s` -> failed("timeout after {timeout_s}s"); the batch goes on.
So the batch costs at most about len(responses) * timeout_s, whatever the scorer does.

Why a worker thread, not a subprocess: the scorer is the user's (trusted) code and the hostile part is
the response text, which the built-in scorers handle in bounded time anyway. A thread keeps the normal
case cheap (one thread per batch, one queue hand-off per response: thousands of responses per second)
and works with any task object, picklable or not (a subprocess pool needs picklable tasks, costs
~50 ms to start and tens of microseconds per call in pickling). The price: Python cannot kill a thread.
When a response times out, its worker is abandoned (a daemon thread: it never blocks interpreter exit)
and a fresh worker scores the rest. The abandoned one is asked to stop with an asynchronous exception
(PyThreadState_SetAsyncExc), which ends a pure-Python loop at its next bytecode; a scorer stuck
inside one long C call (a catastrophic regex, a blocking read) keeps running in the background until
that call returns, and is then stopped. Scorers that may block for real should run their own
subprocess with a timeout.
"""

from __future__ import annotations

import ctypes
import math
import queue
import threading
from collections.abc import Sequence

from recpipe.tasks.base import Prompt, RewardResult, Task, TaskError


class _Cancelled(BaseException):
    """Raised inside an abandoned worker to stop it; BaseException so scorers' `except Exception` miss it."""


def _score_one(task: Task, prompt: Prompt, response: str) -> RewardResult:
    try:
        result = task.score(prompt, response)
    except _Cancelled:
        raise
    except BaseException as e:  # noqa: BLE001 - a scorer calling sys.exit() must not end the worker silently
        return RewardResult.failed(f"{type(e).__name__}: {e}")
    if not isinstance(result, RewardResult):
        got = type(result).__name__
        return RewardResult.failed(f"TypeError: score returned {got}, expected RewardResult")
    return result


class _Worker(threading.Thread):
    """Scores responses[start:] in order and hands each (index, result) to the waiting caller."""

    def __init__(self, task: Task, prompts: Sequence[Prompt], responses: Sequence[str], start: int):
        super().__init__(name=f"recpipe-score-{start}", daemon=True)
        self.task, self.prompts, self.responses, self.first = task, prompts, responses, start
        # Each worker has its own queue, so a late result of an abandoned worker is never read as another's.
        self.results: queue.SimpleQueue[tuple[int, RewardResult]] = queue.SimpleQueue()
        self.cancelled = False

    def run(self) -> None:
        try:
            for i in range(self.first, len(self.responses)):
                if self.cancelled:
                    return
                self.results.put((i, _score_one(self.task, self.prompts[i], self.responses[i])))
        except _Cancelled:
            return

    def cancel(self) -> None:
        self.cancelled = True
        if self.is_alive() and self.ident is not None:
            set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
            set_async_exc(ctypes.c_ulong(self.ident), ctypes.py_object(_Cancelled))


def score_responses(
    task: Task, prompts: Sequence[Prompt], responses: Sequence[str], timeout_s: float | None = 2.0
) -> list[RewardResult]:
    """Score responses[i] against prompts[i]; one RewardResult per response, failures recorded, never raised.

    timeout_s: seconds one response may take (> 0). None scores inline in the calling thread, without any
    timeout (for scorers known to be fast, e.g. in a subprocess that has its own limit).
    """
    if len(prompts) != len(responses):
        raise TaskError(
            f"len(prompts)={len(prompts)} != len(responses)={len(responses)}: pass one prompt per response"
        )
    if timeout_s is None:
        return [_score_one(task, p, r) for p, r in zip(prompts, responses, strict=True)]
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not (math.isfinite(timeout_s) and timeout_s > 0)
    ):
        raise TaskError(f"timeout_s={timeout_s!r}: expected a finite number of seconds > 0, or None")

    results: list[RewardResult | None] = [None] * len(responses)
    start = 0
    while start < len(responses):
        worker = _Worker(task, prompts, responses, start)
        worker.start()
        while start < len(responses):
            try:
                i, result = worker.results.get(timeout=timeout_s)
            except queue.Empty:
                # responses[start] is stuck: record it, give up on this worker, go on with a fresh one.
                worker.cancel()
                results[start] = RewardResult.failed(f"timeout after {timeout_s:g}s")
                start += 1
                break
            results[i] = result
            start = i + 1
    return results  # type: ignore[return-value]  # every slot is filled: start only moves past filled ones
