"""A local development stack: MLflow tracking server, S3-compatible server (moto) and a Ray head.

``up()`` starts the three services, each bound to 127.0.0.1 on free ports, waits until they answer
their health checks and writes ``stack.json`` under the state directory (default
``./sparsegen-work/stack``) with the PIDs, ports, URLs, log paths and the environment a client needs.
``status()`` reads it back and probes every service; ``down()`` stops exactly what ``up()`` started.

How ``down`` finds what ``up`` started
--------------------------------------
Every service is launched with ``start_new_session=True``, so its first process is the leader of a
new POSIX session whose id (SID) equals its PID. Everything it spawns (gunicorn/uvicorn workers of
``mlflow server``; gcs_server, raylet, dashboard, agents and Ray workers of ``ray start``, which
itself exits once the head is up) inherits that SID. ``stack.json`` records, per service, the SID,
the leader's start time, the PIDs (with start times) seen right after start-up, and the start time
of the stack. ``down`` stops the processes whose SID is the recorded one and that started no earlier
than the service, plus the recorded PIDs whose start time still matches (a process that moved to a
session of its own); nothing is looked up by name, so a Ray instance started elsewhere (with
``ray start`` or ``ray.init()``) is never touched, unlike ``ray stop``, which kills every Ray process
of the user. Ray processes are stopped in the order ``ray stop`` uses (raylet, then the other
processes, then gcs_server), each group with SIGTERM and a grace period, then SIGKILL.

Ray token authentication
------------------------
``up`` writes a fresh random token to ``<state>/ray/auth_token`` (mode 0600) and starts the head
with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` pointing to it (``RAY_AUTH_TOKEN`` is
removed from the head's environment so that a token of another cluster in the caller's shell cannot
win), so the stack never reads or writes ``~/.ray/auth_token``. Every Ray process, including the
drivers of submitted jobs, inherits both variables. Clients get ``RAY_AUTH_MODE`` and
``RAY_AUTH_TOKEN_PATH`` in the exported environment, never the token itself; the dashboard and the
job API answer 401 without it.

Loopback only
-------------
``ray start --node-ip-address 127.0.0.1`` alone still binds gRPC servers to the machine's external
address (Ray resolves "localhost" to a reachable IP). The head is therefore started with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes Ray use the loopback address as the node IP
(the single-node mode it uses on macOS/Windows), and with every port Ray would otherwise pick
itself or take from a fixed default (client server, agents, metrics, autoscaler/dashboard metrics)
given explicitly from free loopback ports. Workers use OS-assigned ports (``--min-worker-port 0``).

Credentials
-----------
The S3 server is a dev-only moto instance with fake keys. The MLflow server (which proxies artifacts
to ``s3://BUCKET/mlflow``) and the Ray head get the endpoint and keys in their environment, so jobs
running on the local Ray head inherit them the way cluster nodes inherit an instance profile; job
submission does not need to send credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

STATE_FILE = "stack.json"
STATE_VERSION = 1
DEFAULT_STATE_DIR = Path("sparsegen-work") / "stack"
DEFAULT_BUCKET = "sparsegen"
HOST = "127.0.0.1"
LOOPBACK_IPS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
# Fake credentials for the dev-only moto server; they grant nothing anywhere else.
DEV_AWS_ACCESS_KEY_ID = "sparsegen-dev-access-key"
DEV_AWS_SECRET_ACCESS_KEY = "sparsegen-dev-secret-key"
DEV_AWS_REGION = "us-east-1"
SERVICES = ("s3", "mlflow", "ray")  # start order; stopped in reverse
# Ray puts AF_UNIX sockets at <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store, which
# must stay under 107 bytes; a longer state dir gets its Ray temp dir under the system temp dir.
_MAX_RAY_TEMP_DIR_LEN = 40
# Environment variables of the caller that must not leak into the services.
_SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


class StackError(RuntimeError):
    """A stack operation failed; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------- psutil


def import_psutil():
    """psutil ships with Ray (vendored in ``ray/thirdparty_files``); import it without importing Ray."""
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise
        vendored = Path(next(iter(spec.submodule_search_locations))) / "thirdparty_files"
        if str(vendored) not in sys.path:
            sys.path.append(str(vendored))
        import psutil  # noqa: PLC0415
    return psutil


# ---------------------------------------------------------------------------------------- utilities


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now (sockets held until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int, host: str = HOST) -> bool:
    """No socket is bound/listening on ``host:port`` (TIME_WAIT leftovers of closed connections don't count,
    as for any server that sets SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tool(name: str) -> str:
    """The console script ``name`` of the running interpreter's environment (else from PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; install the project's dependencies")
    return found


def http_get(url: str, *, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when the server cannot be reached."""
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return 0, ""


def _wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.25,
                alive: Callable[[], bool] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if alive is not None and not alive():
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _tail(path: Path | str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _ray_temp_dir(state_dir: Path) -> Path:
    preferred = state_dir / "ray"
    if len(str(preferred)) <= _MAX_RAY_TEMP_DIR_LEN:
        return preferred
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"sgray-{os.getuid()}-{digest}"


# ------------------------------------------------------------------------------ process bookkeeping


def _proc_record(proc) -> dict[str, Any]:
    return {"pid": proc.pid, "create_time": proc.create_time()}


def session_members(service: dict[str, Any]) -> list:
    """Live (non-zombie) processes that belong to ``service`` as recorded in the state file."""
    psutil = import_psutil()
    sid = service["sid"]
    not_before = service["started_at"] - 1.0
    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["create_time", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["create_time"] < not_before:
                continue
            if os.getsid(proc.pid) == sid:
                found[proc.pid] = proc
        except (OSError, psutil.Error):
            continue
    for record in service.get("pids", []):  # recorded processes that left the session
        if record["pid"] in found:
            continue
        try:
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["create_time"]) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def listening_sockets(procs: Iterable) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every TCP socket in LISTEN state owned by ``procs``."""
    psutil = import_psutil()
    out = []
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    out.append((proc.pid, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return out


def _still_running(proc) -> bool:
    """Running and not a zombie (a zombie of a process we don't parent is not ours to reap)."""
    psutil = import_psutil()
    try:
        if not proc.is_running():
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            if proc.ppid() == os.getpid():  # started by this process (in-process `up`): reap it
                try:
                    reaped, _ = os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    return False
                return reaped == 0  # 0: main thread gone, other threads still exiting
            return False
        return True
    except psutil.Error:
        return False


def _wait_gone(procs: list, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _still_running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _still_running(p)]
    return alive


def _terminate(procs: list, grace: float) -> list:
    """SIGTERM ``procs``, wait up to ``grace`` seconds, SIGKILL the rest; returns what survived."""
    psutil = import_psutil()
    if not procs:
        return []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    alive = _wait_gone(procs, grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return _wait_gone(alive, 5.0)


def _proc_name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - psutil.Error, but psutil is imported lazily
        return ""


def stop_service(name: str, service: dict[str, Any], *, grace: float = 10.0) -> dict[str, Any]:
    """Stop every process of one recorded service; returns a summary."""
    procs = session_members(service)
    found = len(procs)
    if name == "ray":
        # The order of `ray stop`: raylet first (so agents don't complain), gcs_server last.
        raylets = [p for p in procs if _proc_name(p) == "raylet"]
        gcs = [p for p in procs if _proc_name(p) == "gcs_server"]
        others = [p for p in procs if p not in raylets and p not in gcs]
        alive = _terminate(raylets, grace / 3) + _terminate(others, grace / 3) + _terminate(gcs, grace / 3)
    else:
        alive = _terminate(procs, grace)
    # Something spawned while we were stopping (e.g. a worker restarted by a dying parent).
    late = session_members(service)
    alive += _terminate(late, 2.0)
    return {"found": found + len(late), "survivors": [p.pid for p in alive]}


def _spawn(cmd: list[str], *, env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )


def _service_record(popen: subprocess.Popen, started_at: float, **extra: Any) -> dict[str, Any]:
    return {"pid": popen.pid, "sid": popen.pid, "started_at": started_at, "pids": [], **extra}


def _snapshot_pids(service: dict[str, Any]) -> None:
    service["pids"] = [_proc_record(p) for p in session_members(service)]


# ------------------------------------------------------------------------------------------- state


@dataclass
class StackPaths:
    state_dir: Path

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"


def resolve_state_dir(state_dir: str | os.PathLike | None) -> Path:
    return Path(state_dir if state_dir is not None else DEFAULT_STATE_DIR).expanduser().resolve()


def load_state(state_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    path = StackPaths(resolve_state_dir(state_dir)).state_file
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StackError(f"unreadable state file {path}: {exc}") from exc
    if state.get("version") != STATE_VERSION:
        raise StackError(f"state file {path} has version {state.get('version')}, expected {STATE_VERSION}")
    return state


def _write_state(paths: StackPaths, state: dict[str, Any]) -> None:
    tmp = paths.state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(paths.state_file)


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment a client (CLI, job submission, boto3, MLflow) needs to use the stack."""
    return dict(state["env"])


def format_exports(env: dict[str, str]) -> str:
    import shlex  # noqa: PLC0415

    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items()))


# ----------------------------------------------------------------------------------------- probes


def _s3_healthy(url: str, timeout: float = 2.0) -> bool:
    status, _ = http_get(f"{url}/moto-api/", timeout=timeout)
    return status == 200


def _mlflow_healthy(url: str, timeout: float = 2.0) -> bool:
    status, body = http_get(f"{url}/health", timeout=timeout)
    return status == 200 and body.strip() == "OK"


def _ray_auth_headers(token_path: str) -> dict[str, str]:
    try:
        token = Path(token_path).read_text().strip()
    except OSError:
        return {}
    return {"Authorization": f"Bearer {token}"}


def _ray_healthy(dashboard_url: str, token_path: str | None = None, timeout: float = 2.0) -> bool:
    status, body = http_get(f"{dashboard_url}/api/gcs_healthz", timeout=timeout)
    if status != 200 or "success" not in body:
        return False
    if token_path is None:
        return True
    status, body = http_get(f"{dashboard_url}/api/version", timeout=timeout, headers=_ray_auth_headers(token_path))
    return status == 200 and '"ray_version"' in body


def ray_auth_mode(dashboard_url: str) -> str | None:
    status, body = http_get(f"{dashboard_url}/api/authentication_mode")
    if status != 200:
        return None
    try:
        return json.loads(body).get("authentication_mode")
    except json.JSONDecodeError:
        return None


def _create_buckets(endpoint: str, buckets: Iterable[str]) -> None:
    import boto3  # noqa: PLC0415

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name=DEV_AWS_REGION,
        aws_access_key_id=DEV_AWS_ACCESS_KEY_ID, aws_secret_access_key=DEV_AWS_SECRET_ACCESS_KEY,
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


# ---------------------------------------------------------------------------------------------- up


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV and not k.startswith("AWS_")}
    # `python` in Ray jobs and the services' helper processes must be this environment's interpreter.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", os.defpath)
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["DO_NOT_TRACK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _aws_env(s3_url: str, bucket: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": s3_url,
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": DEV_AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DEV_AWS_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": DEV_AWS_REGION,
        "SPARSEGEN_BUCKET": bucket,
    }


def up(
    state_dir: str | os.PathLike | None = None,
    *,
    bucket: str = DEFAULT_BUCKET,
    s3_port: int | None = None,
    mlflow_port: int | None = None,
    ray_port: int | None = None,
    dashboard_port: int | None = None,
    ray_num_cpus: int | None = None,
    timeout: float = 90.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Start the stack and return its state (also written to ``<state_dir>/stack.json``).

    If the stack of ``state_dir`` already runs and is healthy, its state is returned unchanged
    (``state["already_running"]`` is True). Any failure stops what was started and raises StackError.
    """
    say = log or (lambda message: None)
    paths = StackPaths(resolve_state_dir(state_dir))
    existing = load_state(paths.state_dir)
    if existing is not None:
        report = status(paths.state_dir)
        if report["running"]:
            existing["already_running"] = True
            return existing
        raise StackError(
            f"a stack is recorded in {paths.state_file} but not healthy "
            f"({', '.join(n for n, s in report['services'].items() if not s['healthy'])}); "
            f"run `sparsegen stack down --dir {paths.state_dir}` first"
        )
    for flag, port in (("--s3-port", s3_port), ("--mlflow-port", mlflow_port),
                       ("--ray-port", ray_port), ("--dashboard-port", dashboard_port)):
        if port is not None and not port_is_free(port):
            raise StackError(f"{flag} {port} is already in use on {HOST}")
    import boto3  # noqa: F401, PLC0415 - fail fast before starting anything if it is missing

    paths.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.state_dir, 0o700)
    paths.logs.mkdir(exist_ok=True)
    ports = iter(free_ports(13))
    s3_port = s3_port or next(ports)
    mlflow_port = mlflow_port or next(ports)
    ray_ports = {
        "gcs": ray_port or next(ports),
        "dashboard": dashboard_port or next(ports),
        "client_server": next(ports),
        "dashboard_agent_http": next(ports),
        "dashboard_agent_grpc": next(ports),
        "metrics_export": next(ports),
        "runtime_env_agent": next(ports),
        "node_manager": next(ports),
        "object_manager": next(ports),
        "autoscaler_metrics": next(ports),
        "dashboard_metrics": next(ports),
    }
    s3_url = f"http://{HOST}:{s3_port}"
    mlflow_url = f"http://{HOST}:{mlflow_port}"
    dashboard_url = f"http://{HOST}:{ray_ports['dashboard']}"
    gcs_address = f"{HOST}:{ray_ports['gcs']}"
    aws_env = _aws_env(s3_url, bucket)
    ray_dir = paths.state_dir / "ray"
    ray_dir.mkdir(exist_ok=True)
    os.chmod(ray_dir, 0o700)
    token_path = ray_dir / "auth_token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    ray_temp = _ray_temp_dir(paths.state_dir)
    if ray_temp != ray_dir:
        ray_temp.mkdir(parents=True, exist_ok=True)
        link = ray_dir / "temp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ray_temp)
    else:
        ray_temp = ray_dir

    client = {
        "MLFLOW_TRACKING_URI": mlflow_url,
        "RAY_ADDRESS": dashboard_url,
        "RAY_API_SERVER_ADDRESS": dashboard_url,
        "SPARSEGEN_RAY_GCS_ADDRESS": gcs_address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        **aws_env,
    }
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "state_dir": str(paths.state_dir),
        "created_at": time.time(),
        "python": sys.executable,
        "bucket": bucket,
        "services": {},
        "env": client,
    }
    base_env = _base_env()
    started = time.monotonic()
    try:
        # 1. S3 (moto): MLflow's artifact proxy and the bucket need it first.
        say(f"starting S3 (moto) on {s3_url}")
        t0 = time.time()
        popen = _spawn([_tool("moto_server"), "-H", HOST, "-p", str(s3_port)],
                       env=base_env, log_path=paths.logs / "s3.log", cwd=paths.state_dir)
        state["services"]["s3"] = _service_record(popen, t0, url=s3_url, ports={"http": s3_port},
                                                  log=str(paths.logs / "s3.log"), cmd=popen.args)
        _write_state(paths, state)
        if not _wait_until(lambda: _s3_healthy(s3_url), timeout=timeout, alive=lambda: popen.poll() is None):
            raise StackError(f"S3 server did not become healthy at {s3_url}: {_tail(paths.logs / 's3.log')}")
        _create_buckets(s3_url, [bucket])

        # 2. MLflow and Ray start concurrently.
        say(f"starting MLflow on {mlflow_url} (artifacts: s3://{bucket}/mlflow)")
        t0 = time.time()
        mlflow_dir = paths.state_dir / "mlflow"
        mlflow_dir.mkdir(exist_ok=True)
        mlflow_cmd = [
            _tool("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{bucket}/mlflow",
            "--serve-artifacts",
            "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
        ]
        mlflow_popen = _spawn(mlflow_cmd, env={**base_env, **aws_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log_path=paths.logs / "mlflow.log",
                              cwd=mlflow_dir)
        state["services"]["mlflow"] = _service_record(mlflow_popen, t0, url=mlflow_url,
                                                      ports={"http": mlflow_port},
                                                      log=str(paths.logs / "mlflow.log"), cmd=mlflow_cmd)
        _write_state(paths, state)

        say(f"starting Ray head (dashboard {dashboard_url}, GCS {gcs_address}, token auth)")
        t0 = time.time()
        ray_cmd = [
            _tool("ray"), "start", "--head",
            "--node-ip-address", HOST,
            "--port", str(ray_ports["gcs"]),
            "--dashboard-host", HOST,
            "--dashboard-port", str(ray_ports["dashboard"]),
            "--ray-client-server-port", str(ray_ports["client_server"]),
            "--dashboard-agent-listen-port", str(ray_ports["dashboard_agent_http"]),
            "--dashboard-agent-grpc-port", str(ray_ports["dashboard_agent_grpc"]),
            "--metrics-export-port", str(ray_ports["metrics_export"]),
            "--runtime-env-agent-port", str(ray_ports["runtime_env_agent"]),
            "--node-manager-port", str(ray_ports["node_manager"]),
            "--object-manager-port", str(ray_ports["object_manager"]),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--temp-dir", str(ray_temp),
            "--disable-usage-stats",
        ]
        if ray_num_cpus is not None:
            ray_cmd += ["--num-cpus", str(ray_num_cpus)]
        ray_env = {
            **base_env, **aws_env,
            "MLFLOW_TRACKING_URI": mlflow_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP = loopback, see module docstring
            "AUTOSCALER_METRIC_PORT": str(ray_ports["autoscaler_metrics"]),
            "DASHBOARD_METRIC_PORT": str(ray_ports["dashboard_metrics"]),
        }
        ray_popen = _spawn(ray_cmd, env=ray_env, log_path=paths.logs / "ray.log", cwd=paths.state_dir)
        state["services"]["ray"] = _service_record(
            ray_popen, t0, url=dashboard_url, gcs_address=gcs_address, ports=ray_ports,
            temp_dir=str(ray_temp), token_path=str(token_path), log=str(paths.logs / "ray.log"), cmd=ray_cmd,
        )
        _write_state(paths, state)

        remaining = max(5.0, timeout - (time.monotonic() - started))
        try:
            rc = ray_popen.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            raise StackError(f"`ray start` did not finish within {remaining:.0f}s: {_tail(paths.logs / 'ray.log')}")
        if rc != 0:
            raise StackError(f"`ray start` exited with {rc}: {_tail(paths.logs / 'ray.log')}")
        remaining = max(5.0, timeout - (time.monotonic() - started))
        if not _wait_until(lambda: _ray_healthy(dashboard_url, str(token_path)), timeout=remaining):
            raise StackError(f"Ray dashboard did not become healthy at {dashboard_url}: "
                             f"{_tail(paths.logs / 'ray.log')}")
        mode = ray_auth_mode(dashboard_url)
        if mode != "token":
            raise StackError(f"Ray head started with authentication mode {mode!r}, expected 'token'")
        remaining = max(5.0, timeout - (time.monotonic() - started))
        if not _wait_until(lambda: _mlflow_healthy(mlflow_url), timeout=remaining,
                           alive=lambda: mlflow_popen.poll() is None):
            raise StackError(f"MLflow did not become healthy at {mlflow_url}: {_tail(paths.logs / 'mlflow.log')}")

        for service in state["services"].values():
            _snapshot_pids(service)
        state["up_seconds"] = round(time.monotonic() - started, 2)
        _write_state(paths, state)
        say(f"stack up in {state['up_seconds']:.1f}s")
        return state
    except BaseException:
        with contextlib.suppress(Exception):
            _stop_all(paths, state)
        raise


# -------------------------------------------------------------------------------------------- down


def _stop_all(paths: StackPaths, state: dict[str, Any], grace: float = 10.0) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in reversed(SERVICES):
        service = state.get("services", {}).get(name)
        if service is not None:
            result[name] = stop_service(name, service, grace=grace)
    # Give the kernel a moment to release the listening sockets of the killed processes.
    ports = [p for s in state.get("services", {}).values() for p in s.get("ports", {}).values()]
    _wait_until(lambda: all(port_is_free(p) for p in ports), timeout=5.0, interval=0.1)
    # A Ray temp dir outside the state dir (long state-dir paths, see _ray_temp_dir) is not left in /tmp.
    ray_service = state.get("services", {}).get("ray") or {}
    ray_temp = ray_service.get("temp_dir")
    if ray_temp and not Path(ray_temp).is_relative_to(paths.state_dir) and Path(ray_temp).name.startswith("sgray-"):
        shutil.rmtree(ray_temp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (paths.state_dir / "ray" / "temp").unlink()
    with contextlib.suppress(FileNotFoundError):
        paths.state_file.unlink()
    return result


def down(state_dir: str | os.PathLike | None = None, *, grace: float = 10.0) -> dict[str, Any]:
    """Stop what ``up`` started in ``state_dir``. No state file means nothing to do."""
    paths = StackPaths(resolve_state_dir(state_dir))
    state = load_state(paths.state_dir)
    if state is None:
        return {"state_dir": str(paths.state_dir), "stopped": False, "services": {}}
    services = _stop_all(paths, state, grace=grace)
    survivors = {name: s["survivors"] for name, s in services.items() if s["survivors"]}
    if survivors:
        raise StackError(f"processes survived SIGKILL: {survivors}")
    return {"state_dir": str(paths.state_dir), "stopped": True, "services": services}


# ------------------------------------------------------------------------------------------ status


def status(state_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Which services of the recorded stack run, where, and whether they answer their health check."""
    paths = StackPaths(resolve_state_dir(state_dir))
    state = load_state(paths.state_dir)
    if state is None:
        return {"state_dir": str(paths.state_dir), "exists": False, "running": False, "services": {}, "env": {}}
    services = {}
    for name in SERVICES:
        service = state["services"].get(name)
        if service is None:
            services[name] = {"alive": False, "healthy": False, "pids": [], "url": None}
            continue
        procs = session_members(service)
        if name == "s3":
            healthy = bool(procs) and _s3_healthy(service["url"])
        elif name == "mlflow":
            healthy = bool(procs) and _mlflow_healthy(service["url"])
        else:
            healthy = bool(procs) and _ray_healthy(service["url"], service.get("token_path"))
        entry = {
            "alive": bool(procs),
            "healthy": healthy,
            "pids": sorted(p.pid for p in procs),
            "url": service["url"],
            "ports": service.get("ports", {}),
            "log": service.get("log"),
        }
        if name == "ray":
            entry["gcs_address"] = service.get("gcs_address")
            entry["auth_mode"] = ray_auth_mode(service["url"]) if healthy else None
        services[name] = entry
    running = all(s["healthy"] for s in services.values())
    return {
        "state_dir": str(paths.state_dir),
        "exists": True,
        "running": running,
        "services": services,
        "env": client_env(state) if running else {},
    }
