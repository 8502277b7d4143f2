"""The GPU path's scheduling on a local multi-node Ray cluster with declared GPUs.

The session's Ray instance owns this process, so the cluster runs in a subprocess: a head with CPUs
only and two nodes with one (declared) GPU each. ``--gpus 2`` must start one actor per GPU, on
different nodes, each seeing its own GPU id; torch has no CUDA here, so the actors compute on the
CPU and say so, and ``--precision bf16`` gives way to float32 (reduced precision is for GPUs only).
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from label_data import saved_model, spectra_file

pytestmark = pytest.mark.ray

SCRIPT = """
import json, os, socket, sys
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
from ray.cluster_utils import Cluster
from speclabel.pipeline.labelling import LabelOptions, label_spectra

spectra, model, catalogue, temp_dir = sys.argv[1:5]
store = 80 * 2**20
ports = []
for _ in range(2):  # free ports: other Ray instances on this machine may hold the default ones
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        ports.append(sock.getsockname()[1])
cluster = Cluster(
    initialize_head=True,
    head_node_args={
        "num_cpus": 2,
        "num_gpus": 0,
        "object_store_memory": store,
        # The dashboard serves Ray's state API, which the test asks where the pool's actors ran.
        "include_dashboard": True,
        "gcs_server_port": ports[0],
        "dashboard_port": ports[1],
        "temp_dir": temp_dir,
    },
)
for _ in range(2):
    cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=store)
ray.init(address=cluster.address, log_to_driver=False)
try:
    options = LabelOptions(gpus=2, batch_size=4, saliency="none", precision="bf16", progress=False)
    result = label_spectra(spectra, model, catalogue, options)
    from ray.util.state import list_actors

    pool = [
        {"node_id": a.node_id, "resources": a.required_resources}
        for a in list_actors(detail=True, limit=1000, raise_on_missing_output=False)
        if "EnsembleLabeller" in (a.class_name or "")
    ]
    print("RESULT " + json.dumps({"labelled": result.labelled, "manifest": result.manifest, "pool": pool}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_one_actor_per_gpu_across_nodes(tiny_setup, tmp_path):
    # Short and private: Ray's socket paths under it must stay below the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="slcl-", dir="/tmp")
    model, _ = saved_model(tiny_setup, tmp_path / "model")
    spectra_file(tiny_setup, tmp_path / "in.parquet", n=24, seed=4, row_group=4)
    catalogue = tmp_path / "cat"
    try:
        run = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "in.parquet"), model, str(catalogue), temp_dir],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=Path(__file__).parent,
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["labelled"] == 24
    assert pads.dataset(str(catalogue), partitioning="hive").count_rows() == 24
    manifest = result["manifest"]
    assert manifest["resources"]["gpus_per_actor"] == 1 and manifest["resources"]["actors"] == 2
    pool = result["pool"]
    assert len(pool) == 2 and len({a["node_id"] for a in pool}) == 2  # one actor per GPU node
    assert all(a["resources"].get("GPU") == 1 for a in pool)
    # The actors that got batches (with a toy model one may do them all) saw their own GPU.
    actors = manifest["actors"]
    assert actors and {a["node_id"] for a in actors} <= {a["node_id"] for a in pool}
    assert all(len(a["gpu_ids"]) == 1 for a in actors)
    assert all(a["device"] == "cpu" and a["precision"] == "float32" for a in actors)
    assert all(a["precision_check"]["why"] == "reduced precision is used on GPUs only" for a in actors)
    assert all(a["engine"] == "fused" for a in actors)  # the fast path behind Ensemble.predict
