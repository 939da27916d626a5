"""Fréchet Inception Distance (Heusel et al. 2017), as the paper's Table 2 uses it.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to the 2048-d pool3 features
(``inception.FIDInceptionV3``) of real and generated images. The paper uses as many generated samples as
training images, which is the default here.

Reference statistics of a dataset are computed once and cached as ``.npz`` keyed by the dataset manifest's
sha256, the Inception weights' sha256 and the image size the features were taken at, in
``$SPARSEGEN_CACHE_DIR/fid`` (default ``~/.cache/sparsegen/fid``); the cache file is also returned so callers
can store it as a run artifact.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

# Imaginary parts of sqrtm(S1 S2) below this are round-off (pytorch-fid / TTUR use the same tolerance).
IMAGINARY_TOLERANCE = 1e-3


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in squared feature units.

    Safeguards of the reference implementation: when S1 S2 is (near) singular, as it is with fewer samples
    than feature dimensions, sqrtm returns non-finite values and eps * I is added to both covariances; tiny
    imaginary parts from round-off are dropped, a large one raises ``ValueError``.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; handled just below
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_TOLERANCE):
            raise ValueError(f"sqrtm(S1 S2) has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64; N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    total: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "fid features",
) -> np.ndarray:
    """pool3 features (N, 2048) float64 of image batches in [-1, 1]."""
    from tqdm import tqdm

    out = []
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for images in batches:
            feats = model(images.to(device, torch.float32).clamp_(-1.0, 1.0))
            out.append(feats.double().cpu().numpy())
            bar.update(images.shape[0])
    if not out:
        raise ValueError("no images to compute FID features from")
    return np.concatenate(out)


def cache_dir() -> Path:
    root = os.environ.get("SPARSEGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsegen")
    return Path(root) / "fid"


def reference_cache_path(manifest_sha256: str, weights_sha256: str, image_size: int, split: str, limit: int | None,
                         directory: str | os.PathLike | None = None) -> Path:
    name = f"ref-{manifest_sha256[:16]}-{split}-{limit or 'all'}-{image_size}px-inc{weights_sha256[:12]}.npz"
    return Path(directory or cache_dir()) / name


def reference_statistics(
    data_url: str,
    model: torch.nn.Module,
    weights_sha256: str,
    *,
    image_size: int,
    split: str = "train",
    limit: int | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    directory: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, int, Path]:
    """(mu, sigma, number of images, cache file) of the real images of ``split``, computed once per dataset.

    Images are read at ``image_size`` (the model's resolution, as the generator sees them), so the real and
    generated images go through the same 299 px resize.
    """
    from pipeline.data import make_loader, open_dataset

    info = open_dataset(data_url)
    path = reference_cache_path(info.manifest_sha256, weights_sha256, image_size, split, limit, directory)
    if path.exists():
        cached = np.load(path)
        return cached["mu"], cached["sigma"], int(cached["count"]), path
    loader = make_loader(info, split=split, batch_size=batch_size, shuffle=False, image_size=image_size)
    available = loader.num_samples
    total = min(available, limit) if limit else available

    def batches():
        seen = 0
        for _, images in loader:
            if seen >= total:
                break
            images = images[: total - seen]
            seen += images.shape[0]
            yield images

    features = extract_features(model, batches(), total=total, device=device, progress=progress, desc="fid real")
    mu, sigma = feature_statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, count=features.shape[0], manifest_sha256=info.manifest_sha256,
             weights_sha256=weights_sha256)
    os.replace(tmp, path)  # atomic: concurrent evaluations never read a half-written cache file
    return mu, sigma, features.shape[0], path


def generated_statistics(
    generator: torch.nn.Module,
    latent_dim: int,
    n: int,
    model: torch.nn.Module,
    *,
    batch_size: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of n images g(Z), Z ~ N(0, I) drawn with ``seed``."""
    gen_device = next(generator.parameters()).device
    rng = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def batches():
        for start in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - start), latent_dim, generator=rng).to(gen_device)
            yield generator(z)

    features = extract_features(model, batches(), total=n, device=device, progress=progress, desc="fid generated")
    return feature_statistics(features)
