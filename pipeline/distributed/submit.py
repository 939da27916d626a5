"""Submit ``sparsegen train`` / ``sparsegen tune`` as Ray jobs (``ray.job_submission``).

The job's entrypoint is ``python jobs/<kind>.py <args>`` run in a copy of the repository
(``runtime_env.working_dir``), so the cluster runs the code of the submitting checkout with the
cluster's interpreter (the image's Python on AWS, the ``.venv`` Python on the local stack, whose Ray
head puts ``.venv/bin`` first on PATH).

Credentials
-----------
The cluster supplies its own settings and credentials: on AWS the nodes' IAM instance profile and
the ``MLFLOW_TRACKING_URI``/``SPARSEGEN_BUCKET`` exported by ``ray_cluster.yaml``'s start commands;
on the local stack (``sparsegen stack up``) the Ray head was started with the MLflow URI, the moto
endpoint and the dev keys in its environment, which every job inherits. So by default only
:data:`DEFAULT_FORWARDED_ENV` is copied from the submitting shell: a client-side
``MLFLOW_TRACKING_URI`` usually points at a port-forward (``127.0.0.1``) that means nothing on the
cluster. ``forward_env=[...]`` (``--forward-env NAME``) copies more variables by name and
``env={...}`` (``--env KEY=VALUE``) sets values; both are the caller's explicit choice.
``forward_aws_credentials=True``
(``--forward-aws-credentials``) also sends ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN`` as ``runtime_env.env_vars``: they never appear in job logs, MLflow params or
checkpoints, but anyone holding the cluster's Ray token can read them back through the job API
(``ray job list``), so use it for short-lived keys only. Values of forwarded variables are never
printed; only their names.

Ray token authentication
------------------------
When the cluster has token auth on (the default for the local stack and ``ray_cluster.yaml``), the
client needs the token: ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (Ray's own precedence). It is sent as ``Authorization: Bearer`` header, unless
``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_KINDS = ("train", "tune")
# Not uploaded with the working dir (gitignore-style patterns, as Ray's `excludes`).
WORKING_DIR_EXCLUDES = [
    ".venv", ".git", "runs", "mlruns", "sparsegen-work", "*.db", "__pycache__", "*.pyc",
    ".pytest_cache", "*.egg-info", "build", "dist", ".mypy_cache", ".ruff_cache",
]
# Settings copied from the submitting environment by default (when set there); see the module doc.
DEFAULT_FORWARDED_ENV = ("MLFLOW_EXPERIMENT_NAME",)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """Submission failed before the job ran; the message is one line meant for the user."""


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no Ray address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address must be the dashboard URL (http://HOST:PORT), got {address!r}")
    return address.rstrip("/")


def load_ray_token() -> str | None:
    """The Ray auth token by Ray's precedence, or None (never logged)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is not readable: {exc.strerror}") from exc
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip()
    return None


def auth_headers() -> dict[str, str]:
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    token = load_ray_token()
    if not token:
        if mode == "token":
            raise SubmitError("RAY_AUTH_MODE=token but no token found (set RAY_AUTH_TOKEN_PATH or "
                              "run `ray get-auth-token`)")
        return {}
    return {"Authorization": f"Bearer {token}"}


def build_entrypoint(kind: str, entry_args: list[str]) -> str:
    if kind not in JOB_KINDS:
        raise SubmitError(f"unknown job kind {kind!r} (expected one of {', '.join(JOB_KINDS)})")
    return shlex.join(["python", f"jobs/{kind}.py", *entry_args])


def build_runtime_env(
    *,
    working_dir: str | os.PathLike,
    env: dict[str, str] | None = None,
    forward_env: Sequence[str] = DEFAULT_FORWARDED_ENV,
    forward_aws_credentials: bool = False,
) -> dict[str, Any]:
    if not forward_aws_credentials:
        leaked = sorted(set(CREDENTIAL_ENV) & (set(forward_env) | set(env or {})))
        if leaked:
            raise SubmitError(f"{', '.join(leaked)} would be sent to the cluster; use --forward-aws-credentials "
                              "if that is intended")
    env_vars = {k: os.environ[k] for k in forward_env if os.environ.get(k)}
    if forward_aws_credentials:
        missing = [k for k in CREDENTIAL_ENV[:2] if not os.environ.get(k)]
        if missing:
            raise SubmitError(f"--forward-aws-credentials: {', '.join(missing)} not set")
        env_vars.update({k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)})
    env_vars.update(env or {})
    working_dir = Path(working_dir).resolve()
    if not (working_dir / "jobs").is_dir():
        raise SubmitError(f"working dir {working_dir} has no jobs/ directory")
    return {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env_vars}


async def _tail(client, job_id: str, write: Callable[[str], None]) -> None:
    async for lines in client.tail_job_logs(job_id):
        write(lines)


def follow_logs(client, job_id: str, write: Callable[[str], None], poll: float = 1.0) -> str:
    """Stream the job's logs through ``write`` until it ends; returns the final status name."""
    try:
        asyncio.run(_tail(client, job_id, write))
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - websocket trouble: fall back to polling the full log
        seen = 0
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            if len(logs) > seen:
                write(logs[seen:])
                seen = len(logs)
            if str(status.value if hasattr(status, "value") else status) in TERMINAL:
                break
            time.sleep(poll)
    # The websocket closes when the job ends, but the status may lag slightly behind.
    deadline = time.monotonic() + 30
    while True:
        status = client.get_job_status(job_id)
        name = str(getattr(status, "value", status))
        if name in TERMINAL or time.monotonic() > deadline:
            return name
        time.sleep(0.5)


def submit_job(
    address: str | None,
    entry_args: list[str],
    kind: Literal["train", "tune"],
    *,
    wait: bool = True,
    env: dict[str, str] | None = None,
    working_dir: str | os.PathLike = REPO_ROOT,
    forward_env: Sequence[str] = DEFAULT_FORWARDED_ENV,
    forward_aws_credentials: bool = False,
    submission_id: str | None = None,
    log_stream: TextIO | None = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Submit ``python jobs/<kind>.py <entry_args>`` to the Ray cluster at ``address``.

    Returns ``{"job_id", "status", "succeeded", "address", "entrypoint", "forwarded_env"}``; with
    ``wait`` the job's logs are streamed to ``log_stream`` (default stdout) and ``status`` is final.
    """
    address = resolve_address(address)
    entrypoint = build_entrypoint(kind, list(entry_args))
    runtime_env = build_runtime_env(working_dir=working_dir, env=env, forward_env=forward_env,
                                    forward_aws_credentials=forward_aws_credentials)
    headers = auth_headers()
    stream = log_stream or sys.stdout
    say = announce or (lambda message: print(message, file=sys.stderr, flush=True))

    from ray.exceptions import AuthenticationError  # noqa: PLC0415
    from ray.job_submission import JobSubmissionClient  # noqa: PLC0415

    try:
        client = JobSubmissionClient(address, headers=headers)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
    except AuthenticationError as exc:
        raise SubmitError(f"Ray rejected the credentials at {address}: "
                          f"{str(exc).splitlines()[0]} (check RAY_AUTH_TOKEN_PATH)") from exc
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray job API at {address}: {str(exc).splitlines()[0]}") from exc
    except RuntimeError as exc:  # the SDK reports HTTP errors as RuntimeError
        raise SubmitError(f"job submission to {address} failed: {str(exc).splitlines()[0]}") from exc
    say(f"submitted job {job_id} to {address}: {entrypoint}")
    if runtime_env["env_vars"]:
        say(f"forwarded env vars: {', '.join(sorted(runtime_env['env_vars']))}")
    result: dict[str, Any] = {
        "job_id": job_id,
        "address": address,
        "entrypoint": entrypoint,
        "forwarded_env": sorted(runtime_env["env_vars"]),
    }
    if not wait:
        status = client.get_job_status(job_id)
        result["status"] = str(getattr(status, "value", status))
        result["succeeded"] = None
        return result

    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    final = follow_logs(client, job_id, write)
    result["status"] = final
    result["succeeded"] = final == "SUCCEEDED"
    if final != "SUCCEEDED":
        info = client.get_job_info(job_id)
        result["message"] = (info.message or "").splitlines()[0] if info.message else None
    return result
