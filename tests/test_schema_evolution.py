"""Columns added to the archive after it was written: their types, and which older files still fit."""

from __future__ import annotations

import pyarrow as pa

from recpipe.schema import added_columns, fits_older, migrations, table_schema


def test_reward_terms_is_a_nullable_list_of_structs():
    field = table_schema("rollouts").field("reward_terms")
    assert field.nullable
    assert field.type == pa.list_(pa.struct([("name", pa.string()), ("weight", pa.float64()),
                                             ("value", pa.float64())]))
    assert table_schema("rollouts").field("generator").type.field("tokenizer").type == pa.string()


def test_columns_added_to_delta_stores_are_nullable():
    # doctor --migrate adds them to a Delta table's schema without rewriting files: old rows read null
    for version, tables in migrations().items():
        for table, columns in tables.items():
            names = {c["name"] for c in columns}
            if version >= 3:
                assert names <= added_columns(table), (version, table)
            else:  # the Parquet-folder conversion wrote their defaults into every row
                assert not names & added_columns(table), (version, table)


def test_an_older_struct_fits_only_without_added_fields():
    generator = table_schema("rollouts").field("generator").type
    added = added_columns("rollouts")
    older = pa.struct([f for f in generator if f.name != "tokenizer"])
    assert fits_older(older, generator, added, "generator")
    assert fits_older(generator, generator, added, "generator")
    without_seed = pa.struct([f for f in generator if f.name != "seed"])
    assert not fits_older(without_seed, generator, added, "generator")  # seed was always there: damaged
    assert not fits_older(older, generator, frozenset(), "generator")
    extra = pa.struct([*generator, pa.field("other", pa.int32())])
    assert not fits_older(extra, generator, added, "generator")
    assert not fits_older(pa.int32(), pa.int64(), added, "x")
