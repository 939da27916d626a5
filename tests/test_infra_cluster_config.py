"""ray_cluster.yaml against Ray's own cluster-config schema, and infra/Dockerfile sanity."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
DOCKERFILE = REPO_ROOT / "infra" / "Dockerfile"


def load_cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate(config: dict) -> dict:
    """What `ray up` checks before talking to AWS, through public pieces of Ray: the provider's defaults
    merged in (``ray.autoscaler.sdk.fillout_defaults``), the result against the cluster-config JSON schema
    that ships with Ray (``ray/autoscaler/ray-schema.json``), then the checks across fields that the schema
    cannot express (the head type is one of the node types; the node types' ``min_workers`` fit under the
    global ``max_workers``)."""
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler import sdk

    prepared = sdk.fillout_defaults(copy.deepcopy(config))
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(prepared, schema)
    nodes = prepared["available_node_types"]
    if prepared["head_node_type"] not in nodes:
        raise ValueError(f"head_node_type {prepared['head_node_type']!r} is not one of available_node_types")
    if sum(n.get("min_workers", 0) for n in nodes.values()) > prepared["max_workers"]:
        raise ValueError("the node types' min_workers add up to more than the global max_workers")
    return prepared


def test_cluster_config_passes_ray_schema():
    prepared = validate(load_cluster_config())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _mutations():
    def unknown_top_level_key(c):
        c["max_worker"] = 3  # typo of max_workers; the schema forbids unknown keys

    def negative_resource(c):
        c["available_node_types"]["head"]["resources"] = {"CPU": -1}

    def missing_node_config(c):
        del c["available_node_types"]["gpu_worker"]["node_config"]

    def head_type_not_defined(c):
        c["head_node_type"] = "nonexistent"

    def min_workers_exceed_max(c):
        c["available_node_types"]["gpu_worker"]["min_workers"] = 10  # global max_workers is smaller

    def bad_docker_key(c):
        c["docker"]["imagee"] = c["docker"]["image"]

    def commands_not_a_list(c):
        c["head_start_ray_commands"] = "ray start --head"

    return [unknown_top_level_key, negative_resource, missing_node_config, head_type_not_defined,
            min_workers_exceed_max, bad_docker_key, commands_not_a_list]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_mutated_cluster_config_fails_validation(mutate):
    import jsonschema

    config = load_cluster_config()
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validate(config)


def test_cluster_layout_and_security():
    config = load_cluster_config()
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "training must not land on the head"
    assert "min_workers" not in head or head["min_workers"] == 0
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert any(re.match(r"(g5|g6|p4d|p5)\.", w["node_config"]["InstanceType"]) for w in workers)
    assert any(w["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for w in workers)
    for node in nodes.values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    assert config["docker"]["image"] and config["docker"]["container_name"]
    assert any("RAY_AUTH_MODE=token" in opt for opt in config["docker"]["run_options"])
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert any("-c constraints.txt" in cmd for cmd in config["setup_commands"])
    # No credentials in the config.
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AKIA[0-9A-Z]{16}", text)


def test_drivers_stay_off_spot_nodes():
    """Train/Tune drivers die with their node: only on-demand node types advertise the driver resource that
    Tune trial drivers ask for (pipeline/distributed/placement.py); job entrypoints run on the head."""
    from pipeline.distributed.placement import DRIVER_RESOURCE, trial_driver_resources

    config = load_cluster_config()
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 1, "the on-demand head must host drivers"
    assert "InstanceMarketOptions" not in head["node_config"]
    for name, node in nodes.items():
        spot = node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        if spot:
            assert DRIVER_RESOURCE not in node.get("resources", {}), f"{name} is spot but could host drivers"
    # What a trial driver asks for on this cluster (summed resources of its node types) and elsewhere.
    advertised = {DRIVER_RESOURCE: float(head["resources"][DRIVER_RESOURCE]), "CPU": 0.0}
    assert trial_driver_resources(0.5, advertised) == {"CPU": 0, DRIVER_RESOURCE: 1}
    assert trial_driver_resources(0.5, {"CPU": 4.0}) == {"CPU": 0.5}
    # The head's drivers are documented where users read about the cluster.
    assert DRIVER_RESOURCE in (REPO_ROOT / "docs" / "cluster.md").read_text()


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = current.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            current = ""
    assert not current, "dangling line continuation"
    return instructions


def test_dockerfile_parses_pins_torch_and_installs_project():
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "LABEL", "EXPOSE", "ENTRYPOINT",
             "CMD", "SHELL", "HEALTHCHECK", "VOLUME", "STOPSIGNAL", "ONBUILD"}
    instructions = _dockerfile_instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in instructions]
    assert set(keywords) <= known, set(keywords) - known
    assert keywords.index("FROM") < keywords.index("RUN")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instructions if k == "ARG" and "=" in a}
    # Base image: Ray 2.60 on Python 3.11 with CUDA.
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-cu\d+", args["BASE_IMAGE"])
    # torch pinned to the version constraints.txt pins, from the CUDA wheel index.
    constraints = (REPO_ROOT / "constraints.txt").read_text()
    pinned = re.search(r"^torch==(\S+)", constraints, re.M).group(1)
    assert args["TORCH_VERSION"] == pinned == "2.13.0"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs
    # The project is installed under the same constraints.
    assert "pip install -c constraints.txt ." in runs
    copies = " ".join(a for k, a in instructions if k == "COPY")
    for path in ("pyproject.toml", "constraints.txt", "pipeline", "infra", "jobs"):
        assert path in copies
    for path in ("pyproject.toml", "constraints.txt", "pipeline", "infra", "jobs"):
        assert (REPO_ROOT / path).exists(), path
    assert ":latest" not in DOCKERFILE.read_text()
