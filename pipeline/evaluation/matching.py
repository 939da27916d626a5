"""Template-matching interpretability score (Sec. 4.3, Table 4).

The paper matches layer-3 (``conv8``, part level) basis functions against training images with fast
normalised cross-correlation (Lewis 1995, its ref. [37]) and reports the mean matching score. Here:

* **NCC** is ``skimage.feature.match_template`` (Lewis' algorithm), never hand-written.
* **Colour:** by default basis functions and images are converted to luminance (ITU-R 601 weights
  0.299 R + 0.587 G + 0.114 B; linear, so a basis function's luminance is the luminance of its contribution)
  and matched in 2-D, as fast NCC is classically applied. ``colour="rgb"`` instead uses match_template's
  3-D support: template (h, w, 3) over image (H, W, 3), one NCC over all three channels jointly (means and
  norms over the whole h x w x 3 window). Gray is the default because the 3-D path is ~40x slower here
  (2.0 s vs 0.05 s per basis function against 1,000 32x32 images on one core), which would make Table 4 on
  1,000 images cost minutes.
* **Score of one basis function** = max NCC over all positions of all scored images (how well the best
  matching training patch explains it). ``image_mean`` also reports the mean over images of each image's best
  position (less saturating; a secondary figure, not Table 4's).
* **Table 4's number** = mean of the per-basis-function scores.

**Crop rule** (``crop``): ``"support"`` (the default, Table 4's number) crops each basis function to the
bounding box of its non-zero support, which for a part-level unit includes the faint tails the 3x3
convolutions spread it over. ``"field"`` instead takes a fixed window of ``field_cells`` x R/S pixels (R the
image side, S the layer's grid side; ``FIELD_CELLS`` = 2 by default, i.e. the unit's own cell plus half a
cell on each side) centred on the unit's nominal projective field (``basis.receptive_field_centre_px``) and
shifted inside the image at its borders: every unit of every model gets a template of the same size, so a
sparse and a dense model are compared on equal windows (reported as ``matching_score_<layer>_field``).

Units scored (``units_for_matching``): for ``num_latents`` Z's drawn from N(0, I) with a fixed seed, the
``units_per_latent`` most strongly activated units of the layer per Z (activation > 0 after ReLU and top-k).
Basis functions of a dense and a sparse model are thus chosen by the same rule: the units that carry each
image. Basis functions with an empty or single-pixel support, or whose matched template is constant (in
gray: constant luminance, even where the colours vary), cannot be normalised and are skipped (counted in
``skipped``).

**Reference points** (``reference_scores``): the score has no natural scale (an untrained model already
scores 0.3-0.5 on the demo data), so two patterns are scored in the very crop boxes of the scored basis
functions, against the same images: ``holdout`` fills each box with the pixels of an unseen holdout image
at the same place (the i-th box from holdout image i mod N): what a basis function that looked exactly like
a real image part would score, the ceiling on these data; ``blob`` fills each box with one dark isotropic
Gaussian (sigma a quarter of the box side), a generic pattern that stands for no part. A basis function
that scores near ``blob`` is no more part-like than a dot.

Speed: instead of one match_template call per (basis function, image), the images are tiled into one mosaic
and matched in a single FFT call per basis function; only window positions lying wholly inside one tile are
kept, and NCC is local to its window, so the result is the per-image NCC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], np.float64)
CROPS = ("support", "field")
# Side of the "field" crop window in cells of the layer's grid (x R/S pixels); see the module docstring.
FIELD_CELLS = 2.0


@dataclass
class MatchResult:
    per_image_best: np.ndarray  # (N,) best NCC per image
    per_image_location: np.ndarray  # (N, 2) (row, col) of the template's top-left corner at that best
    best: float  # max over images
    best_image: int


def _prepare(images_hwc: np.ndarray, colour: str) -> np.ndarray:
    """(N, H, W, 3) -> float64 (N, H, W, 3) or (N, H, W) for gray."""
    images = np.asarray(images_hwc, np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got {images.shape}")
    if colour == "rgb":
        return images
    if colour == "gray":
        return images @ _LUMA
    raise ValueError(f"colour must be 'rgb' or 'gray', got {colour!r}")


class ImageMosaic:
    """N equally sized images tiled on a near-square grid, for one-call template matching."""

    def __init__(self, images_hwc: np.ndarray, colour: str = "gray"):
        images = _prepare(images_hwc, colour)
        self.colour = colour
        self.n, self.h, self.w = images.shape[:3]
        self.cols = max(1, int(math.ceil(math.sqrt(self.n))))
        self.rows = int(math.ceil(self.n / self.cols))
        shape = (self.rows * self.h, self.cols * self.w) + images.shape[3:]
        # Unused tiles repeat image 0 so they are ordinary data; they are never read back.
        self.canvas = np.empty(shape, np.float64)
        for i in range(self.rows * self.cols):
            r, c = divmod(i, self.cols)
            self.canvas[r * self.h : (r + 1) * self.h, c * self.w : (c + 1) * self.w] = images[i if i < self.n else 0]

    def match(self, template_hwc: np.ndarray) -> MatchResult:
        """NCC of one template (h, w, 3) [or (h, w) for gray] against every image."""
        from skimage.feature import match_template

        template = np.asarray(template_hwc, np.float64)
        if self.colour == "gray" and template.ndim == 3:
            template = template @ _LUMA
        th, tw = template.shape[:2]
        if th > self.h or tw > self.w:
            raise ValueError(f"template {th}x{tw} is larger than the images {self.h}x{self.w}")
        response = match_template(self.canvas, template)  # valid positions of the whole mosaic
        if response.ndim == 3:  # RGB: (rows*h - th + 1, cols*w - tw + 1, 1)
            response = response[..., 0]
        # Positions whose window lies inside one tile: offsets 0..h-th within each tile.
        valid_h, valid_w = self.h - th + 1, self.w - tw + 1
        padded = np.full((self.rows * self.h, self.cols * self.w), -np.inf)
        padded[: response.shape[0], : response.shape[1]] = response
        tiles = padded.reshape(self.rows, self.h, self.cols, self.w)[:, :valid_h, :, :valid_w]
        tiles = tiles.transpose(0, 2, 1, 3).reshape(self.rows * self.cols, valid_h * valid_w)[: self.n]
        flat_best = tiles.argmax(axis=1)
        best = tiles[np.arange(self.n), flat_best]
        locations = np.stack(np.divmod(flat_best, valid_w), axis=1)
        top = int(best.argmax())
        return MatchResult(per_image_best=best, per_image_location=locations, best=float(best[top]), best_image=top)


def _as_template(pattern_chw: np.ndarray, colour: str) -> np.ndarray:
    """A basis function (3, h, w) as match_template compares it: (h, w) luminance for gray, (h, w, 3) for rgb."""
    if colour not in ("gray", "rgb"):
        raise ValueError(f"colour must be 'rgb' or 'gray', got {colour!r}")
    template = np.moveaxis(np.asarray(pattern_chw, np.float64), 0, -1)
    return template @ _LUMA if colour == "gray" else template


def _normalisable(template: np.ndarray, image_side: int) -> bool:
    h, w = template.shape[:2]
    if h * w <= 1 or h > image_side or w > image_side:
        return False
    scale = float(np.abs(template).max())
    return scale > 0.0 and float(template.std()) > 1e-9 * scale


def matchable(pattern_chw: np.ndarray, image_side: int, colour: str = "gray") -> bool:
    """A basis function can be scored when its support is > 1 pixel, fits the image and the template that is
    matched (its luminance for ``colour="gray"``) is not constant. A patch of one uniform colour varies in RGB
    but not in luminance; its gray NCC is 0 / 0, which match_template would turn into an arbitrary number."""
    return _normalisable(_as_template(pattern_chw, colour), image_side)


def match_basis_functions(patterns_chw: list[np.ndarray], images_hwc: np.ndarray, *, colour: str = "gray",
                          progress: bool = False) -> dict:
    """Score each basis function (3, h, w) against images (N, H, W, 3); see the module docstring.

    Returns ``{"scores": [per pattern or None], "image_mean": [...], "locations": [(image, row, col) or None],
    "score": mean of scores, "image_mean_score": ..., "scored": int, "skipped": int}``.
    """
    from tqdm import tqdm

    mosaic = ImageMosaic(images_hwc, colour)
    scores, image_means, locations = [], [], []
    for pattern in tqdm(patterns_chw, desc="template matching", unit="basis", disable=not progress, dynamic_ncols=True):
        template = _as_template(pattern, colour)
        if not _normalisable(template, min(mosaic.h, mosaic.w)):
            scores.append(None)
            image_means.append(None)
            locations.append(None)
            continue
        result = mosaic.match(template)
        scores.append(result.best)
        image_means.append(float(result.per_image_best.mean()))
        row, col = result.per_image_location[result.best_image]
        locations.append((result.best_image, int(row), int(col)))
    valid = [s for s in scores if s is not None]
    return {
        "scores": scores,
        "image_mean": image_means,
        "locations": locations,
        "score": float(np.mean(valid)) if valid else float("nan"),
        "image_mean_score": float(np.mean([m for m in image_means if m is not None])) if valid else float("nan"),
        "scored": len(valid),
        "skipped": len(scores) - len(valid),
    }


def dark_blob_patterns(boxes) -> list[np.ndarray]:
    """One dark isotropic Gaussian (3, h, w) per crop box (y0, y1, x0, x1): sigma a quarter of each side, on a
    zero ground, equal in the three channels (the ``blob`` reference of the module docstring)."""
    patterns = []
    for y0, y1, x0, x1 in boxes:
        h, w = y1 - y0, x1 - x0
        rows, cols = np.mgrid[:h, :w]
        blob = -np.exp(-0.5 * (((rows - (h - 1) / 2) / (h / 4)) ** 2 + ((cols - (w - 1) / 2) / (w / 4)) ** 2))
        patterns.append(np.repeat(blob[None], 3, axis=0))
    return patterns


def image_patch_patterns(boxes, images_chw: np.ndarray) -> list[np.ndarray]:
    """The i-th crop box cut from image i mod N of ``images_chw`` (N, 3, H, W) (the ``holdout`` reference)."""
    images = np.asarray(images_chw, np.float64)
    if len(images) == 0:
        raise ValueError("image_patch_patterns needs at least one image")
    return [images[i % len(images), :, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in enumerate(boxes)]


def reference_scores(boxes, images_hwc: np.ndarray, holdout_chw: np.ndarray | None, *,
                     colour: str = "gray") -> dict[str, float]:
    """Table 4's score of the two reference patterns (module docstring) in ``boxes``, against ``images_hwc``:
    ``{"blob": ..., "holdout": ...}``; ``holdout`` only when holdout images are given."""
    out = {"blob": match_basis_functions(dark_blob_patterns(boxes), images_hwc, colour=colour)["score"]}
    if holdout_chw is not None and len(holdout_chw):
        out["holdout"] = match_basis_functions(image_patch_patterns(boxes, holdout_chw), images_hwc,
                                               colour=colour)["score"]
    return out


def field_box(layer: str, y: int, x: int, resolution: int, cells: float = FIELD_CELLS) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the ``"field"`` crop: a square of ``cells`` x R/S pixels (at least 2, at most the
    image) centred on the unit's projective-field centre, shifted to lie inside the image."""
    from pipeline.evaluation.basis import layer_side, receptive_field_centre_px

    if cells <= 0:
        raise ValueError(f"field_cells must be positive, got {cells}")
    side = int(min(resolution, max(2, round(cells * resolution / layer_side(layer)))))
    cy, cx = receptive_field_centre_px(layer, y, x, resolution)
    y0 = int(min(max(round(cy - side / 2), 0), resolution - side))
    x0 = int(min(max(round(cx - side / 2), 0), resolution - side))
    return y0, y0 + side, x0, x0 + side


def units_for_matching(generator, layer: str, *, latent_dim: int, num_latents: int = 8, units_per_latent: int = 8,
                       seed: int = 0, crop: str = "support", field_cells: float = FIELD_CELLS):
    """Basis functions of the units scored for Table 4 (see the module docstring), cropped by ``crop``."""
    import torch

    from pipeline.evaluation.basis import active_units, basis_functions, forward_with_masks

    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    device = next(generator.parameters()).device
    rng = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(num_latents, latent_dim, generator=rng).to(device)
    _, activations, masks = forward_with_masks(generator, z)
    units = active_units(activations, layer, top=units_per_latent)
    if crop == "support":
        return basis_functions(generator, masks, units)
    bases = basis_functions(generator, masks, units, crop=False)
    for b in bases:
        resolution = b.image.shape[-1]
        b.box = field_box(layer, b.unit.y, b.unit.x, resolution, field_cells)
        y0, y1, x0, x1 = b.box
        b.image = np.ascontiguousarray(b.image[:, y0:y1, x0:x1])
    return bases


def _numpy(images):
    return np.asarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images, np.float64)


def matching_score(generator, images_pm1, layer: str, *, latent_dim: int, num_latents: int = 8,
                   units_per_latent: int = 8, seed: int = 0, colour: str = "gray", progress: bool = False,
                   crop: str = "support", field_cells: float = FIELD_CELLS, references: bool = False,
                   holdout_pm1=None) -> dict:
    """Table 4's mean matching score of ``layer``'s basis functions against ``images_pm1`` (N, 3, H, W).

    ``crop``: ``"support"`` (Table 4) or ``"field"`` (a fixed ``field_cells`` x R/S window); see the module
    docstring. Returns the ``match_basis_functions`` dict plus ``"units"`` (the scored units as dicts),
    ``"channels"`` (how many distinct channels the scored units belong to), ``"patterns"`` (the basis functions
    (3, h, w) as cropped and matched, for pictures; not JSON) and the settings. ``references``:
    also ``"reference"``, the ``reference_scores`` in the boxes of the scored basis functions (``holdout``
    from ``holdout_pm1`` (M, 3, H, W) when given).
    """
    images = np.moveaxis(_numpy(images_pm1), 1, -1)
    bases = units_for_matching(generator, layer, latent_dim=latent_dim, num_latents=num_latents,
                               units_per_latent=units_per_latent, seed=seed, crop=crop, field_cells=field_cells)
    result = match_basis_functions([b.image for b in bases], images, colour=colour, progress=progress)
    result["units"] = [
        {"sample": b.unit.sample, "channel": b.unit.channel, "y": b.unit.y, "x": b.unit.x,
         "activation": b.unit.activation, "box": list(b.box), "score": s, "best_match": loc}
        for b, s, loc in zip(bases, result["scores"], result["locations"])
    ]
    # How many different channels the score is a mean over: a dictionary that puts one pattern in most of the
    # scored slots scores that one pattern many times (docs/results.md, "Chasing the matching target").
    result["channels"] = len({b.unit.channel for b, s in zip(bases, result["scores"]) if s is not None})
    result["patterns"] = [b.image for b in bases]
    result.update({"layer": layer, "colour": colour, "crop": crop, "num_latents": num_latents,
                   "units_per_latent": units_per_latent, "num_images": int(images.shape[0]), "seed": seed})
    if crop == "field":
        result["field_cells"] = field_cells
    if references:
        boxes = [b.box for b, s in zip(bases, result["scores"]) if s is not None]
        holdout = None if holdout_pm1 is None else _numpy(holdout_pm1)
        result["reference"] = reference_scores(boxes, images, holdout, colour=colour) if boxes else {}
    return result
