"""`sparsegen train|tune|ablation|submit` answer bad input with one line naming the fix, exit code 2, within
15 s, before anything trains; every config mistake of a command at once; `--debug` adds the traceback
(issue 13 item 7)."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.cli import main

UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "SPARSEGEN_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance-metadata address


@pytest.fixture(autouse=True)
def _nothing_trains(monkeypatch):
    """A check that let bad input through would start training: fail loudly instead of training."""
    import pipeline.distributed.trainer as trainer
    import pipeline.tuning.ablation as ablation
    import pipeline.tuning.search as search

    def refuse(*args, **kwargs):
        raise AssertionError("training started although the input was bad")

    monkeypatch.setattr(trainer, "train", refuse)
    monkeypatch.setattr(search, "run_search", refuse)
    monkeypatch.setattr(ablation, "run_ablation", refuse)


def _run(argv, capsys):
    started = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as exit_:  # config mistakes of train leave through argparse-style exit(2)
        code = exit_.code
    elapsed_s = time.monotonic() - started
    captured = capsys.readouterr()
    return code, captured.err, captured.out, elapsed_s


def _assert_one_line(code, err, out, elapsed_s, expected):
    assert code == 2 and expected in err, err
    assert "Traceback" not in err + out and elapsed_s < 15, (elapsed_s, err)
    assert len(err.strip().splitlines()) == 1, err


def _command(command, tmp_path):
    workdir = ["--workdir", str(tmp_path)]
    return {
        "train": ["train", "--preset", "tiny", "--max-steps", "1", *workdir],
        "tune": ["tune", "--preset", "tiny", "--space", "cpu-small", "--trials", "1", *workdir],
        "ablation": ["ablation", "--preset", "tiny", "--max-steps", "1", *workdir],
    }[command]


# --- train, tune, ablation: data, MLflow, Ray ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "tune", "ablation"])
@pytest.mark.parametrize("argv, expected", [
    (["--data", "/nonexistent/x"], "--data /nonexistent/x does not exist: no dataset at /nonexistent/x"),
    (["--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers at http://127.0.0.1:9"),
    (["--address", UNREACHABLE], f"no Ray cluster answers at {UNREACHABLE}"),
    (["--address", "http://127.0.0.1:8265"], "the Ray job API (dashboard) address: give the GCS address HOST:6379"),
], ids=["missing-data", "mlflow", "ray", "ray-http"])
def test_bad_outside_world_is_one_line_exit_2(command, argv, expected, tmp_path, capsys):
    _assert_one_line(*_run([*_command(command, tmp_path), *argv], capsys), expected)


def test_every_unreachable_service_is_named_in_the_one_line(tmp_path, capsys):
    code, err, out, elapsed_s = _run([*_command("train", tmp_path), "--data", "/nonexistent/x",
                                      "--tracking-uri", "http://127.0.0.1:9", "--address", UNREACHABLE], capsys)
    _assert_one_line(code, err, out, elapsed_s, "--data /nonexistent/x does not exist")
    assert "no MLflow server answers" in err and "no Ray cluster answers" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, err, _, _ = _run([*_command("train", tmp_path), "--data", "/nonexistent/x", "--debug"], capsys)
    assert code == 2 and "Traceback" in err and "PreflightError" in err
    assert err.strip().splitlines()[-1].startswith("sparsegen train: error: --data /nonexistent/x does not exist")


# --- S3: unreachable endpoint, bad or missing credentials, missing bucket or dataset ------------------------


def _fake_credentials(monkeypatch, endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")


@pytest.fixture(scope="module")
def s3_with_auth():
    """A moto S3 server that checks credentials (unknown access keys are refused, as AWS does)."""
    import os

    from tests.conftest import start_moto_server, stop_process

    process, endpoint = start_moto_server(env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield endpoint
    stop_process(process)


@pytest.mark.parametrize("command", ["train", "tune", "ablation"])
def test_s3_data_at_an_unreachable_endpoint(command, tmp_path, capsys, monkeypatch):
    _fake_credentials(monkeypatch, f"http://{UNREACHABLE}")
    _assert_one_line(*_run([*_command(command, tmp_path), "--data", "s3://bucket/shards"], capsys),
                     f"cannot reach the S3 endpoint http://{UNREACHABLE} for s3://bucket/shards")


def test_s3_storage_at_an_unreachable_endpoint_names_storage(tmp_path, capsys, monkeypatch):
    _fake_credentials(monkeypatch, f"http://{UNREACHABLE}")
    for command in ("train", "tune"):
        code, err, out, elapsed_s = _run([*_command(command, tmp_path), "--storage", "s3://bucket/runs"], capsys)
        _assert_one_line(code, err, out, elapsed_s, "cannot reach the S3 endpoint")
        assert "fix --storage" in err


def test_s3_bad_credentials(s3_with_auth, tmp_path, capsys, monkeypatch):
    _fake_credentials(monkeypatch, s3_with_auth)
    _assert_one_line(*_run([*_command("train", tmp_path), "--data", "s3://bucket/shards"], capsys),
                     "rejected the credentials for s3://bucket/shards (InvalidAccessKeyId): set AWS_ACCESS_KEY_ID")


def test_s3_without_credentials(tmp_path, capsys, monkeypatch, s3_server):
    _fake_credentials(monkeypatch, s3_server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    _assert_one_line(*_run([*_command("tune", tmp_path), "--data", "s3://bucket/shards"], capsys),
                     "no AWS credentials to read s3://bucket/shards")


def test_s3_missing_bucket_and_missing_dataset(s3_env, tmp_path, capsys):
    _assert_one_line(*_run([*_command("ablation", tmp_path), "--data", "s3://no-such-bucket-x/shards"], capsys),
                     "no S3 bucket 'no-such-bucket-x'")
    _assert_one_line(*_run([*_command("train", tmp_path), "--data", f"{s3_env.url}/shards"], capsys),
                     f"no dataset at {s3_env.url}/shards: {s3_env.url}/shards/manifest.parquet not found")


def test_s3_checks_pass_for_a_dataset_and_a_bucket(s3_env):
    import boto3

    from pipeline.preflight import check_command

    boto3.session.Session().client("s3").put_object(Bucket=s3_env.bucket, Key="shards/manifest.parquet", Body=b"x")
    check_command(data=f"{s3_env.url}/shards", storage=f"{s3_env.url}/runs")  # no error


def test_s3_endpoint_that_never_answers_is_given_up_within_seconds(monkeypatch):
    """A listening socket that accepts and says nothing: connect works, every read times out."""
    from pipeline.preflight import PreflightError, check_data

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        _fake_credentials(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(PreflightError, match="cannot reach the S3 endpoint .* \\(ReadTimeoutError\\)"):
            check_data("s3://bucket/shards")
        assert time.monotonic() - started < 15


# --- config mistakes: all of one command at once ---------------------------------------------------------


def test_train_config_mistakes_together(tmp_path, capsys):
    code, err, _, elapsed_s = _run([*_command("train", tmp_path), "--set", "training.batch_size=0",
                                    "--set", "langevin.stepz=1", "--workers", "0"], capsys)
    assert code == 2 and "training.batch_size" in err and "did you mean 'langevin.steps'" in err, err
    assert "run.workers" in err, err  # a flag's mistake next to the --set ones
    assert "Traceback" not in err and elapsed_s < 15


def test_train_max_minutes_flag_sets_the_budget_and_is_validated(tmp_path, capsys):
    code, err, _, _ = _run([*_command("train", tmp_path), "--max-minutes", "0"], capsys)
    assert code == 2 and "training.max_train_minutes: must be positive or null, got 0" in err, err
    assert main(["train", "--preset", "tiny", "--max-minutes", "90", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["config"]["training"]["max_train_minutes"] == 90.0


def test_tune_config_mistakes_together(tmp_path, capsys):
    code, err, _, _ = _run([*_command("tune", tmp_path), "--set", "training.batch_size=0",
                            "--set", "langevin.stepz=3"], capsys)
    assert code == 2 and "training.batch_size" in err and "did you mean 'langevin.steps'" in err, err
    assert "Traceback" not in err


def test_ablation_input_mistakes_together(tmp_path, capsys):
    code, err, out, elapsed_s = _run([*_command("ablation", tmp_path), "--arms", "sparse,sparce", "--workers", "0",
                                      "--set", "langevin.stepz=2", "--set", "training.batch_size=0"], capsys)
    _assert_one_line(code, err, out, elapsed_s, "unknown arm(s) 'sparce'")
    for needle in ("--workers must be >= 1", "did you mean 'langevin.steps'", "training.batch_size"):
        assert needle in err, err


# --- submit: the job's arguments are checked here, the job API is reached within seconds -----------------


@pytest.mark.parametrize("entry, expected", [
    (["--set", "training.batch_size=0", "--set", "langevin.stepz=3"],
     "the train arguments after --: invalid configuration: "),
    (["--max-stepz", "3"], "the train arguments after --: unrecognized arguments: --max-stepz 3"),
])
def test_submit_train_checks_the_job_arguments_before_submitting(entry, expected, capsys):
    code, err, out, elapsed_s = _run(["submit", "train", "--address", f"http://{UNREACHABLE}", "--", *entry], capsys)
    _assert_one_line(code, err, out, elapsed_s, expected)
    if "invalid configuration" in expected:
        assert "training.batch_size" in err and "did you mean 'langevin.steps'" in err


def test_submit_tune_checks_the_search_space(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  langevin.stepz: {choice: [1, 2]}\n  langevin.step_size: {uniform: [1, 0]}\n")
    code, err, out, elapsed_s = _run(["submit", "tune", "--address", f"http://{UNREACHABLE}", "--",
                                      "--space", str(space)], capsys)
    _assert_one_line(code, err, out, elapsed_s, "the tune arguments after --: invalid search space")
    assert "langevin.stepz" in err and "langevin.step_size" in err, err


def test_submit_to_an_unreachable_job_api(capsys):
    _assert_one_line(*_run(["submit", "train", "--address", f"http://{UNREACHABLE}", "--", "--preset", "tiny"],
                           capsys), f"cannot reach the Ray job API at http://{UNREACHABLE}")


def test_submit_passes_help_through_to_the_job():
    from pipeline.cli.submit import entry_problems

    assert entry_problems("train", ["--help"]) is None
    assert entry_problems("train", ["--preset", "tiny", "--max-steps", "3"]) is None
