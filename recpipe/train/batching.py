"""From a selected batch (an Arrow table) to length-bucketed micro-batches of padded tensors.

    samples = samples_from_table(batch)                 # validated rows, one per response
    for mb in plan_micro_batches(samples, token_budget=4096, overhead_tokens=16):
        tensors = collate(mb, pad_id=0, device="cpu")   # (B, W) inputs, (B, R) response tensors

Why bucketing: a batch mixes short and long sequences; padding every micro-batch to the
longest sequence of the whole batch wastes compute on padding. Sorting by length and
cutting micro-batches by a *padded*-token budget (rows x width) keeps each micro-batch's
rows of similar length, so padding stays a small share and memory per micro-batch is bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

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


@dataclass(frozen=True)
class Sample:
    """One response of the batch, as the trainer needs it."""

    index: int  # row in the batch table
    rollout_id: str
    policy_version: int
    prompt: list[int]
    response: list[int]
    old_logprobs: list[float]
    advantage: float
    weight: float
    reward: float
    temperature: float
    top_p: float
    kept: bool

    @property
    def length(self) -> int:
        """Input tokens of its forward pass: the last response token is only ever a target."""
        return len(self.prompt) + len(self.response) - 1


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


def _column(table: pa.Table, name: str, default: Any) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


def samples_from_table(table: pa.Table) -> list[Sample]:
    """Validate a batch table and turn its rows into Samples.

    Shapes and sampling parameters are checked here (ValueError naming the column, the row's rollout
    id and the value). Non-finite advantages, weights or behaviour log-probs are *not* rejected: the
    trainer skips such a step and records why, rather than crashing the loop.
    """
    if not isinstance(table, pa.Table):
        raise ValueError(f"batch must be a pyarrow Table (or have a .rollouts table); got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"batch lacks columns {missing}; required: {list(REQUIRED_COLUMNS)}")
    if table.num_rows == 0:
        raise ValueError("batch has no rows; a training step needs at least one response")
    cols = {c: table.column(c).to_pylist() for c in REQUIRED_COLUMNS}
    top_p = _column(table, "top_p", 1.0)
    kept = _column(table, "kept", True)
    samples = []
    for i in range(table.num_rows):
        rid = cols["rollout_id"][i]
        prompt, response, old = cols["prompt_token_ids"][i], cols["response_token_ids"][i], cols["behaviour_logprobs"][i]
        if not prompt:
            raise ValueError(f"prompt_token_ids of rollout {rid!r} is empty; the first response token needs a prompt")
        if response is None or old is None or len(old) != len(response):
            raise ValueError(
                f"behaviour_logprobs of rollout {rid!r} has {None if old is None else len(old)} values for "
                f"{None if response is None else len(response)} response tokens; they must match"
            )
        temperature = cols["temperature"][i]
        if temperature is None or not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature of rollout {rid!r} is {temperature!r}; must be a finite number > 0")
        p = 1.0 if top_p[i] is None else top_p[i]
        if not 0 < p <= 1:
            raise ValueError(f"top_p of rollout {rid!r} is {p!r}; allowed: 0 < top_p <= 1")
        samples.append(
            Sample(
                index=i,
                rollout_id=rid,
                policy_version=int(cols["policy_version"][i]),
                prompt=list(prompt),
                response=list(response),
                old_logprobs=[math.nan if x is None else float(x) for x in old],
                advantage=math.nan if cols["advantage"][i] is None else float(cols["advantage"][i]),
                weight=math.nan if cols["weight"][i] is None else float(cols["weight"][i]),
                reward=math.nan if cols["reward"][i] is None else float(cols["reward"][i]),
                temperature=float(temperature),
                top_p=float(p),
                kept=bool(True if kept[i] is None else kept[i]),
            )
        )
    return samples


def plan_micro_batches(samples: list[Sample], token_budget: int, overhead_tokens: int = 16) -> list[MicroBatch]:
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
    ordered = sorted((s for s in samples if s.response), key=lambda s: (-s.length, s.index))
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
    B, W = len(mb.samples), mb.width
    R = max(len(s.response) for s in mb.samples)
    input_ids = torch.full((B, W), pad_id, dtype=torch.long)
    positions = torch.zeros(B, W, dtype=torch.bool)
    response_mask = torch.zeros(B, R, dtype=torch.bool)
    old_logprobs = torch.zeros(B, R, dtype=torch.float32)
    targets, temperature, top_p = [], [], []
    for b, s in enumerate(mb.samples):
        seq = s.prompt + s.response[:-1]
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        # Response token j sits at len(prompt) + j and is predicted by the logits one position earlier.
        positions[b, len(s.prompt) - 1 : len(s.prompt) - 1 + len(s.response)] = True
        response_mask[b, : len(s.response)] = True
        old_logprobs[b, : len(s.response)] = torch.tensor(s.old_logprobs, dtype=torch.float32)
        targets.extend(s.response)
        temperature.extend([s.temperature] * len(s.response))
        top_p.extend([s.top_p] * len(s.response))
    out = {
        "input_ids": input_ids,
        "positions": positions,
        "targets": torch.tensor(targets, dtype=torch.long),
        "temperature": torch.tensor(temperature, dtype=torch.float32),
        "top_p": torch.tensor(top_p, dtype=torch.float32),
        "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "advantages": torch.tensor([s.advantage for s in mb.samples], dtype=torch.float32),
        "weights": torch.tensor([s.weight for s in mb.samples], dtype=torch.float32),
    }
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}
