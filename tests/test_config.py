import re
from pathlib import Path
from typing import Annotated, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from recpipe.config import ConfigError, RecpipeConfig, build_config, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


DEFAULT_YAML = ROOT / "configs" / "default.yaml"


def test_defaults_run_on_cpu_and_match_the_shipped_file():
    cfg = load_config(DEFAULT_YAML)
    assert cfg == RecpipeConfig()
    assert cfg.train.device == "auto" and cfg.model.name == "smollm2"
    assert cfg.loss.build().clip_mode == "one-side"
    # Loading fills omitted fields with their defaults, so compare the file itself: every field is listed,
    # at its default, and nothing else (a field added to the config must be added to the file too).
    assert yaml.safe_load(DEFAULT_YAML.read_text()) == RecpipeConfig().model_dump(mode="json")


def test_every_field_of_the_shipped_file_is_explained():
    # TRL-style: a comment line right above each field says what it is.
    lines = DEFAULT_YAML.read_text().splitlines()
    fields = [(i, line) for i, line in enumerate(lines) if re.match(r"^ *[a-z_]+:", line)]
    sections = {name for name, info in RecpipeConfig.model_fields.items()
                if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}
    leaves = [(i, line) for i, line in fields if line.rstrip().rstrip(":") not in sections]
    assert len(leaves) == len(RecpipeConfig.model_fields) - len(sections) + sum(
        len(RecpipeConfig.model_fields[name].annotation.model_fields) for name in sections)
    for i, line in leaves:
        assert lines[i - 1].lstrip().startswith("#"), f"configs/default.yaml:{i + 1} {line.strip()!r} has no comment"


def test_overrides_parse_yaml_scalars():
    cfg = build_config(overrides=["train.lr=3e-6", "generate.stop=[\"\\n\\n\"]", "loss.preset=grpo",
                                  "loss.overrides.epsilon_high=0.6", "loop.steps=7"])
    assert cfg.train.lr == 3e-6 and cfg.loop.steps == 7
    assert cfg.generate.stop == ["\n\n"]
    assert cfg.loss.build().epsilon_high == 0.6 and cfg.loss.build().std_normalize is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1", r"train\.lr: Input should be greater than 0 \(got -1\)"),
        ("train.lrr=1", r"train\.lrr: Extra inputs are not permitted"),
        ("generate.backend=tpu", r"generate\.backend: Input should be 'auto', 'vllm' or 'hf' \(got 'tpu'\)"),
        ("loss.preset=ppo", r"loss\.preset: .*unknown preset 'ppo'; allowed: asymre, grpo"),
        ("loss.overrides.clip_mode=wide", r"clip_mode"),
        ("loss.overrides.temperature=2", r"temperature"),
        ("run=bad/name", r"run: String should match pattern"),
        ("loop.sync_interval=0", r"loop\.sync_interval: Input should be greater than or equal to 1"),
        ("nonsense", r"must look like section\.field=value"),
        ("train.lr.x=1", r"train\.lr: Input should be a valid number"),
        ("train=3", r"train: Input should be a valid dictionary"),
        ("train.betas=[2,3]", r"train\.betas\.0: Input should be less than 1 \(got 2\); "
                              r"train\.betas\.1: Input should be less than 1 \(got 3\)"),
        ("train.betas=[-0.1,0.9]", r"train\.betas\.0: Input should be greater than or equal to 0 \(got -0\.1\)"),
        ("train.betas=[0.9,1]", r"train\.betas\.1: Input should be less than 1 \(got 1\)"),
        ("train.lr=true", r"train\.lr: Input should be a valid number, not a boolean \(got True\)"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as raised:
        build_config(overrides=[override])
    assert "\n" not in str(raised.value)  # one line, as the CLI prints it


def _base(annotation):
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def int_fields() -> list[str]:
    """Every integer field of the config, as section.field (plain or optional ints)."""
    names = []
    for section, info in RecpipeConfig.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for name, field in model.model_fields.items():
            options = get_args(field.annotation) or (field.annotation,)  # int | None: (int, NoneType)
            if any(_base(option) is int for option in options):
                names.append(f"{section}.{name}")
    return names


def test_int_fields_are_found():
    assert {"loop.steps", "loop.sync_offset", "train.threads", "train.micro_batch_overhead_tokens",
            "generate.seed", "task.train_prompts"} <= set(int_fields())


@pytest.mark.parametrize("field", int_fields())
@pytest.mark.parametrize("value", ["true", "false"])
def test_booleans_are_not_integers(field, value):
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a valid integer, not a boolean "
                                          rf"\(got {value.title()}\)"):
        build_config(overrides=[f"{field}={value}"])


def test_numbers_still_parse_as_before():
    cfg = build_config(overrides=["train.lr=1e-3", "train.betas=[0, 0.5]", "train.threads=2", "loop.steps=3",
                                  "generate.top_p=1"])
    assert (cfg.train.lr, cfg.train.betas, cfg.train.threads, cfg.loop.steps, cfg.generate.top_p) == (
        1e-3, (0.0, 0.5), 2, 3, 1.0)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_dump_round_trips(tmp_path):
    cfg = build_config(overrides=["loss.preset=red-drop", "train.keep_every=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
