"""From a selected batch (an Arrow table) to length-bucketed micro-batches of padded tensors.

    samples = samples_from_table(batch)                 # validated rows, one per response
    for mb in plan_micro_batches(samples, token_budget=4096, overhead_tokens=64):
        tensors = collate(mb, pad_id=0, device="cpu")   # (B, W) inputs, (B, R) response tensors

Why bucketing: a batch mixes short and long sequences; padding every micro-batch to the
longest sequence of the whole batch wastes compute on padding. Sorting by length and
cutting micro-batches by a *padded*-token budget (rows x width) keeps each micro-batch's
rows of similar length, so padding stays a small share and memory per micro-batch is bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recpipe.errors import RecpipeError

if TYPE_CHECKING:  # pyarrow only for samples_from_table: planning and collating need numpy and torch alone
    from collections.abc import Sequence

    import pyarrow as pa

# Columns every batch must carry (recpipe.select's Batch.rollouts has them all).
REQUIRED_COLUMNS = (
    "rollout_id",
    "policy_version",
    "advantage",
    "weight",
    "prompt_token_ids",
    "response_token_ids",
    "behaviour_logprobs",
    "reward",
    "temperature",
)
# Optional: top_p (default 1.0, must match the sampler), kept (bool, False = dropped by RED-Drop).


class BatchError(RecpipeError, ValueError):
    """A batch table the trainer cannot train on (a missing column, a bad row); names the rollout."""


@dataclass(frozen=True, eq=False, init=False)
class Sample:
    """One response of the batch, as the trainer needs it.

    Tokens and behaviour log-probs are 1-D numpy arrays (``prompt_ids``, ``response_ids``,
    ``logprob_values``; from samples_from_table, views into the batch's Arrow buffers): collate
    concatenates them without a per-token Python step. ``prompt``, ``response`` and ``old_logprobs``
    are the same values as lists, built on first use.
    """

    index: int  # row in the batch table
    rollout_id: str
    policy_version: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprob_values: np.ndarray
    advantage: float
    weight: float
    reward: float
    temperature: float
    top_p: float
    kept: bool

    def __init__(self, *, index: int, rollout_id: str, policy_version: int, prompt: Sequence[int],
                 response: Sequence[int], old_logprobs: Sequence[float], advantage: float, weight: float,
                 reward: float, temperature: float, top_p: float, kept: bool) -> None:
        values = dict(index=index, rollout_id=rollout_id, policy_version=policy_version,
                      prompt_ids=_array(prompt, np.int64), response_ids=_array(response, np.int64),
                      logprob_values=_array(old_logprobs, np.float64), advantage=advantage, weight=weight,
                      reward=reward, temperature=temperature, top_p=top_p, kept=kept)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @cached_property
    def prompt(self) -> list[int]:
        return self.prompt_ids.tolist()

    @cached_property
    def response(self) -> list[int]:
        return self.response_ids.tolist()

    @cached_property
    def old_logprobs(self) -> list[float]:
        return self.logprob_values.tolist()

    @property
    def length(self) -> int:
        """Input tokens of its forward pass: the last response token is only ever a target."""
        return len(self.prompt_ids) + len(self.response_ids) - 1


def _array(values: Sequence[Any], dtype: type[np.generic]) -> np.ndarray:
    """A 1-D array of values; an array of the same kind (int32 tokens, float32 log-probs) stays as it is."""
    array = np.asarray(values)
    return array if array.dtype.kind == np.dtype(dtype).kind else array.astype(dtype)


@dataclass(frozen=True)
class MicroBatch:
    samples: list[Sample]
    width: int  # padded length of every row

    @property
    def padded_tokens(self) -> int:
        return len(self.samples) * self.width

    @property
    def real_tokens(self) -> int:
        return sum(s.length for s in self.samples)


@dataclass(frozen=True)
class _Ragged:
    """A list column as flat values, each row's start in them, its length and whether it is null."""

    values: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    valid: np.ndarray

    def row(self, i: int) -> np.ndarray:
        return self.values[self.starts[i] : self.starts[i] + self.lengths[i]]


def _ragged(table: pa.Table, name: str) -> _Ragged:
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()  # absolute positions in column.values, slicing included
    valid = ~column.is_null().to_numpy(zero_copy_only=False)
    values = column.values.to_numpy(zero_copy_only=False)  # float nulls become NaN
    return _Ragged(values, offsets[:-1], np.where(valid, np.diff(offsets), 0), valid)


def _scalars(table: pa.Table, name: str, default: float) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column as float64 (nulls NaN) and its null mask; ``default`` everywhere when absent."""
    if name not in table.column_names:
        return np.full(table.num_rows, default), np.zeros(table.num_rows, dtype=bool)
    column = table.column(name)
    null = column.is_null().to_numpy(zero_copy_only=False)
    return column.to_numpy().astype(np.float64), null


def _first_bad_token(tokens: _Ragged, vocab_size: int | None) -> np.ndarray:
    """Per row: where in tokens.values its first null token id (or, with vocab_size, the first id
    outside [0, vocab_size)) is; -1 when it has none."""
    n = len(tokens.lengths)
    first = np.full(n, -1, dtype=np.int64)
    if vocab_size is None and tokens.values.dtype.kind in "iu":
        return first  # an integer array holds no nulls
    rows, cols = _scatter_index(tokens.lengths)
    index = tokens.starts[rows] + cols
    ids = tokens.values[index]
    with np.errstate(invalid="ignore"):
        bad = np.isnan(ids) if ids.dtype.kind == "f" else np.zeros(len(ids), dtype=bool)
        if vocab_size is not None:
            bad |= ~((ids >= 0) & (ids < vocab_size))
    hit = np.flatnonzero(bad)
    bad_rows, first_hit = np.unique(rows[hit], return_index=True)  # hits are in row order
    first[bad_rows] = index[hit[first_hit]]
    return first


def samples_from_table(table: pa.Table, vocab_size: int | None = None) -> list[Sample]:
    """Validate a batch table and turn its rows into Samples.

    Shapes, token ids (0 <= id < vocab_size, when given) and sampling parameters are checked here, all
    rows at once (BatchError naming the column, the first bad row's rollout id and the value). Non-finite
    advantages, weights or behaviour log-probs are *not* rejected: the trainer skips such a step and
    records why, rather than crashing the loop.
    """
    import pyarrow as pa

    if not isinstance(table, pa.Table):
        raise BatchError(f"batch must be a pyarrow Table (or have a .rollouts table); got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise BatchError(f"batch lacks columns {missing}; required: {list(REQUIRED_COLUMNS)}")
    if table.num_rows == 0:
        raise BatchError("batch has no rows; a training step needs at least one response")
    prompt, response = _ragged(table, "prompt_token_ids"), _ragged(table, "response_token_ids")
    old = _ragged(table, "behaviour_logprobs")
    temperature, temperature_null = _scalars(table, "temperature", 1.0)
    top_p, top_p_null = _scalars(table, "top_p", 1.0)
    top_p[top_p_null] = 1.0
    with np.errstate(invalid="ignore"):
        bad_temperature = temperature_null | ~(np.isfinite(temperature) & (temperature > 0))
        bad_top_p = ~((top_p > 0) & (top_p <= 1))
    # The row checks in the order the message should name the first failure of the first bad row.
    checks = [
        (prompt.lengths == 0, None),
        (~response.valid | ~old.valid | (old.lengths != response.lengths), None),
    ]
    bad_token = {}
    for name, tokens in (("prompt_token_ids", prompt), ("response_token_ids", response)):
        bad_token[name] = _first_bad_token(tokens, vocab_size)
        checks.append((bad_token[name] >= 0, name))
    checks += [(bad_temperature, None), (bad_top_p, None)]
    failing = np.logical_or.reduce([bad for bad, _ in checks])
    if failing.any():
        i = int(np.argmax(failing))
        rid = table.column("rollout_id")[i].as_py()
        check = next(k for k, (bad, _) in enumerate(checks) if bad[i])
        if check == 0:
            raise BatchError(f"prompt_token_ids of rollout {rid!r} is empty; the first response token needs a prompt")
        if check == 1:
            n_old = int(old.lengths[i]) if old.valid[i] else None
            n_response = int(response.lengths[i]) if response.valid[i] else None
            raise BatchError(
                f"behaviour_logprobs of rollout {rid!r} has {n_old} values for {n_response} response tokens; "
                f"they must match"
            )
        name = checks[check][1]
        if name is not None:
            token = (prompt if name == "prompt_token_ids" else response).values[bad_token[name][i]].item()
            if math.isnan(token):
                raise BatchError(f"{name} of rollout {rid!r} holds a null token id")
            raise BatchError(
                f"{name} of rollout {rid!r} holds token id {int(token)}, outside the model's vocabulary "
                f"[0, {vocab_size}); were these rollouts generated by another model?"
            )
        if bad_temperature[i]:
            value = None if temperature_null[i] else float(temperature[i])
            raise BatchError(f"temperature of rollout {rid!r} is {value!r}; must be a finite number > 0")
        raise BatchError(f"top_p of rollout {rid!r} is {float(top_p[i])!r}; allowed: 0 < top_p <= 1")

    kept = table.column("kept").to_pylist() if "kept" in table.column_names else [True] * table.num_rows
    rollout_ids = table.column("rollout_id").to_pylist()
    versions = table.column("policy_version").to_pylist()
    advantage, weight, reward = (_scalars(table, c, math.nan)[0].tolist() for c in ("advantage", "weight", "reward"))
    temperature_list, top_p_list = temperature.tolist(), top_p.tolist()
    return [
        Sample(
            index=i,
            rollout_id=rollout_ids[i],
            policy_version=int(versions[i]),
            prompt=prompt.row(i),
            response=response.row(i),
            old_logprobs=old.row(i),
            advantage=advantage[i],
            weight=weight[i],
            reward=reward[i],
            temperature=temperature_list[i],
            top_p=top_p_list[i],
            kept=True if kept[i] is None else bool(kept[i]),
        )
        for i in range(table.num_rows)
    ]


def plan_micro_batches(samples: list[Sample], token_budget: int, overhead_tokens: int = 64) -> list[MicroBatch]:
    """Sort by length (longest first) and cut into micro-batches of at most token_budget padded tokens.

    The cut points minimise ``padded tokens + overhead_tokens x micro-batches`` (an exact dynamic
    program over the sorted lengths): a micro-batch costs its padded tokens plus a fixed overhead
    (kernel launches, Python), so fewer, fuller micro-batches win only while they do not add more
    padding than that overhead. Filling each micro-batch greedily to the budget would pad the
    shortest rows of a batch that fits in one micro-batch to its longest row.

    Responses without tokens carry no loss and are left out. A sequence longer than the budget gets
    a micro-batch of its own. Longest first: an out-of-memory error shows at the first micro-batch.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}: must be >= 1")
    if overhead_tokens < 0:
        raise ValueError(f"overhead_tokens={overhead_tokens}: must be >= 0")
    ordered = sorted((s for s in samples if len(s.response_ids)), key=lambda s: (-s.length, s.index))
    n = len(ordered)
    # cost[j]: cheapest plan of ordered[:j]; start[j]: where its last micro-batch ordered[start[j]:j] begins.
    cost = [0] + [math.inf] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            rows, width = j - i, ordered[i].length  # descending: the first row is the widest
            if rows > 1 and rows * width > token_budget:
                break  # going further back only adds rows at a width at least as large
            candidate = cost[i] + rows * width + overhead_tokens
            if candidate < cost[j]:
                cost[j], start[j] = candidate, i
    batches: list[MicroBatch] = []
    j = n
    while j > 0:
        i = start[j]
        batches.append(MicroBatch(ordered[i:j], ordered[i].length))
        j = i
    return batches[::-1]


def collate(mb: MicroBatch, pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded tensors of one micro-batch.

    Returns:
        input_ids (B, W) long: prompt + response[:-1], right-padded with pad_id. Right padding with a
            causal model needs no attention mask: real tokens never attend to the padding after them.
        positions (B, W) bool: the positions whose logits predict a response token.
        targets (N,) long: the response tokens, row-major (N = response tokens of the micro-batch).
        temperature, top_p (N,) float: per target token, from its row.
        response_mask (B, R) bool, old_logprobs (B, R) float32: R = longest response.
        advantages, weights (B,) float32.
    """
    samples = mb.samples
    B, W = len(samples), mb.width
    prompt_len = np.array([len(s.prompt_ids) for s in samples])
    response_len = np.array([len(s.response_ids) for s in samples])
    R = int(response_len.max())
    # Row b's inputs: prompt + response[:-1], scattered into the padded array from one flat copy.
    input_len = prompt_len + np.maximum(response_len - 1, 0)
    inputs = np.concatenate([x for s in samples for x in (s.prompt_ids, s.response_ids[:-1])]).astype(np.int64)
    input_ids = np.full((B, W), pad_id, dtype=np.int64)
    input_ids[_scatter_index(input_len)] = inputs
    rows, cols = _scatter_index(response_len)
    # Response token j sits at len(prompt) + j and is predicted by the logits one position earlier.
    positions = np.zeros((B, W), dtype=bool)
    positions[rows, cols + (prompt_len - 1)[rows]] = True
    response_mask = np.zeros((B, R), dtype=bool)
    response_mask[rows, cols] = True
    old_logprobs = np.zeros((B, R), dtype=np.float32)
    old_logprobs[rows, cols] = np.concatenate([s.logprob_values for s in samples])
    targets = np.concatenate([s.response_ids for s in samples]).astype(np.int64)
    out = {
        "input_ids": input_ids,
        "positions": positions,
        "targets": targets,
        "temperature": np.repeat(np.array([s.temperature for s in samples], dtype=np.float32), response_len),
        "top_p": np.repeat(np.array([s.top_p for s in samples], dtype=np.float32), response_len),
        "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "advantages": np.array([s.advantage for s in samples], dtype=np.float32),
        "weights": np.array([s.weight for s in samples], dtype=np.float32),
    }
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in out.items()}


def _scatter_index(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each element of rows of these lengths laid out left-aligned, rows in order."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return rows, np.arange(len(rows)) - starts[rows]
