"""Batch: what selection hands the trainer, and its lineage rows (the ``batches`` table).

    batch = select(store, "schedule", run="a", step=3, groups=8)
    batch.rollouts             # Arrow table, one row per response (BATCH_COLUMNS)
    batch.rollout_ids          # ['a-v000003-s0/p0/0', ...]
    lineage_rows(batch)        # what select() wrote to batches (one row per response)
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from recpipe.schema import SCHEMA_VERSION, conform, table_spec

# Columns of Batch.rollouts, in order; the trainer needs the first block (recpipe.train.batching).
BATCH_COLUMNS = (
    "rollout_id", "policy_version", "advantage", "weight", "prompt_token_ids", "response_token_ids",
    "behaviour_logprobs", "reward", "temperature", "top_p", "kept",
    "source_run", "group_id", "sample_index", "staleness", "finish_reason", "response_length",
)


def lineage_shard(step: int) -> str:
    """Shard id of a step's lineage file: one file per (run, step), so a rerun writes nothing twice."""
    return table_spec("batches").shard_id(step=step)


@dataclass(frozen=True)
class Batch:
    """One training step's data, as chosen by a selection query.

    run, step: the training run and step it is for.
    query_name, query_hash: the query (name or file path) and the sha256 of its text.
    params: every parameter value the selection used (query, filters, advantages), as recorded.
    rollouts: one row per response (BATCH_COLUMNS): groups in the query's order, responses by sample_index.
        advantage is A_i (0 for responses RED-Drop dropped, kept = False); weight is the selection
        weight s_i of docs/algorithms.md.
    resumed: True when the batch was read back from recorded lineage instead of selected anew.
    read_versions: the Delta version of each table the selection read (``select(..., as_of=...)`` takes
        them back to choose exactly these rollouts again).
    """

    run: str
    step: int
    query_name: str
    query_hash: str
    params: dict[str, Any]
    rollouts: pa.Table
    resumed: bool = False
    read_versions: dict[str, int] = field(default_factory=dict)
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def __len__(self) -> int:
        return self.rollouts.num_rows

    @property
    def rollout_ids(self) -> list[str]:
        return self.rollouts.column("rollout_id").to_pylist()

    @property
    def advantages(self) -> list[float]:
        return self.rollouts.column("advantage").to_pylist()

    @property
    def weights(self) -> list[float]:
        return self.rollouts.column("weight").to_pylist()

    @property
    def groups(self) -> list[tuple[str, str]]:
        """Distinct (source_run, group_id) pairs, in batch order."""
        pairs = zip(self.rollouts.column("source_run").to_pylist(), self.rollouts.column("group_id").to_pylist(),
                    strict=True)
        return list(dict.fromkeys(pairs))

    @property
    def n_groups(self) -> int:
        return len(self.groups)


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def lineage_rows(batch: Batch) -> pa.Table:
    """The batches-table rows recording ``batch``: one per response."""
    t = batch.rollouts

    def same(value: Any, kind: pa.DataType) -> pa.Array:  # one value for every row, converted once
        return pa.repeat(pa.scalar(value, kind), t.num_rows)

    return conform("batches", pa.table({
        "run": same(batch.run, pa.string()),
        "step": same(batch.step, pa.int32()),
        "rollout_id": t.column("rollout_id"),
        "group_id": t.column("group_id"),
        "source_run": t.column("source_run"),
        "policy_version": t.column("policy_version"),
        "query_name": same(batch.query_name, pa.string()),
        "query_hash": same(batch.query_hash, pa.string()),
        "params": same(params_json(batch.params), pa.string()),
        "weight": t.column("weight"),
        "advantage": t.column("advantage"),
        "read_versions": same(params_json(batch.read_versions), pa.string()),
        "created_at": same(batch.created_at, pa.timestamp("us", "UTC")),
        "schema_version": same(SCHEMA_VERSION, pa.int32()),
    }))
