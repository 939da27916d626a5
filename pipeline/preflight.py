"""Checks of the outside world a command needs, run before any training starts, each within seconds.

Without them an unreachable MLflow server is found after minutes of client retries and an unreachable Ray
address after GCS connection attempts with no answer; here each is one ``PreflightError`` naming the
option to fix. ``train`` (and so ``tune`` and ``ablation``) calls ``check_run_endpoints`` first.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """Something outside the process is not there; the message names the option or variable to fix."""


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
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def check_ray_address(address: str | None, option: str = "--address / RAY_ADDRESS") -> None:
    """A given Ray address (host:port of the GCS, ray://host:port, or 'auto') must accept a connection."""
    if not address or address in ("auto", "local"):
        return
    default = 10001 if address.startswith("ray://") else 6379
    host, port = _host_port(address, default)
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return
    except OSError as exc:
        raise PreflightError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start it or fix "
                             f"{option}") from None


def check_run_endpoints(*, tracking_uri: str | None, address: str | None) -> None:
    check_tracking_uri(tracking_uri)
    check_ray_address(address)
