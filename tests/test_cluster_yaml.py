"""cluster.yaml passes the checks `ray up` makes (Ray's own schema, after Ray's own defaults), and so
do its commented Google Cloud and on-premises variants. No cloud account is needed."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
VARIANT = re.compile(r"^# ---- (.+?): replaces (.+?) ----\n(.*?)^# ---- end of variant ----", re.M | re.S)


def _validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)
    return prepared


def _variants() -> dict[str, dict]:
    """Each commented variant applied to the main config: its sections replace the ones it names."""
    text = CLUSTER_YAML.read_text()
    main = yaml.safe_load(text)
    variants = {}
    for name, replaced, body in VARIANT.findall(text):
        lines = [line.removeprefix("#").removeprefix(" ") for line in body.splitlines()]
        sections = yaml.safe_load("\n".join(lines))
        config = {k: v for k, v in main.items() if k not in {s.strip() for s in replaced.split(",")}}
        variants[name] = {**config, **sections}
    return variants


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_own_validation(cluster):
    prepared = _validated(cluster)
    assert prepared["provider"]["type"] == "aws"


def test_the_validation_can_fail(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        _validated(broken)


def test_gpu_workers_autoscale_one_gpu_task_per_gpu(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    workers = cluster["available_node_types"]["gpu_worker"]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1  # drivers run here
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert workers["resources"]["GPU"] == 1 and workers["resources"]["CPU"] >= 1
    assert 1 <= cluster["idle_timeout_minutes"] <= 30
    assert cluster["provider"]["cache_stopped_nodes"] is False


def test_pinned_versions_and_no_nightly_builds(cluster):
    values = yaml.safe_dump(cluster)  # everything but the comments
    docker = cluster["docker"]
    for image in (docker["image"], docker["head_image"], docker["worker_image"]):
        assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-(cpu|gpu|cu\d+)", image)
    assert re.search(r"-(gpu|cu\d+)$", docker["worker_image"]) and docker["head_image"].endswith("-cpu")
    assert "nightly" not in values and "dev0" not in values and "ray-wheels" not in values
    setup = cluster["head_setup_commands"] + cluster["worker_setup_commands"]
    torch_lines = [c for c in setup if " torch" in c]
    assert len(torch_lines) == 2 and all(c.endswith("torch==2.13.0") for c in torch_lines)
    assert any("/whl/cpu" in c for c in cluster["head_setup_commands"])
    assert any(re.search(r"/whl/cu\d+ ", c) for c in cluster["worker_setup_commands"])
    # speclabel itself comes from this checkout, mounted on every node, after torch.
    assert cluster["file_mounts"]["/home/ray/speclabel"] == "."
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        assert commands[-1] == "pip install --no-cache-dir /home/ray/speclabel"
    assert ".gitignore" in cluster["rsync_filter"]


def test_token_auth_on_every_node(cluster):
    options = cluster["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = next(o.split("=", 1)[1] for o in options if o.startswith("--env RAY_AUTH_TOKEN_PATH="))
    assert token_path in cluster["file_mounts"]


def test_the_commented_variants_are_valid_too():
    variants = _variants()
    assert set(variants) == {"Google Cloud variant", "on-premises variant"}
    gcp = _validated(variants["Google Cloud variant"])
    assert gcp["provider"]["type"] == "gcp"
    assert gcp["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    local = _validated(variants["on-premises variant"])
    assert local["provider"]["type"] == "local" and local["provider"]["worker_ips"]
    assert "--env RAY_AUTH_MODE=token" in local["docker"]["run_options"]
