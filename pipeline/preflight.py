"""Checks of the outside world a command needs, run before any training starts, each within seconds.

Without them an unreachable MLflow server is found after minutes of client retries, an unreachable Ray
address after GCS connection attempts with no answer, and an unreachable S3 endpoint after botocore's
retries with a traceback; here each is one ``PreflightError`` naming the option or variable to fix.

``check_command`` runs every check a command needs at once (threads, so a command waits for the slowest
check, not for their sum: at most ``TIMEOUT_S`` for HTTP/TCP, ``S3_ATTEMPTS`` x (connect + read timeout)
for S3) and reports every problem found in one message. ``train``, ``tune``, ``ablation`` and ``submit``
call it before Ray or MLflow are touched; ``train()`` itself still calls ``check_run_endpoints`` (Tune
trials and library callers go through it).

``report`` is how a command prints such an error: one line ``sparsegen <command>: error: ...`` on stderr,
exit code 2, and the traceback only with ``--debug`` (or ``SPARSEGEN_DEBUG=1``).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

TIMEOUT_S = 5.0
# S3: a reachable endpoint answers a one-key listing in milliseconds; an unreachable one is given up after
# S3_ATTEMPTS x (connect + read timeout) seconds instead of the data layer's 8 retried attempts.
S3_CONNECT_TIMEOUT_S = 2.0
S3_READ_TIMEOUT_S = 3.0
S3_ATTEMPTS = 2
DEBUG_ENV = "SPARSEGEN_DEBUG"
MANIFEST_NAME = "manifest.parquet"  # pipeline.data.shards.MANIFEST_NAME (not imported: it pulls pyarrow)
# S3 error codes that mean the credentials themselves are wrong (not a missing permission).
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_CREDENTIAL_FIX = "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"


class PreflightError(RuntimeError):
    """Something outside the process is not there; the message names the option or variable to fix."""


# --- reporting ------------------------------------------------------------------------------------------


def debug_enabled(args=None) -> bool:
    """``--debug`` on the command line or SPARSEGEN_DEBUG=1 in the environment."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def report(prog: str, exc: BaseException, args=None, *, code: int = 2) -> int:
    """Print ``exc`` as ``<prog>: error: <message>`` on stderr (its traceback first with --debug); returns
    ``code``. Messages that list several config mistakes keep their one line per mistake."""
    if debug_enabled(args):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    return code


# --- single checks ---------------------------------------------------------------------------------------


def check_tracking_uri(uri: str | None, option: str = "--tracking-uri / MLFLOW_TRACKING_URI") -> None:
    """An http(s) MLflow server must answer its /health endpoint; sqlite/file stores need no check."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=TIMEOUT_S) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise PreflightError(f"no MLflow server answers at {uri} ({problem}): start it or fix {option}")


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parsed.port
    except ValueError:
        raise PreflightError(f"{address!r} is not a HOST:PORT address") from None
    return parsed.hostname or "127.0.0.1", port or default_port


def _connect(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within TIMEOUT_S, else why not."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return None
    except socket.timeout:
        return f"no answer within {TIMEOUT_S:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def check_ray_address(address: str | None, option: str = "--address / RAY_ADDRESS") -> None:
    """A Ray address to join (host:port of the GCS, ray://host:port, or 'auto') must accept a connection.

    An http(s):// address is the dashboard / job API, which ``ray.init`` cannot join: that is a mistake to
    name, not an address to try."""
    if not address or address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise PreflightError(
            f"{option} is {address}, the Ray job API (dashboard) address: give the GCS address HOST:6379 "
            f"(the stack's SPARSEGEN_RAY_GCS_ADDRESS), or run it on the cluster with `sparsegen submit`")
    default = 10001 if address.startswith("ray://") else 6379
    host, port = _host_port(address, default)
    problem = _connect(host, port)
    if problem:
        raise PreflightError(f"no Ray cluster answers at {address} ({problem}): start it or fix {option}")


def check_job_api(address: str | None, option: str = "--address / RAY_API_SERVER_ADDRESS / RAY_ADDRESS") -> None:
    """The Ray job API (http://HOST:PORT, what ``sparsegen submit`` talks to) must accept a connection."""
    if not address or not address.startswith(("http://", "https://")):
        return  # pipeline.distributed.submit.resolve_address names a missing or non-http address
    host, port = _host_port(address, 443 if address.startswith("https://") else 80)
    problem = _connect(host, port)
    if problem:
        raise PreflightError(f"cannot reach the Ray job API at {address} ({problem}): start the cluster "
                             f"(or `ray dashboard ray_cluster.yaml` for the tunnel) or fix {option}")


def _split_s3(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise PreflightError(f"{url!r} is not an s3://bucket/prefix URL")
    return parsed.netloc, parsed.path.strip("/")


def _fast_s3_client():
    """boto3's S3 client with short timeouts and few attempts (the data layer's retries many times)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                    retries={"total_max_attempts": S3_ATTEMPTS, "mode": "standard"})
    try:
        return boto3.session.Session().client("s3", config=config)
    except ValueError as exc:  # e.g. a malformed AWS_ENDPOINT_URL
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        raise PreflightError(f"cannot make an S3 client ({exc}): fix AWS_ENDPOINT_URL ({endpoint!r})") from None


def check_s3(url: str, option: str, *, manifest: bool = False) -> None:
    """The bucket of ``url`` must be reachable with the current credentials and listable; with ``manifest``
    the dataset's manifest.parquet must be there too. One listing call, at most S3_ATTEMPTS tries."""
    import botocore.exceptions as bex

    bucket, prefix = _split_s3(url)
    client = _fast_s3_client()
    endpoint = client.meta.endpoint_url
    key = f"{prefix}/{MANIFEST_NAME}".lstrip("/") if manifest else (prefix.rstrip("/") + "/" if prefix else "")
    try:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except bex.NoCredentialsError:
        raise PreflightError(f"no AWS credentials to read {url} ({option}): {_CREDENTIAL_FIX}, or run where an "
                             "instance profile provides them") from None
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
            bex.ConnectionClosedError) as exc:
        raise PreflightError(f"cannot reach the S3 endpoint {endpoint} for {url} ({type(exc).__name__}): check "
                             f"AWS_ENDPOINT_URL and the network, or fix {option}") from None
    except bex.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        if code in _BAD_CREDENTIALS:
            raise PreflightError(f"S3 at {endpoint} rejected the credentials for {url} ({code}): "
                                 f"{_CREDENTIAL_FIX}") from None
        if code in ("NoSuchBucket", "404"):
            raise PreflightError(f"no S3 bucket '{bucket}' at {endpoint}: fix {option} ({url})") from None
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            raise PreflightError(f"access to {url} denied ({code}): the credentials need s3:ListBucket on bucket "
                                 f"'{bucket}' (and s3:GetObject/PutObject), or fix {option}") from None
        raise PreflightError(f"S3 refused listing {url} ({code}: {error.get('Message', exc)}): fix {option}") from None
    except bex.BotoCoreError as exc:
        raise PreflightError(f"S3 request for {url} failed ({exc}): fix {option} or the AWS settings") from None
    if manifest and not listed.get("KeyCount", len(listed.get("Contents", []))):
        manifest_url = f"s3://{bucket}/{key}"
        raise PreflightError(f"no dataset at {url}: {manifest_url} not found (run `sparsegen ingest` first, "
                             f"or fix {option})")


def check_data(url: str | None, option: str = "--data") -> None:
    """Shards (local or s3://) or a local folder of images must be there; None = the built-in demo data."""
    if not url:
        return
    url = str(url)
    if url.startswith("s3://"):
        check_s3(url.rstrip("/"), option, manifest=True)
        return
    if "://" in url:
        raise PreflightError(f"{option} {url}: only local paths and s3://bucket/prefix URLs are supported")
    if not os.path.exists(url):
        raise PreflightError(f"{option} {url} does not exist: no dataset at {url}; give a shards folder or "
                             "s3:// URL made by `sparsegen ingest`, a folder of images, or leave it out for the "
                             "built-in demo data")


def check_storage(url: str | None, option: str = "--storage") -> None:
    """s3:// checkpoint storage must be reachable and listable (a local path is created when needed)."""
    if url and str(url).startswith("s3://"):
        check_s3(str(url).rstrip("/"), option)


# --- a command's checks ----------------------------------------------------------------------------------


def run_checks(checks: list[Callable[[], None]]) -> None:
    """Run the checks at once; one PreflightError listing every problem (in the order given), if any."""
    if not checks:
        return
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = [pool.submit(check) for check in checks]
    problems = []
    for future in futures:
        error = future.exception()
        if isinstance(error, PreflightError):
            problems.append(str(error))
        elif error is not None:
            raise error
    if problems:
        raise PreflightError("; ".join(problems))


def check_command(*, tracking_uri: str | None = None, address: str | None = None, data: str | None = None,
                  data_option: str = "--data", storage: str | None = None, storage_option: str = "--storage",
                  job_api: str | None = None) -> None:
    """Every outside-world check of a ``train`` / ``tune`` / ``ablation`` (``job_api``: ``submit``) run."""
    checks = []
    if tracking_uri:
        checks.append(lambda: check_tracking_uri(tracking_uri))
    if address:
        checks.append(lambda: check_ray_address(address))
    if job_api:
        checks.append(lambda: check_job_api(job_api))
    if data:
        checks.append(lambda: check_data(data, data_option))
    if storage:
        checks.append(lambda: check_storage(storage, storage_option))
    run_checks(checks)


def check_run_endpoints(*, tracking_uri: str | None, address: str | None) -> None:
    """``train()``'s own checks; the address is not checked where this process has joined Ray already
    (``init_ray`` then ignores it)."""
    check_tracking_uri(tracking_uri)
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        check_ray_address(address)
