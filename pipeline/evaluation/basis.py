"""Basis functions of single units (Fig. 1, Sec. 4.3).

A *unit* is one channel at one position of a sparsified layer (``fc4``, ``conv8``, ...). Its basis function is
the image-space pattern it draws alone: run one forward pass for a Z, freeze every ReLU and top-k mask of
that pass, keep this unit's activation, zero the rest of the layer, propagate to the image without biases
and without the final tanh (``SparseGenerator.propagate``), and crop to the non-zero support. With the masks
fixed the network is linear in the layer's activation, so the image equals the sum of the basis functions of
the layer's units plus the bias path — each basis function is exactly its unit's additive contribution to
the pre-tanh image. The unit keeps its real activation value (not 1), so basis functions are comparable in
magnitude; scale-invariant scores (normalised cross-correlation) are unaffected by that choice.

Positions are (row y, column x) in the layer's grid; a layer named ``convS`` has an S x S grid, ``fc4`` 4 x 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Pixels whose magnitude (max over RGB) is below this fraction of the basis function's peak count as outside
# its support when cropping. Under fixed masks and no bias the outside is exactly 0; the tolerance only
# absorbs float round-off so crops are stable.
SUPPORT_RELATIVE_TOLERANCE = 1e-6


@dataclass
class Unit:
    """One unit of one forward pass: sample index in the batch of Z's, layer, channel, grid position."""

    sample: int
    layer: str
    channel: int
    y: int
    x: int
    activation: float

    def key(self) -> str:
        return f"s{self.sample}_{self.layer}_c{self.channel}_y{self.y}_x{self.x}"


@dataclass
class BasisFunction:
    unit: Unit
    # Cropped pattern (3, h, w) in pre-tanh image units, float32.
    image: np.ndarray
    # Crop box in image pixels: (y0, y1, x0, x1), y1/x1 exclusive. Empty support gives h = w = 0.
    box: tuple[int, int, int, int]
    extra: dict = field(default_factory=dict)


def layer_side(layer: str) -> int:
    """Grid side of a layer: fc4 -> 4, convS -> S."""
    return 4 if layer == "fc4" else int(layer[len("conv"):])


def receptive_field_centre_px(layer: str, y: int, x: int, resolution: int) -> tuple[float, float]:
    """(row, column) in image pixels of the centre of a unit's projective field.

    Nearest x2 upsampling maps cell y of an S grid onto pixels [y R/S, (y+1) R/S); the 3x3 same-padded
    convolutions after it grow the field symmetrically, so its centre stays at (y + 1/2) R / S.
    """
    scale = resolution / layer_side(layer)
    return (y + 0.5) * scale, (x + 0.5) * scale


@torch.no_grad()
def forward_with_masks(generator, z: torch.Tensor):
    """(images, activations, masks) of one forward pass; masks are what ``propagate`` holds fixed."""
    return generator(z, return_masks=True)


def active_units(activations: dict, layer: str, *, top: int | None = None, sample: int | None = None) -> list[Unit]:
    """Units of ``layer`` with activation > 0, strongest first (per sample, ``top`` per sample if given).

    "Active" = survived ReLU and top-k in the forward pass; for a dense layer that is every positive unit.
    """
    act = activations[layer].detach()
    samples = range(act.shape[0]) if sample is None else [sample]
    units: list[Unit] = []
    for s in samples:
        values = act[s].flatten()
        positive = int((values > 0).sum())
        count = positive if top is None else min(top, positive)
        if count == 0:
            continue
        best = values.topk(count)
        _, h, w = act[s].shape
        for value, flat in zip(best.values.tolist(), best.indices.tolist()):
            c, rest = divmod(flat, h * w)
            y, x = divmod(rest, w)
            units.append(Unit(sample=s, layer=layer, channel=c, y=y, x=x, activation=float(value)))
    return units


def one_unit_activations(units: list[Unit], shape: tuple[int, int, int], device, dtype) -> torch.Tensor:
    """(U, C, H, W): unit u's activation at its (channel, y, x), zeros elsewhere."""
    out = torch.zeros((len(units), *shape), device=device, dtype=dtype)
    for i, u in enumerate(units):
        out[i, u.channel, u.y, u.x] = u.activation
    return out


def gather_masks(masks: dict, samples: list[int]) -> dict:
    """The fixed masks of each unit's own forward pass, batched along the units."""
    index = torch.as_tensor(samples, dtype=torch.long, device=next(iter(masks.values())).device)
    return {k: v.index_select(0, index) for k, v in masks.items()}


@torch.no_grad()
def propagate_between(generator, layer: str, activation: torch.Tensor, masks: dict, target: str) -> torch.Tensor:
    """Propagate ``activation`` (output of ``layer``) with fixed masks, bias-free, to the output of ``target``.

    ``target`` must come after ``layer``; this is ``SparseGenerator.propagate`` stopped early, used for the
    AND-OR tree's parent -> child contributions.
    """
    import torch.nn.functional as F

    names = generator.layer_names
    start, stop = names.index(layer), names.index(target)
    if stop <= start:
        raise ValueError(f"{target} does not come after {layer} in {names}")
    x = activation
    for block_index in range(start, stop):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        for conv_index, conv in enumerate(generator.blocks[block_index]):
            x = conv(x, use_bias=False) * masks[f"block{block_index}.conv{conv_index}"]
    return x


def crop_support(pattern: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop a (3, H, W) pattern to the bounding box of its non-zero pixels."""
    magnitude = np.abs(pattern).max(axis=0)
    peak = float(magnitude.max()) if magnitude.size else 0.0
    if peak == 0.0:
        return pattern[:, :0, :0], (0, 0, 0, 0)
    rows = np.flatnonzero((magnitude > peak * SUPPORT_RELATIVE_TOLERANCE).any(axis=1))
    cols = np.flatnonzero((magnitude > peak * SUPPORT_RELATIVE_TOLERANCE).any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return pattern[:, y0:y1, x0:x1], (y0, y1, x0, x1)


@torch.no_grad()
def basis_functions(generator, masks: dict, units: list[Unit], *, chunk: int = 64, crop: bool = True) -> list[BasisFunction]:
    """Basis functions of ``units`` (all of one layer) of the forward pass whose ``masks`` are given."""
    if not units:
        return []
    layer = units[0].layer
    if any(u.layer != layer for u in units):
        raise ValueError("basis_functions: all units must be of one layer")
    reference = next(iter(masks.values()))
    channels = _layer_channels(generator, layer)
    side = layer_side(layer)
    out: list[BasisFunction] = []
    for start in range(0, len(units), chunk):
        part = units[start : start + chunk]
        act = one_unit_activations(part, (channels, side, side), reference.device, reference.dtype)
        images = generator.propagate(layer, act, gather_masks(masks, [u.sample for u in part]),
                                     use_bias=False, apply_tanh=False)
        for unit, image in zip(part, images.float().cpu().numpy()):
            if crop:
                cropped, box = crop_support(image)
            else:
                cropped, box = image, (0, image.shape[1], 0, image.shape[2])
            out.append(BasisFunction(unit=unit, image=np.ascontiguousarray(cropped), box=box))
    return out


def _layer_channels(generator, layer: str) -> int:
    if layer == "fc4":
        return generator.fc_channels
    index = generator.layer_names.index(layer) - 1
    return generator.blocks[index][-1].weight.shape[0]


def to_display(pattern: np.ndarray) -> np.ndarray:
    """(3, h, w) signed pattern -> (h, w, 3) in [0, 1] for imshow (min-max per basis function)."""
    hwc = np.moveaxis(pattern, 0, -1).astype(np.float32)
    if hwc.size == 0:
        return np.zeros((1, 1, 3), np.float32)
    lo, hi = float(hwc.min()), float(hwc.max())
    return np.full_like(hwc, 0.5) if hi - lo < 1e-12 else (hwc - lo) / (hi - lo)


def display_tile(pattern: np.ndarray | None, size: int):
    """A basis function (3, h, w) as a PIL image: ``to_display``, then enlarged (nearest) to ``size`` pixels
    on its longer side (None or an empty support gives a black tile)."""
    from PIL import Image

    shown = (to_display(pattern if pattern is not None else np.zeros((3, 0, 0))) * 255).round().astype(np.uint8)
    h, w = shown.shape[:2]
    scale = size / max(h, w, 1)
    return Image.fromarray(shown).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
