"""The GPU settings validate on CPU: the paper's config loads, a config that cannot fit is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from recpipe.config import ConfigError, build_config, load_config
from recpipe.generate.vllm_engine import engine_options, resolve_dtype

ROOT = Path(__file__).resolve().parents[2]


def test_the_paper_gsm8k_config_loads_with_the_papers_settings():
    cfg = load_config(ROOT / "configs" / "paper-gsm8k.yaml")
    assert Path(cfg.model.name).is_absolute()  # a local directory, nothing downloaded
    assert cfg.task.name == "gsm8k" and cfg.train.lr == 1e-6
    assert (cfg.select.groups_per_step, cfg.generate.group_size) == (96, 8)
    assert (cfg.generate.temperature, cfg.generate.max_tokens, cfg.loop.sync_interval) == (1.0, 1024, 20)
    assert cfg.generate.max_tokens < cfg.generate.max_model_len
    assert cfg.train.nproc == len(cfg.train.devices) == 7
    assert not set(cfg.generate.devices) & set(cfg.train.devices)  # 8 GPUs: one sampler, seven trainer ranks
    header = (ROOT / "configs" / "paper-gsm8k.yaml").read_text().split("\nrun:")[0]
    assert "--nproc-per-node 7" in header and "recpipe generator --config configs/paper-gsm8k.yaml" in header
    from recpipe.tasks import get_task  # the reward is correctness +- 0.1 format

    task = get_task("gsm8k")
    (prompt,) = task.prompts("train", limit=1, seed=0)
    gold = prompt.answer
    assert task.score(prompt, f"so\n#### {gold}").reward == pytest.approx(1.1)
    assert task.score(prompt, f"#### {gold}1\nmaybe").reward == pytest.approx(-0.1)


def test_sampler_and_trainer_on_one_gpu_need_sleep_mode_and_room():
    one_gpu = ["generate.devices=[0]", "train.devices=[0]"]
    with pytest.raises(ConfigError, match=r"share GPU 0.*generate.sleep_mode=true.*different GPUs"):
        build_config(overrides=one_gpu)
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization=0.9.*0.5 or less"):
        build_config(overrides=[*one_gpu, "generate.sleep_mode=true"])
    cfg = build_config(overrides=[*one_gpu, "generate.sleep_mode=true", "generate.gpu_memory_utilization=0.4"])
    assert cfg.generate.sleep_mode
    assert build_config(overrides=["generate.devices=[0]", "train.devices=[1]"]).train.devices == [1]
    # The transformers sampler has no sleep mode and no memory reservation: nothing to refuse.
    assert build_config(overrides=[*one_gpu, "generate.backend=hf"]).generate.backend == "hf"


def test_device_lists_match_ranks_and_tensor_parallel_size():
    with pytest.raises(ConfigError, match=r"train.devices lists 1 device.*train.nproc=2"):
        build_config(overrides=["train.nproc=2", "train.devices=[1]"])
    with pytest.raises(ConfigError, match=r"generate.devices lists 1 device.*tensor_parallel_size=2"):
        build_config(overrides=["generate.tensor_parallel_size=2", "generate.devices=[0]"])
    with pytest.raises(ConfigError, match="precision"):
        build_config(overrides=["train.precision=fp8"])


def test_engine_options_on_cpu_are_float32_and_no_gpu_settings():
    g = build_config(overrides=["generate.gpu_memory_utilization=0.3", "generate.sleep_mode=true"]).generate
    assert engine_options(g) == {"dtype": "float32"}  # this machine has no CUDA
    assert resolve_dtype("bfloat16") == "bfloat16" and resolve_dtype("auto") == "float32"
