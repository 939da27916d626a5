"""End to end on loopback: local stack -> demo data on S3 -> `sparsegen submit train` to the Ray head ->
checkpoints on S3, tracking on the MLflow server -> checks through the REST API and the bucket.

Also checks that the stack's (recognisable, fake) credentials never reach MLflow params/tags, the job's
logs or the checkpoint files.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from infra.stack import DEV_AWS_ACCESS_KEY_ID, DEV_AWS_SECRET_ACCESS_KEY
from tests.conftest import FAST_TRAINING_OVERRIDES
from tests.stack_fixture import local_stack, stack_env  # noqa: F401  (pytest fixtures)
from tests.test_infra_stack import last_json, run_cli

pytestmark = pytest.mark.e2e
SECRETS = (DEV_AWS_ACCESS_KEY_ID, DEV_AWS_SECRET_ACCESS_KEY)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_submit_train_job_on_local_stack(stack_env):
    import boto3

    env = {**__import__("os").environ, **stack_env}
    bucket = stack_env["SPARSEGEN_BUCKET"]
    data_url = f"s3://{bucket}/demo32"
    made = run_cli("make-demo-data", "--out", data_url, "--n", "128", "--size", "32", "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert last_json(made)["written"] == 128

    overrides = sum((["--set", o] for o in FAST_TRAINING_OVERRIDES), [])
    submitted = run_cli(
        "submit", "train", "--address", stack_env["RAY_ADDRESS"], "--json", "--",
        "--preset", "tiny", *overrides, "--data", data_url, "--workers", "1", "--max-steps", "4",
        "--storage", f"s3://{bucket}/runs", "--name", "e2e-run", "--experiment", "e2e",
        "--register-model", "e2e-generator", "--json",
        env=env, timeout=600,
    )
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert last_json(submitted)["status"] == "SUCCEEDED"
    assert "[sparsegen] step 4/4 (100%) |" in logs and "images/s | reconstruction MSE" in logs  # progress in job logs
    # Once each: Ray Train's print patch sends a print to a wrapped stdout to its logger too (the lines came twice).
    assert logs.count("[sparsegen] step 4/4 (100%) |") == 1, logs[-3000:]
    for secret in SECRETS:
        assert secret not in logs

    # The run through the MLflow REST API: one run, metrics, params without credentials.
    server = stack_env["MLFLOW_TRACKING_URI"].rstrip("/")
    experiment = _get(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=e2e")["experiment"]
    request = urllib.request.Request(
        f"{server}/api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read())["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metric_names = {m["key"] for m in run["data"]["metrics"]}
    assert {"reconstruction_mse", "generator_loss", "images_per_s"} <= metric_names
    dumped = json.dumps(run["data"])
    for secret in SECRETS:
        assert secret not in dumped

    # The sample grid downloads through the tracking server's artifact proxy.
    run_id = run["info"]["run_id"]
    listing = _get(f"{server}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=samples")
    png = next(f["path"] for f in listing["files"] if f["path"].endswith(".png"))
    query = urllib.parse.urlencode({"path": png, "run_uuid": run_id})
    with urllib.request.urlopen(f"{server}/get-artifact?{query}", timeout=30) as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"

    # Checkpoint objects are in the bucket, and hold no credentials.
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/e2e-run/").get("Contents", [])]
    assert any(k.endswith("/state.pt") for k in keys) and any("/latents/part-r00000-of-" in k for k in keys)
    for key in keys:
        if key.endswith((".json", ".pt")):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            for secret in SECRETS:
                assert secret.encode() not in body, key


    # Issue 14 through the server: step-keyed images, the dataset input, a registered model that generates.
    names = [f["path"].rsplit("/", 1)[-1].replace("%", "+")
             for f in _get(f"{server}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=images")["files"]]
    assert any(n.startswith("samples+step+4+") for n in names), names
    (dataset_input,) = run["inputs"]["dataset_inputs"]
    assert json.loads(dataset_input["dataset"]["source"])["uri"] == data_url
    versions = _get(f"{server}/api/2.0/mlflow/registered-models/get?name=e2e-generator")["registered_model"]
    assert versions["latest_versions"][0]["version"] == "1"
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(server)
    model = mlflow.pytorch.load_model("models:/e2e-generator/1")
    with torch.no_grad():
        assert model(torch.randn(3, model.latent_dim)).shape == (3, 3, 32, 32)

    # With the Ray storage gone, the run's checkpoint comes from MLflow's (proxied, S3-backed) artifacts.
    for key in keys:
        s3.delete_object(Bucket=bucket, Key=key)
    evaluated = run_cli("evaluate", "--run", run_id, "--tracking-uri", server, "--metrics", "mse", "--no-progress",
                        "--json", env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert last_json(evaluated)["holdout_mse_pm1"] > 0
