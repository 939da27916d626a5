"""Byte storage for data URLs: a local path or ``s3://bucket/prefix``.

S3 goes through boto3 and its standard credential chain (environment, shared config/credentials files,
instance/container roles). The endpoint override for S3-compatible stores (MinIO, Ceph, moto) is the
standard ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) variable, which botocore >= 1.31 honours
natively; we pass nothing explicit so that the service-specific variable and config-file ``endpoint_url``
keep working too.

Transient S3 errors (throttling, 5xx, connection resets) are retried by botocore's "standard" retry mode;
uploads above ``MULTIPART_THRESHOLD_BYTES`` are multipart via ``boto3.s3.transfer.TransferConfig``.
``upload_file`` is resumable at object granularity: an object already present with the same SHA-256 (kept
in the object's user metadata) is not written again, so a re-run after an interruption uploads only what
is missing or different.

These helpers are shared by the data layer and by checkpointing, so they know nothing about datasets.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

S3_SCHEME = "s3://"
MULTIPART_THRESHOLD_BYTES = 16 * 1024 * 1024
MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024
S3_MAX_ATTEMPTS = 8
# User-metadata key under which upload_file/write_bytes record the object's SHA-256.
SHA256_METADATA_KEY = "sha256"
_HASH_CHUNK_BYTES = 1024 * 1024


class StorageError(OSError):
    """A storage operation failed for a reason other than a missing object (permissions, bad URL...)."""


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith(S3_SCHEME)


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3://bucket/key URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(url: str | os.PathLike, *parts: str) -> str:
    """Join path components onto a local path or an s3 URL (always with ``/`` for s3)."""
    url = str(url)
    if is_s3(url):
        pieces = [url.rstrip("/")] + [p.strip("/") for p in parts if p]
        return "/".join(pieces)
    return str(Path(url, *parts))


# boto3 clients are thread-safe but building one costs ~50 ms, so cache one per (endpoint, credentials
# env, region, pid): tests and long-lived processes may change the environment, and clients must not be
# shared across fork.
_client_lock = threading.Lock()
_clients: dict[tuple, object] = {}


def s3_client():
    import boto3
    from botocore.config import Config

    cache_key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    with _client_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                # Pool size matches the transfer manager's default concurrency so multipart uploads don't
                # log "connection pool is full" warnings.
                max_pool_connections=16,
            )
            client = boto3.session.Session().client("s3", config=config)
            _clients[cache_key] = client
        return client


def _is_not_found(error) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_bytes(url: str | os.PathLike) -> bytes:
    """Whole object/file contents. Raises FileNotFoundError when it does not exist."""
    url = str(url)
    if not is_s3(url):
        return Path(url).read_bytes()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if _is_not_found(error):
            raise FileNotFoundError(url) from error
        raise StorageError(f"cannot read {url}: {error}") from error


def open_read(url: str | os.PathLike) -> IO[bytes]:
    """A readable binary stream (a local file or the S3 streaming body)."""
    url = str(url)
    if not is_s3(url):
        return open(url, "rb")
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as error:
        if _is_not_found(error):
            raise FileNotFoundError(url) from error
        raise StorageError(f"cannot read {url}: {error}") from error


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write a whole object. Local writes are atomic (temp file + rename) so readers never see half a file."""
    url = str(url)
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().put_object(
            Bucket=bucket, Key=key, Body=data, Metadata={SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()}
        )
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def exists(url: str | os.PathLike) -> bool:
    url = str(url)
    if not is_s3(url):
        return Path(url).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as error:
        if _is_not_found(error):
            return False
        raise StorageError(f"cannot stat {url}: {error}") from error


def remote_sha256(url: str) -> str | None:
    """The SHA-256 recorded in an S3 object's metadata, or None if absent / no such object."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _is_not_found(error):
            return None
        raise StorageError(f"cannot stat {url}: {error}") from error
    return head.get("Metadata", {}).get(SHA256_METADATA_KEY)


def list_dir(url: str | os.PathLike) -> list[str]:
    """Names (not full URLs) of the entries directly under ``url``, sorted. Missing directory -> []."""
    url = str(url)
    if not is_s3(url):
        path = Path(url)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    bucket, prefix = split_s3(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    names: set[str] = set()
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        names.update(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
        names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
    return sorted(n for n in names if n)


def upload_file(local_path: str | os.PathLike, url: str | os.PathLike, *, sha256: str | None = None) -> bool:
    """Copy a local file to ``url``. Returns False when skipped because an identical object is present.

    On S3 the upload is multipart above MULTIPART_THRESHOLD_BYTES and retried on transient errors; the
    object's SHA-256 is stored in its metadata so a later call can skip it (resumable re-runs).
    """
    url = str(url)
    sha256 = sha256 or sha256_file(local_path)
    if not is_s3(url):
        destination = Path(url)
        if destination.exists() and destination.stat().st_size == Path(local_path).stat().st_size:
            if sha256_file(destination) == sha256:
                return False
        write_bytes(destination, Path(local_path).read_bytes())
        return True
    from boto3.s3.transfer import TransferConfig

    if remote_sha256(url) == sha256:
        return False
    bucket, key = split_s3(url)
    transfer = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD_BYTES, multipart_chunksize=MULTIPART_CHUNK_BYTES, use_threads=True
    )
    s3_client().upload_file(
        str(local_path), bucket, key, ExtraArgs={"Metadata": {SHA256_METADATA_KEY: sha256}}, Config=transfer
    )
    return True


def check_writable(url: str | os.PathLike) -> None:
    """Raise StorageError unless we can create objects under ``url`` (probe write + delete)."""
    url = str(url)
    probe_name = f".sparsegen-write-probe-{os.getpid()}"
    if not is_s3(url):
        try:
            Path(url).mkdir(parents=True, exist_ok=True)
            probe = Path(url, probe_name)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StorageError(f"destination {url} is not writable: {error}") from error
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(url)
    key = f"{prefix.rstrip('/')}/{probe_name}" if prefix else probe_name
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=b"")
        s3_client().delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as error:
        raise StorageError(f"destination {url} is not writable: {error}") from error


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    """webdataset.gopen handler so ``webdataset.WebDataset("s3://...")`` reads through boto3 too."""
    if mode[0] != "r":
        raise ValueError(f"{url}: only reading is supported through webdataset's gopen; use upload_file")
    return open_read(url)


def register_webdataset_s3() -> None:
    # ``webdataset.gopen`` is re-exported as the function, so import the module by its full name.
    import importlib

    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3
