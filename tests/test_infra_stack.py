"""The local dev stack (`sparsegen stack`) and job submission (`sparsegen submit`).

Tests marked e2e start real services (moto, MLflow, a Ray head) on loopback ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import stack
from pipeline.distributed import submit

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "MLFLOW_")) and k != "SPARSEGEN_BUCKET"}
    env["AWS_CONFIG_FILE"] = "/nonexistent/aws-config"
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/aws-credentials"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO_ROOT, env=env or _clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr: {proc.stderr[-2000:]}"
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------- fast


def test_submit_and_stack_help():
    for args in (["submit", "train", "--help"], ["submit", "tune", "--help"], ["stack", "up", "--help"],
                 ["stack", "down", "--help"], ["stack", "status", "--help"]):
        proc = run_cli(*args, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "--json" in proc.stdout
    assert "--address" in run_cli("submit", "train", "--help").stdout


def test_cli_modules_import_no_heavy_libraries():
    code = ("import sys; import pipeline.cli.stack, pipeline.cli.submit; "
            "print(sorted(m for m in ('ray', 'mlflow', 'boto3', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_submit_without_address_is_a_one_line_error():
    proc = run_cli("submit", "train", "--json", "--", "--epochs", "1")
    assert proc.returncode == 2
    assert last_json(proc) == {"ok": False, "error": "no Ray address: pass --address http://HOST:8265 or set RAY_ADDRESS"}
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("sparsegen submit train: error: no Ray address")


def test_submit_rejects_gcs_address_and_unreachable_api():
    proc = run_cli("submit", "tune", "--address", "127.0.0.1:6379")
    assert proc.returncode == 2 and "dashboard URL" in proc.stderr
    port = stack.free_ports(1)[0]
    proc = run_cli("submit", "train", "--json", "--address", f"http://127.0.0.1:{port}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    payload = last_json(proc)
    assert payload["ok"] is False and "cannot reach" in payload["error"]


def test_entrypoint_and_runtime_env(monkeypatch, tmp_path):
    assert submit.build_entrypoint("train", ["--config", "a b.yaml", "--x=1"]) == \
        "python jobs/train.py --config 'a b.yaml' --x=1"
    with pytest.raises(submit.SubmitError):
        submit.build_entrypoint("evaluate", [])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp")
    runtime_env = submit.build_runtime_env(working_dir=REPO_ROOT)
    # Credentials and the client's (port-forwarded) tracking URI stay home by default.
    assert runtime_env["env_vars"] == {"MLFLOW_EXPERIMENT_NAME": "exp"}
    assert Path(runtime_env["working_dir"]) == REPO_ROOT
    assert {".venv", ".git", "sparsegen-work", "mlruns", "runs", "*.db"} <= set(runtime_env["excludes"])
    runtime_env = submit.build_runtime_env(working_dir=REPO_ROOT, forward_env=["MLFLOW_TRACKING_URI"],
                                           env={"A": "1"})
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "A": "1"}
    with pytest.raises(submit.SubmitError, match="forward-aws-credentials"):
        submit.build_runtime_env(working_dir=REPO_ROOT, forward_env=["AWS_SECRET_ACCESS_KEY"])
    with_creds = submit.build_runtime_env(working_dir=REPO_ROOT, forward_aws_credentials=True)["env_vars"]
    assert with_creds["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE" and with_creds["AWS_SECRET_ACCESS_KEY"] == "secret"
    with pytest.raises(submit.SubmitError, match="no jobs/"):
        submit.build_runtime_env(working_dir=tmp_path)


def test_ray_token_lookup(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(submit.SubmitError, match="no token"):
        submit.auth_headers()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default-token\n")
    assert submit.auth_headers() == {"Authorization": "Bearer default-token"}
    token_file = tmp_path / "tok"
    token_file.write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert submit.auth_headers() == {"Authorization": "Bearer file-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert submit.auth_headers() == {"Authorization": "Bearer env-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}


def test_jobs_entry_points_dispatch_to_cli():
    for kind in ("train", "tune"):
        text = (REPO_ROOT / "jobs" / f"{kind}.py").read_text()
        assert f'main(["{kind}", *sys.argv[1:]])' in text
        assert "raise SystemExit" in text
    # The entry point really reaches the CLI dispatcher: `jobs/train.py --help` -> `sparsegen train --help`
    # (or argparse's "invalid choice" while `train` is not registered yet; never an ImportError).
    proc = subprocess.run([sys.executable, "jobs/train.py", "--help"], cwd=REPO_ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2)
    assert "train" in proc.stdout + proc.stderr


def test_status_and_down_without_a_stack(tmp_path):
    proc = run_cli("stack", "status", "--dir", str(tmp_path), "--json")
    assert proc.returncode == 1
    assert last_json(proc)["exists"] is False
    proc = run_cli("stack", "down", "--dir", str(tmp_path), "--json")
    assert proc.returncode == 0
    assert last_json(proc)["stopped"] is False


def test_up_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_cli("stack", "up", "--dir", str(tmp_path), "--mlflow-port", str(busy.getsockname()[1]))
    assert proc.returncode == 2
    assert "--mlflow-port" in proc.stderr and "in use" in proc.stderr
    assert not (tmp_path / "stack.json").exists()


# ------------------------------------------------------------------------------------------ e2e

FAKE_JOB = '''
import os, sys, boto3
from pathlib import Path
print("job python:", sys.executable)
assert Path(sys.executable).parent == Path(os.environ["EXPECTED_BIN"]), sys.executable
assert os.environ["RAY_AUTH_MODE"] == "token"
assert os.environ["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
if sys.argv[1:] == ["--name", "fail"]:  # a valid train argument: submit checks them before submitting
    sys.exit(3)
import ray
ray.init()
assert ray.get(ray.remote(lambda: 21 * 2).remote()) == 42
# S3 access comes from the head's environment (the local analogue of an instance profile).
boto3.client("s3").put_object(Bucket=os.environ["SPARSEGEN_BUCKET"], Key="jobs/hello.txt", Body=b"hi")
print("JOB-OK", sys.argv[1:])
'''


def _foreign_process() -> subprocess.Popen:
    """Stands in for a Ray instance the user runs elsewhere: its command line mentions raylet/gcs_server,
    which `ray stop` would match; `stack down` must leave it alone."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "raylet", "gcs_server"],
                            start_new_session=True)


def _assert_all_gone(state: dict) -> None:
    psutil = stack.import_psutil()
    for name, service in state["services"].items():
        assert stack.session_members(service) == [], f"{name} left processes behind"
        for record in service["pids"]:
            if psutil.pid_exists(record["pid"]):
                proc = psutil.Process(record["pid"])
                assert proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - record["create_time"]) > 0.05
        ports = set(service["ports"].values())
        # The test session's own Ray (a descendant of this process) binds random ports too and may take one the
        # stack just released: that is reuse, not a leak of the stack's.
        ours = {child.pid for child in psutil.Process().children(recursive=True)}
        listening = {c.laddr.port for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.pid not in ours}
        assert not listening, f"{name} ports {listening} still listening"
        reused = {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.pid in ours and c.laddr}
        for port in ports - reused:
            assert stack.port_is_free(port), f"{name} port {port} still bound"


@pytest.mark.e2e
def test_stack_up_status_down_twice(tmp_path):
    state_dir = tmp_path / "stack"
    foreign = _foreign_process()
    timings = {}
    try:
        for cycle in range(2):
            t0 = time.monotonic()
            proc = run_cli("stack", "up", "--dir", str(state_dir), "--json", "--quiet")
            timings[f"up{cycle}"] = time.monotonic() - t0
            assert proc.returncode == 0, proc.stderr[-3000:]
            up = last_json(proc)
            env = up["env"]
            assert set(env) >= {"MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                "AWS_SECRET_ACCESS_KEY", "SPARSEGEN_BUCKET", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}
            for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL"):
                assert env[key].startswith("http://127.0.0.1:")
            token_path = Path(env["RAY_AUTH_TOKEN_PATH"])
            assert token_path.stat().st_mode & 0o077 == 0
            assert token_path.read_text().strip() not in proc.stdout + proc.stderr
            state = stack.load_state(state_dir)

            # status: everything healthy, and the same env
            proc = run_cli("stack", "status", "--dir", str(state_dir), "--json")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            report = last_json(proc)
            assert report["running"] and report["env"] == env
            assert report["services"]["ray"]["auth_mode"] == "token"

            # loopback only: every listening socket of every process we started
            all_procs = [p for s in state["services"].values() for p in stack.session_members(s)]
            sockets = stack.listening_sockets(all_procs)
            assert len(sockets) >= 8
            assert {ip for _, ip, _ in sockets} <= stack.LOOPBACK_IPS, sockets

            # Ray token auth is on: no token, no API
            assert stack.http_get(env["RAY_ADDRESS"] + "/api/version")[0] == 401
            assert stack.http_get(env["RAY_ADDRESS"] + "/api/version",
                                  headers={"Authorization": "Bearer wrong"})[0] == 403

            if cycle == 0:
                # `up` again while running is a no-op that reports the same env
                proc = run_cli("stack", "up", "--dir", str(state_dir), "--json", "--quiet")
                assert proc.returncode == 0 and last_json(proc)["already_running"] is True
                assert last_json(proc)["env"] == env
                _check_mlflow_artifacts_reach_s3(env)
                _check_job_submission(env, tmp_path)
            else:
                # a dead service is detected
                moto_pid = state["services"]["s3"]["pid"]
                os.kill(moto_pid, signal.SIGKILL)
                stack._wait_until(lambda: not stack.session_members(state["services"]["s3"]), timeout=10)
                proc = run_cli("stack", "status", "--dir", str(state_dir), "--json")
                assert proc.returncode == 1
                report = last_json(proc)
                assert report["running"] is False
                assert report["services"]["s3"]["alive"] is False and report["services"]["ray"]["healthy"]
                assert "DEGRADED" in run_cli("stack", "status", "--dir", str(state_dir)).stdout

            t0 = time.monotonic()
            proc = run_cli("stack", "down", "--dir", str(state_dir), "--json")
            timings[f"down{cycle}"] = time.monotonic() - t0
            assert proc.returncode == 0, proc.stderr
            assert last_json(proc)["stopped"] is True
            _assert_all_gone(state)
            assert foreign.poll() is None, "stack down killed a process it did not start"
            # down again: nothing to do
            proc = run_cli("stack", "down", "--dir", str(state_dir), "--json")
            assert proc.returncode == 0 and last_json(proc)["stopped"] is False
            assert run_cli("stack", "status", "--dir", str(state_dir)).returncode == 1
    finally:
        with pytest.MonkeyPatch.context():
            if stack.load_state(state_dir) is not None:
                stack.down(state_dir)
        foreign.kill()
        foreign.wait()
        print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


def _check_mlflow_artifacts_reach_s3(env: dict[str, str]) -> None:
    """MLflow proxies artifacts to s3://BUCKET/mlflow on moto (so the server got the AWS env)."""
    code = (
        "import mlflow, os, tempfile, pathlib\n"
        "mlflow.set_experiment('stack-test')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_param('p', 1)\n"
        "    d = pathlib.Path(tempfile.mkdtemp()) / 'note.txt'; d.write_text('hello')\n"
        "    mlflow.log_artifact(str(d))\n"
        "print(run.info.run_id)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_clean_env(**env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=env["SPARSEGEN_BUCKET"], Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/note.txt") for k in keys), keys


def _check_job_submission(env: dict[str, str], tmp_path: Path) -> None:
    """`sparsegen submit train` against the stack: token auth, venv python, inherited S3/MLflow env."""
    work = tmp_path / "jobdir"
    (work / "jobs").mkdir(parents=True)
    (work / "jobs" / "train.py").write_text(FAKE_JOB)
    client_env = _clean_env(RAY_ADDRESS=env["RAY_ADDRESS"], RAY_AUTH_MODE="token",
                            RAY_AUTH_TOKEN_PATH=env["RAY_AUTH_TOKEN_PATH"])
    expected_bin = str(Path(sys.executable).parent)
    proc = run_cli("submit", "train", "--json", "--working-dir", str(work), "--env", f"EXPECTED_BIN={expected_bin}",
                   "--", "--epochs", "1", env=client_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc)
    assert result["status"] == "SUCCEEDED" and result["succeeded"] is True
    assert result["entrypoint"] == "python jobs/train.py --epochs 1"
    assert "JOB-OK ['--epochs', '1']" in proc.stderr  # logs are streamed (to stderr with --json)
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    assert s3.get_object(Bucket=env["SPARSEGEN_BUCKET"], Key="jobs/hello.txt")["Body"].read() == b"hi"

    # A failing job -> exit 1 with the final status.
    proc = run_cli("submit", "train", "--json", "--working-dir", str(work), "--env", f"EXPECTED_BIN={expected_bin}",
                   "--", "--name", "fail", env=client_env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert last_json(proc)["status"] == "FAILED"

    # Without the token the job API refuses: a one-line error, exit 2.
    no_token = _clean_env(RAY_ADDRESS=env["RAY_ADDRESS"], HOME=str(tmp_path))
    proc = run_cli("submit", "train", "--working-dir", str(work), "--no-wait", env=no_token)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "sparsegen submit train: error:" in proc.stderr
