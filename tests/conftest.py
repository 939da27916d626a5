"""Shared pytest fixtures."""

import pytest


# --- S3 on loopback (data layer; reusable by anything that talks to s3://) -------------------------------


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto_server(env: dict | None = None):
    """Start ``moto_server`` on a free loopback port and wait until it answers; returns (process, endpoint).
    ``env``: the server's environment (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0`` to check credentials)."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = _free_loopback_port()
    executable = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return process, endpoint
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto_server did not become healthy on {endpoint}")
            time.sleep(0.05)


def stop_process(process) -> None:
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (``moto_server``) on 127.0.0.1 for the session; yields its endpoint URL."""
    process, endpoint = start_moto_server()
    yield endpoint
    stop_process(process)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment pointing boto3 at ``s3_server`` with fake credentials, plus a fresh empty bucket.

    Yields a namespace: ``endpoint_url``, ``bucket`` and ``url`` (``s3://<bucket>``).
    """
    import types
    import uuid

    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    # Keep a developer's real ~/.aws config out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    yield types.SimpleNamespace(endpoint_url=s3_server, bucket=bucket, url=f"s3://{bucket}")


# --- One Ray instance for the whole session (worker-group start costs ~10 s; Ray start more) -------------


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray shared by every test that trains or tunes."""
    import os

    # Set before ray.init so the Train controller and workers inherit them.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


# Small enough that a Ray Train run of a few steps takes seconds on 2 cores.
FAST_TRAINING_OVERRIDES = [
    "model.fc_channels=64",
    "model.widths=[32, 16, 8]",
    "langevin.steps=3",
    "evaluation.inference_steps=4",
    "evaluation.inference_noise_free_steps=2",
    "training.batch_size=16",
    "data.demo_images=128",
    "run.log_every_steps=2",
    "run.eval_every_steps=4",
    "run.checkpoint_every_steps=4",
    "evaluation.at_end=[]",
]


@pytest.fixture(scope="session")
def two_worker_run(ray_session, demo_shards, tmp_path_factory):
    """One 2-worker Ray Train run of 2 epochs, shared by the training and latent tests (a run costs ~25 s here).

    116 training images over 2 ranks, batch 16: 4 steps per epoch, a checkpoint at the end of each epoch (steps
    4 and 8, both kept). Returns a namespace: ``result`` (train's dict), ``workdir``, ``cfg``. Tests that train
    more in ``workdir`` use other run names, except test_train_ray's same-name resume (which adds step 10)."""
    import types

    import pipeline
    from pipeline.distributed.trainer import train

    workdir = tmp_path_factory.mktemp("train-workdir")
    cfg = pipeline.load_config("tiny", [*FAST_TRAINING_OVERRIDES, "run.workers=2", "training.epochs=2",
                                        "run.name=two-workers", "run.checkpoint_every_steps=4",
                                        "run.checkpoints_to_keep=3"])
    cfg.data.url = demo_shards
    return types.SimpleNamespace(result=train(cfg, workdir=str(workdir)), workdir=workdir, cfg=cfg)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """128 demo images (32 px) as shards, shared by the training and tuning tests."""
    from pipeline.data import make_demo_data

    out = tmp_path_factory.mktemp("demo-shards")
    make_demo_data(str(out), 128, size=32, seed=0, holdout_fraction=0.1)
    return str(out)
