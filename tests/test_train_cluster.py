"""The train job's cluster scheduling without GPUs: one member per declared GPU, spread over nodes."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from train_inputs import tiny_model_toml


@pytest.mark.ray
def test_one_member_per_gpu_spread_over_nodes_with_torch_on_cpu(small_survey, tmp_path):
    data = tmp_path / "survey.parquet"
    pq.write_table(small_survey, data)
    config = tiny_model_toml(tmp_path / "model.toml", epochs=1, members=2)
    script = Path(__file__).with_name("cluster_train_run.py")
    result = subprocess.run(
        [sys.executable, str(script), str(data), str(tmp_path / "model"), str(config)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in reversed(result.stdout.splitlines()) if x.startswith("PLACEMENT "))
    placement = json.loads(line.removeprefix("PLACEMENT "))
    members = placement["members"]
    assert [m["status"] for m in members] == ["finished"] * 2
    # gpus-per-member auto on a cluster with GPUs: every member held exactly one GPU ...
    assert all(len(m["gpu_ids"]) == 1 for m in members)
    # ... a different one: one member on each single-GPU node, never on the GPU-less head.
    assert Counter(m["node"] for m in members) == dict.fromkeys(placement["worker_nodes"], 1)
    assert len({(m["node"], m["gpu_ids"][0]) for m in members}) == 2
    # torch finds no CUDA device here, so every member fell back to the CPU (and said so).
    assert {m["device"] for m in members} == {"cpu"}
    assert "torch sees no CUDA device" in result.stderr
    assert (tmp_path / "model" / "model.json").exists()
