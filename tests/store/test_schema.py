import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recpipe.schema import SCHEMA_VERSION, conform, table_names, table_schema
from tests.support import synthetic_rollouts

CONTRACT = {
    "rollouts": "run rollout_id group_id sample_index policy_version task prompt_id prompt_token_ids "
    "response_token_ids behaviour_logprobs response_length finish_reason reward reward_error generator created_at",
    "policies": "run version step checkpoint parent_version created_at",
    "batches": "run step rollout_id query_name weight advantage",
    "steps": "run step policy_version loss clip_fraction tokens seconds ratio_mean ratio_max mismatch entropy "
    "drop_fraction reward_mean reward_std",
    "evals": "run policy_version task split accuracy n created_at",
}


@pytest.mark.parametrize("table", sorted(CONTRACT))
def test_contract_columns_present(table):
    names = set(table_schema(table).names)
    assert set(CONTRACT[table].split()) <= names
    assert "schema_version" in names


def test_types_of_payload_columns():
    schema = table_schema("rollouts")
    assert schema.field("prompt_token_ids").type == pa.list_(pa.int32())
    assert schema.field("behaviour_logprobs").type == pa.list_(pa.float32())
    assert schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert schema.metadata[b"schema_version"] == str(SCHEMA_VERSION).encode()


def test_round_trip_through_parquet(tmp_path):
    table = synthetic_rollouts(groups=3, group_size=2)
    pq.write_table(table, tmp_path / "x.parquet", compression="zstd")
    back = conform("rollouts", pq.read_table(tmp_path / "x.parquet"))
    assert back.equals(table)


def test_conform_rejects_missing_and_null_columns():
    table = synthetic_rollouts()
    with pytest.raises(ValueError, match="missing.*reward"):
        conform("rollouts", table.drop_columns(["reward"]))
    nulls = table.set_column(table.schema.get_field_index("reward"), "reward", pa.nulls(table.num_rows, pa.float64()))
    with pytest.raises(ValueError, match="'reward' must not be null"):
        conform("rollouts", nulls)
    rows = table.to_pylist()
    rows[0]["reward"] = "seven"
    with pytest.raises(ValueError, match="rollouts: rows do not fit"):
        conform("rollouts", rows)


def test_every_table_builds():
    assert {"rollouts", "groups", "policies", "batches", "steps", "evals"} <= set(table_names())
    for name in table_names():
        assert len(table_schema(name)) > 3


def test_a_description_split_by_an_unquoted_comma_is_refused():
    import yaml

    from recpipe.schema import _field

    # What YAML makes of `{name: task, type: string, description: Task name (a, b).}`.
    spec = yaml.safe_load("{name: task, type: string, description: Task name (a, b).}")
    with pytest.raises(ValueError, match=r"unknown column keys \['b\)\.'\]"):
        _field(spec, "rollouts.task")
