"""pipeline.runtime: the workdir and an embedded local Ray started through public ``ray.init`` arguments only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_resolve_workdir_order(tmp_path, monkeypatch):
    from pipeline.runtime import DEFAULT_WORKDIR, resolve_workdir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARSEGEN_WORKDIR", raising=False)
    assert resolve_workdir(None) == tmp_path / DEFAULT_WORKDIR
    monkeypatch.setenv("SPARSEGEN_WORKDIR", str(tmp_path / "env"))
    assert resolve_workdir(None) == tmp_path / "env"
    assert resolve_workdir(str(tmp_path / "flag")) == tmp_path / "flag" and (tmp_path / "flag").is_dir()


def test_storage_path_for_ray():
    from pipeline.runtime import storage_path

    assert storage_path("/shared/runs") == ("/shared/runs", None)
    env = {k: os.environ.pop(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    try:
        assert storage_path("s3://bucket/runs") == ("s3://bucket/runs", None)  # Ray's own S3 filesystem
        os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
        path, filesystem = storage_path("s3://bucket/runs")
        assert path == "bucket/runs" and filesystem is not None  # explicit filesystem: no scheme
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ.update(env)


@pytest.mark.ray
def test_init_ray_starts_a_local_ray_that_runs_tasks(tmp_path):
    """No address: an embedded Ray with at least the asked CPUs that runs tasks; a second call reuses it."""
    code = (
        "import json, ray\n"
        "from pipeline.runtime import init_ray\n"
        "init_ray(None, 3)\n"
        "@ray.remote(num_cpus=1)\n"
        "def square(x):\n"
        "    return x * x\n"
        "out = {'squares': ray.get([square.remote(i) for i in range(3)]),\n"
        "       'cpus': ray.cluster_resources().get('CPU'),\n"
        "       'nodes': len([n for n in ray.nodes() if n['Alive']])}\n"
        "init_ray(None, 1)  # already initialised: reused, no second start\n"
        "print(json.dumps(out))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["squares"] == [0, 1, 4]
    assert out["cpus"] >= 3 and out["nodes"] == 1
