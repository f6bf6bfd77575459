"""bench/bench_gpu.py --smoke: the GPU check runs, with only torch and transformers importable."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

from recpipe.algorithms import LossConfig, preset

ROOT = Path(__file__).resolve().parents[2]
# What the GPU machine lacks: the script must not import any of it (recpipe's store, config, select...).
ABSENT = ("pydantic", "pydantic_core", "duckdb", "deltalake", "pyarrow", "polars", "prefect", "vllm", "typer")
RUN = f"""
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path.insert(0, Absent())
sys.argv = ['bench_gpu.py', '--smoke', '--device', 'cpu', '--out', sys.argv[1]]
runpy.run_path({str(ROOT / 'bench' / 'bench_gpu.py')!r}, run_name='__main__')
"""


def test_bench_gpu_smoke_runs_with_torch_and_transformers_only(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-c", RUN, str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert not [r for r in results if "oom" in r]
    train = [r for r in results if r["case"] == "train"]
    assert {(r["chunk_tokens"], r["activation_checkpointing"], r["fsdp"]) for r in train} == {
        (256, False, False), (1024, False, False), (0, False, False), (256, True, False), (256, False, True)}
    for r in train:  # the same batch and initial weights: every variant computes the same step
        assert r["tokens_per_second"] > 0 and r["micro_batches"] >= 2
        assert math.isclose(r["loss"], train[0]["loss"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(r["grad_norm"], train[0]["grad_norm"], rel_tol=1e-4)
        assert r["on_policy_mismatch"] > 1  # random behaviour log-probs vs a random model
    assert {r["chunk_tokens"] for r in results if r["case"] == "logprobs"} == {256, 1024, 0}
    (sample,) = [r for r in results if r["case"] == "sample"]
    assert sample["generated_tokens"] == sample["rows"] * 8 and sample["logprobs_finite"]


def test_bench_gpu_loss_is_the_rec_oneside_nois_preset():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    assert vars(bench_gpu.LOSS) == preset("rec-oneside-nois").model_dump()
    assert set(vars(bench_gpu.LOSS)) == set(LossConfig.model_fields)
