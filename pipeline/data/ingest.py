"""``sparsegen ingest``: images from a folder, a zip/tar archive or an LSUN-style LMDB -> shards + manifest.

Every image is centre-cropped to a square, resized with antialiasing (Lanczos) to ``size``×``size`` and
stored as RGB PNG. Images are taken in sorted order of their name (relative path, archive member name or
LMDB key), so ``limit=N`` is "the first N" as in the paper, and global indices are stable.

Bad input is converted or skipped, and always counted:

* converted (``summary["converted"]``, by original PIL mode): grayscale (``L``/``1``), palette (``P``),
  RGBA/LA (composited onto white), 16-bit (``I;16``/``I``: top 8 bits), CMYK, YCbCr...;
* skipped (``summary["skipped_by_reason"]``): ``not_image`` (a file without an image extension, or content
  PIL cannot identify), ``truncated`` (incomplete image data), ``undecodable`` (any other decode error).

Errors that would waste a long job are raised as one ``DataError`` before any work: missing or empty
source, unwritable destination.

Decoding/resizing runs in a process pool (``workers``); results come back in source order, so the output is
identical for any number of workers. JPEG decoding uses PIL's ``draft`` mode (DCT-domain downscaling to the
smallest scale still >= the target), which is what makes ~1000 images/s/core possible on photos.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import tarfile
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeline.data import storage
from pipeline.data.errors import DataError
from pipeline.data.shards import DEFAULT_SHARD_SIZE_IMAGES, DatasetWriter

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
SKIP_NOT_IMAGE = "not_image"
SKIP_TRUNCATED = "truncated"
SKIP_UNDECODABLE = "undecodable"
# Samples handed to a pool worker per task: large enough to amortise IPC, small enough for a smooth bar.
_POOL_CHUNK_IMAGES = 16
# zlib level 0 (PNG still lossless, just not deflated): encoding is ~2x and the reader's decoding ~1.7x faster
# than level 1 on photos, for ~1.5x the bytes (12 KB per 64×64 image), which is what lets the reader reach
# its >= 3,000 images/s/core target. Raise it for large image sizes where storage dominates.
PNG_COMPRESS_LEVEL = 0
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


@dataclass(frozen=True)
class Candidate:
    """One entry of the source, in sorted order. Exactly one of ``path`` / ``read`` is used."""

    name: str
    path: str | None = None  # folder sources: the worker reads the file itself (no IPC of bytes)
    read: Callable[[], bytes] | None = None  # archives/LMDB: the main process reads, the worker decodes


@dataclass
class Source:
    kind: str  # folder | zip | tar | lmdb
    candidates: list[Candidate]
    not_image_names: list[str]
    close: Callable[[], None] = lambda: None


def _has_image_suffix(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _is_lmdb(path: Path) -> bool:
    return (path.is_dir() and (path / "data.mdb").is_file()) or (path.is_file() and path.name == "data.mdb")


def open_source(source: str | os.PathLike) -> Source:
    path = Path(source)
    if storage.is_s3(str(source)):
        raise DataError(f"ingest reads a local folder, archive or LMDB; download {source} first")
    if not path.exists():
        raise DataError(f"source {source} does not exist")
    if _is_lmdb(path):
        return _open_lmdb(path if path.is_dir() else path.parent)
    if path.is_dir():
        return _open_folder(path)
    if zipfile.is_zipfile(path):
        return _open_zip(path)
    if tarfile.is_tarfile(path):
        return _open_tar(path)
    raise DataError(f"source {source} is not a folder, zip/tar archive or LMDB export")


def _open_folder(root: Path) -> Source:
    root = root.resolve()  # workers open the files, and their working directory may differ
    candidates, not_images = [], []
    for file_path in sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()):
        name = file_path.relative_to(root).as_posix()
        if _has_image_suffix(name):
            candidates.append(Candidate(name=name, path=str(file_path)))
        else:
            not_images.append(name)
    return Source("folder", candidates, not_images)


def _open_zip(path: Path) -> Source:
    archive = zipfile.ZipFile(path)
    names = sorted(info.filename for info in archive.infolist() if not info.is_dir())
    candidates = [Candidate(name=n, read=lambda n=n: archive.read(n)) for n in names if _has_image_suffix(n)]
    return Source("zip", candidates, [n for n in names if not _has_image_suffix(n)], archive.close)


def _open_tar(path: Path) -> Source:
    # Random access by member; fast for plain tars (seek), slower but correct for compressed ones.
    archive = tarfile.open(path, "r:*")
    members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
    candidates = [
        Candidate(name=m.name, read=lambda m=m: archive.extractfile(m).read())
        for m in members
        if _has_image_suffix(m.name)
    ]
    return Source("tar", candidates, [m.name for m in members if not _has_image_suffix(m.name)], archive.close)


def _open_lmdb(path: Path) -> Source:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=1)
    with env.begin() as txn:
        keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]  # LMDB keys iterate sorted

    def read(key: bytes) -> bytes:
        with env.begin() as txn:
            return bytes(txn.get(key))

    # LSUN exports key by image id without extension; every value is meant to be an image.
    candidates = [Candidate(name=k.decode("utf-8", "backslashreplace"), read=lambda k=k: read(k)) for k in keys]
    return Source("lmdb", candidates, [], env.close)


def _to_rgb(image):
    """Return (RGB image, original mode or None when it already was RGB)."""
    from PIL import Image
    import numpy as np

    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image)
        # 16-bit data: keep the top 8 bits. 32-bit "I" from 8-bit sources (max <= 255) is kept as is.
        shift = 8 if mode != "I" or pixels.max(initial=0) > 255 else 0
        gray = (np.clip(pixels, 0, 65535).astype(np.uint32) >> shift).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Composite on white: transparent regions become background rather than black or random colour.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), mode
    return image.convert("RGB"), mode


def prepare_image(data: bytes | str, size: int, png_compress_level: int = PNG_COMPRESS_LEVEL) -> tuple:
    """Decode, orient, centre-crop and resize one image.

    Returns ``("ok", png_bytes, (width, height), converted_from_mode_or_None)`` or ``("skip", reason, detail)``.
    Runs in pool workers, so it must be a module-level function and must never raise.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        source = open(data, "rb") if isinstance(data, str) else io.BytesIO(data)
        with source, Image.open(source) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):  # rotated by 90°: the displayed size is transposed
                width, height = height, width
            # JPEG: decode directly at the smallest DCT scale that is still >= size on both sides.
            image.draft(image.mode, (size, size))
            image.load()
            image = ImageOps.exif_transpose(image)
            image, converted_from = _to_rgb(image)
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            # Crop, then resize: resize(box=...) would let the filter reach pixels outside the crop.
            square = image.crop((left, top, left + side, top + side))
            resized = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
            buffer = io.BytesIO()
            resized.save(buffer, format="PNG", compress_level=png_compress_level)
        return ("ok", buffer.getvalue(), (width, height), converted_from)
    except UnidentifiedImageError as error:
        return ("skip", SKIP_NOT_IMAGE, str(error))
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for damaged files
        reason = SKIP_TRUNCATED if "truncated" in str(error).lower() else SKIP_UNDECODABLE
        return ("skip", reason, f"{type(error).__name__}: {error}")
    except Exception as error:  # noqa: BLE001 - a decoder bug must not kill a long job; it is counted
        return ("skip", SKIP_UNDECODABLE, f"{type(error).__name__}: {error}")


def _prepare_task(task: tuple[bytes | str, int, int]) -> tuple:
    return prepare_image(*task)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _results(tasks: Iterator[tuple], workers: int) -> Iterator[tuple]:
    if workers <= 1:
        yield from map(_prepare_task, tasks)
        return
    # Pool.imap's feeder thread drains its input without back-pressure, which for archive/LMDB sources
    # would pull the whole source into memory; a semaphore bounds the images in flight.
    in_flight = threading.Semaphore(workers * _POOL_CHUNK_IMAGES * 4)
    stopping = threading.Event()

    def throttled() -> Iterator[tuple]:
        for task in tasks:
            # Poll so that an early stop (--limit, error) can end the feeder: Pool.terminate joins it.
            while not in_flight.acquire(timeout=0.05):
                if stopping.is_set():
                    return
            yield task

    # forkserver: workers don't inherit the parent's threads (tqdm monitor, boto3 pools, torch) as fork would.
    context = multiprocessing.get_context("forkserver")
    with context.Pool(workers) as pool:
        try:
            # imap keeps source order, which keeps the output independent of the number of workers.
            for result in pool.imap(_prepare_task, throttled(), chunksize=_POOL_CHUNK_IMAGES):
                in_flight.release()
                yield result
        finally:
            stopping.set()


def ingest(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE_IMAGES,
    limit: int | None = None,
    holdout_fraction: float = 0.0,
    workers: int | None = None,
    progress: bool = True,
    png_compress_level: int = PNG_COMPRESS_LEVEL,
) -> dict:
    """Convert ``source`` into a sharded dataset at ``out``; returns the summary (see module docstring).

    Summary keys: ``written``, ``skipped``, ``skipped_by_reason``, ``converted``, ``shards`` (URLs),
    ``manifest`` (URL), ``num_train``, ``num_holdout``, ``image_size``, ``source_kind``,
    ``uploaded_shards``, ``unchanged_shards``, ``skipped_examples`` (first few ``[name, reason, detail]``).
    """
    from tqdm import tqdm

    if size < 1:
        raise DataError(f"--size must be >= 1, got {size}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    opened = open_source(source)
    try:
        if not opened.candidates:
            raise DataError(
                f"source {source} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                f"found {len(opened.not_image_names)} other files"
            )
        writer = DatasetWriter(
            str(out), image_size=size, kind="ingest", shard_size_images=shard_size, holdout_fraction=holdout_fraction
        )
        skipped = Counter({SKIP_NOT_IMAGE: len(opened.not_image_names)} if opened.not_image_names else {})
        skipped_examples = [[name, SKIP_NOT_IMAGE, "no image file extension"] for name in opened.not_image_names[:5]]
        converted: Counter = Counter()
        tasks = ((c.path if c.path is not None else c.read(), size, png_compress_level) for c in opened.candidates)
        total = len(opened.candidates) if limit is None else min(limit, len(opened.candidates))
        bar = tqdm(total=total, unit="img", desc="ingest", disable=not progress, dynamic_ncols=True)
        # No more processes than there are chunks of work: a pool costs ~1 s to start.
        workers = min(workers or default_workers(), math.ceil(total / _POOL_CHUNK_IMAGES))
        results = _results(tasks, workers)
        try:
            for candidate, result in zip(opened.candidates, results):
                if result[0] == "ok":
                    _, png_bytes, original_size, converted_from = result
                    writer.add(png_bytes, source=candidate.name, original_size=original_size)
                    if converted_from:
                        converted[converted_from] += 1
                    bar.update(1)
                    if limit is not None and writer.num_written >= limit:
                        break
                else:
                    _, reason, detail = result
                    skipped[reason] += 1
                    if len(skipped_examples) < 20:
                        skipped_examples.append([candidate.name, reason, detail])
                    bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
        except BaseException:
            writer.abort()
            raise
        finally:
            results.close()  # stops the worker pool now, also when --limit ended the loop early
            bar.close()
        if writer.num_written == 0:
            writer.abort()
            raise DataError(f"no decodable images in {source}: skipped {dict(skipped)}")
        written = writer.close()
    finally:
        opened.close()
    return {
        "written": written["num_train"] + written["num_holdout"],
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "converted": dict(sorted(converted.items())),
        "image_size": size,
        "source_kind": opened.kind,
        "skipped_examples": skipped_examples,
        **written,
    }
