"""A real two-node Ray cluster on loopback (issue 13 item 4).

``ray.cluster_utils.Cluster`` starts two raylets: a head with 2 CPUs and the driver resource that
``ray_cluster.yaml`` gives on-demand nodes, and a second node with 2 CPUs (a "spot worker"); a run of 2
workers with 2 CPUs each must put one worker on each node (DDP over gloo between the raylets). On it:

1. a 2-worker ``tiny`` run with checkpoints on S3 (moto, the storage every node reaches) loses rank 1 at
   step 6 (injected crash: the worker process exits), Ray Train restarts the worker group from the step-4
   checkpoint and the run finishes at step 10 with one MLflow run (sqlite store); its end-of-training
   evaluation runs as a Ray task, not in the driver, and its metrics land in the run. (A shared directory
   as storage is the same code path past pyarrow's filesystem; its crash-resume runs in test_train_ray.)
2. a 2-trial ``sparsegen tune --storage DIR`` search leaves one parent and two child runs and the trials'
   checkpoints under DIR.

The cluster lives in a subprocess (this file run as a script) with its own RAY_TMPDIR: the test session's
own Ray stays untouched, and no other Ray on the machine can find this cluster's address file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_S = 420
# Two CPUs per worker on nodes of two CPUs each: one worker per node.
RUN_OVERRIDES = ["run.workers=2", "run.cpus_per_worker=2", "training.max_steps=10", "run.crash_rank=1", "run.crash_at_step=6",
                 "run.max_failures=2"]
SEARCH_SPACE = """\
metric: reconstruction_mse
mode: min
search: random
scheduler: none
set:
  training.max_steps: 4
  run.workers: 1
  run.checkpoint_every_steps: 2
  run.eval_every_steps: 4
parameters:
  langevin.step_size: {choice: [0.1, 0.2]}
"""


@pytest.fixture(scope="module")
def cluster_report(tmp_path_factory, demo_shards, s3_server):
    """Run the scenario once in a subprocess; returns its report (facts gathered on the cluster)."""
    import uuid

    import boto3

    workdir = tmp_path_factory.mktemp("multinode")
    bucket = f"multinode-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                                                              "MLFLOW_TRACKING_URI", "AWS_PROFILE",
                                                              "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": s3_server, "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials", "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1") \
        .client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    # Short: Ray's socket paths must stay under 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="sgmn-", dir="/tmp")
    env.update({"RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO_ROOT),
                # Loopback as the node IP of both raylets (see infra/stack.py, "Loopback only").
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    args = {"workdir": str(workdir), "data": demo_shards, "s3": f"s3://{bucket}"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    wall_s = time.monotonic() - started
    subprocess.run(["rm", "-rf", ray_tmp], check=False)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines and lines[-1].startswith("{"), \
        f"scenario failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(lines[-1])
    report["wall_s"] = wall_s
    report["bucket"] = bucket
    return report


def test_cluster_has_two_raylets_with_a_driver_node(cluster_report):
    nodes = cluster_report["nodes"]
    assert len(nodes) == 2 and all(n["ip"] == "127.0.0.1" for n in nodes)
    head = [n for n in nodes if n["resources"].get("sparsegen_driver")]
    assert len(head) == 1 and head[0]["node_id"] == cluster_report["driver_node"]
    # A trial driver asking for the driver resource lands on the on-demand node only.
    assert cluster_report["trial_driver_resources"] == {"CPU": 0, "sparsegen_driver": 1}
    assert cluster_report["trial_driver_node"] == cluster_report["driver_node"]


def test_worker_lost_mid_run_resumes_from_latest_checkpoint_on_s3_with_one_mlflow_run(cluster_report):
    run = cluster_report["run"]
    assert run["crash_marker"], "the fault was never injected"
    # The workers sat on both raylets (one per node: each holds one 2-CPU worker), before and after the restart.
    assert len(set(run["worker_nodes"])) == 2, run["worker_nodes"]
    assert run["restarted_workers"] >= 4, "the worker group was not restarted after the crash"  # 2 + 2
    assert run["checkpoint_step"] == 10 and run["world_size"] == 2
    assert run["mlflow_runs"] == 1 and run["status"] == "FINISHED"
    assert run["max_metric_step"] == 10
    assert run["checkpoint"].startswith(f"s3://{cluster_report['bucket']}/runs/")
    assert run["s3_checkpoint_objects"] > 0


def test_end_of_training_evaluation_ran_as_a_ray_task_and_landed_in_mlflow(cluster_report):
    run = cluster_report["run"]
    assert run["evaluation"]["pid"] != cluster_report["driver_pid"], "the evaluation ran in the driver"
    assert run["evaluation"]["assigned_resources"].get("CPU") == 2.0  # one node's share of the workers' CPUs
    assert run["eval_metric"] > 0 and run["eval_tags"]["sparsegen.evaluation.device"] == "cpu"
    assert "evaluation/evaluation.json" in run["artifacts"]


def test_search_with_storage_on_the_cluster(cluster_report):
    search = cluster_report["search"]
    assert search["exit_code"] == 0, search
    assert search["trials_finished"] == 2 and search["children"] == 2 and search["parents"] == 1
    assert len(search["trial_checkpoint_dirs"]) == 2, search
    assert search["tune_state"], "no Tune state under <storage>/tune"
    # The trials' drivers asked for the driver resource: they ran on the on-demand node only.
    assert search["trial_driver_nodes"] == [cluster_report["driver_node"]], search


def test_multinode_scenario_is_ci_sized(cluster_report):
    assert cluster_report["wall_s"] < SCENARIO_TIMEOUT_S
    print(f"multi-node scenario: {cluster_report['wall_s']:.0f} s ({cluster_report['timings']})")


# --- the scenario, run as a script in its own process ------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_workers() -> dict[str, str]:
    """actor id -> node id of every Train worker actor the cluster has had (dead ones included)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors}


def _run_facts(result: dict, workdir: Path, workers_before: dict[str, str]) -> dict:
    from pipeline.distributed.checkpoint import load_checkpoint
    from pipeline.tracking import mlflow_run

    client = mlflow_run.client(result["tracking_uri"])
    experiment = client.get_experiment_by_name("sparsegen")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{mlflow_run.RUN_NAME_TAG}` = '{result['name']}'")
    history = client.get_metric_history(result["run_id"], "reconstruction_mse")
    loaded = load_checkpoint(result["checkpoint"])
    workers = {k: v for k, v in _train_workers().items() if k not in workers_before}
    return {
        "checkpoint": result["checkpoint"], "checkpoint_step": loaded.meta["step"],
        "world_size": loaded.meta["world_size"], "mlflow_runs": len(runs), "status": runs[0].info.status,
        "max_metric_step": max(m.step for m in history),
        "crash_marker": (workdir / "faults" / f"{result['name']}-rank1-step6").exists(),
        "worker_nodes": sorted(set(workers.values())), "restarted_workers": len(workers),
        "artifacts": [a.path for a in client.list_artifacts(result["run_id"], "evaluation")],
        "eval_tags": {k: v for k, v in client.get_run(result["run_id"]).data.tags.items() if "evaluation" in k},
    }


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def scenario(args: dict) -> dict:
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from pipeline.distributed.placement import DRIVER_RESOURCE, trial_driver_resources
    from pipeline.distributed.trainer import train
    from tests.conftest import FAST_TRAINING_OVERRIDES

    timings, started = {}, time.monotonic()
    workdir = Path(args["workdir"])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {DRIVER_RESOURCE: 2}, "node_ip_address": "127.0.0.1", "gcs_server_port": _free_port(),
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
        "dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port(),
        "ray_client_server_port": _free_port()})
    cluster.add_node(num_cpus=2, resources={"spot_worker": 1}, node_ip_address="127.0.0.1",
                     metrics_export_port=_free_port())
    ray.init(address=cluster.address, log_to_driver=True)
    cluster.wait_for_nodes()
    report = {"driver_pid": os.getpid(), "driver_node": ray.get_runtime_context().get_node_id(),
              "nodes": [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                        for n in ray.nodes() if n["Alive"]]}
    timings["cluster_s"] = round(time.monotonic() - started, 1)

    resources = trial_driver_resources(0.5)
    report["trial_driver_resources"] = resources
    where = ray.remote(_node_id).options(
        num_cpus=resources.get("CPU", 0), resources={k: v for k, v in resources.items() if k != "CPU"})
    report["trial_driver_node"] = ray.get(where.remote())

    begun = time.monotonic()
    location = f"{args['s3']}/runs"
    cfg = load_config("tiny", [*FAST_TRAINING_OVERRIDES, *RUN_OVERRIDES, "run.name=multinode-s3",
                               "evaluation.at_end=[mse]", "evaluation.mse_images=8"])
    cfg.data.url = args["data"]
    cfg.run.storage = location
    before = _train_workers()
    result = train(cfg, workdir=str(workdir))
    facts = _run_facts(result, workdir, before)
    summary = json.loads((workdir / "evaluations" / result["name"] / "evaluation.json").read_text())
    facts["evaluation"] = summary["ran_on"]
    facts["eval_metric"] = result["metrics"].get("holdout_mse_pm1", 0)
    from pipeline.data import storage as store

    bucket, prefix = store.split_s3(location)
    listed = store.s3_client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/multinode-s3/")
    facts["s3_checkpoint_objects"] = listed.get("KeyCount", 0)
    report["run"] = facts
    timings["run_s"] = round(time.monotonic() - begun, 1)

    begun = time.monotonic()
    report["search"] = _search(workdir, args["data"])
    timings["search_s"] = round(time.monotonic() - begun, 1)
    report["timings"] = timings
    ray.shutdown()
    cluster.shutdown()
    return report


def _search(workdir: Path, data: str) -> dict:
    import contextlib
    import io

    from pipeline.cli import main
    from pipeline.tracking import mlflow_run
    from tests.conftest import FAST_TRAINING_OVERRIDES

    space = workdir / "space.yaml"
    space.write_text(SEARCH_SPACE)
    storage = workdir / "search-storage"
    uri = f"sqlite:///{workdir / 'search-mlflow.db'}"
    argv = ["tune", "--preset", "tiny", "--data", data, "--space", str(space), "--trials", "2",
            "--max-concurrent", "2", "--name", "multinode-search", "--workdir", str(workdir / "search-work"),
            "--storage", str(storage), "--tracking-uri", uri, "--seed", "0", "--json"]
    for item in FAST_TRAINING_OVERRIDES:
        argv += ["--set", item]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    sys.stdout.write(out.getvalue())
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    client = mlflow_run.client(uri)
    experiment = client.get_experiment_by_name("sparsegen")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sparsegen.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    runs_dir = storage / "runs"
    from ray.util.state import list_actors

    trial_drivers = list_actors(filters=[("class_name", "=", "ImplicitFunc")], limit=100, raise_on_missing_output=False)
    return {"exit_code": code, "trial_driver_nodes": sorted({a.node_id for a in trial_drivers}), "trials_finished": summary.get("trials_finished"), "parents": len(parents),
            "children": len(children),
            "trial_checkpoint_dirs": sorted({p.parent.name for p in runs_dir.glob("*/checkpoint_*") if p.is_dir()}),
            "tune_state": any((storage / "tune" / "multinode-search").glob("experiment_state-*.json"))}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    print(json.dumps(scenario(json.loads(sys.argv[1])), default=str))
