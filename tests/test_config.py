from pathlib import Path

import pytest

from recpipe.config import ConfigError, RecpipeConfig, build_config, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_run_on_cpu_and_match_the_shipped_file():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg == RecpipeConfig()
    assert cfg.train.device == "auto" and cfg.model.name == "smollm2"
    assert cfg.loss.build().clip_mode == "one-side"


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
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[override])


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
