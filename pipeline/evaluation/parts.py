"""Ground-truth interpretability on the demo data (a measurement the paper could not make).

The demo grammar (``pipeline.data.demo``) records every part's type, typed slot and bounding box. For a
part-level layer (``conv8`` by default) we ask: does each unit (channel) fire on one kind of part?

Procedure: for ``num_images`` training images, infer Z by Langevin from the prior (``learner.reconstruct``,
as for MSE), run the generator, and take the layer's post-sparsity activation. A *firing* is one
(image, channel, position) with activation > 0. Its *label* is the ground-truth part whose bounding box
contains the centre of the unit's projective field (``basis.receptive_field_centre_px``; the smallest box
wins when boxes overlap), or ``none`` (background / object body). Two labelings: ``part_type`` (eye, wheel,
roof, ...) and ``slot`` (object/slot, e.g. face/left_eye — part type *and* typed position).

Metrics (counts of firings, not activation-weighted):

* ``parts_purity_<layer>``: cluster purity of channels w.r.t. part type over on-part firings,
  sum_c max_l n(c, l) / sum_c sum_l n(c, l); 1 = every channel fires on one part type only.
* ``parts_purity_chance_<layer>``: the purity a labeling-blind unit would get (largest label share).
* ``parts_slot_purity_<layer>``: the same with slots.
* ``parts_mi_bits_<layer>``: mutual information I(channel; part type incl. ``none``) over all firings, in bits;
  ``parts_nmi_<layer>`` = I / H(part type), in [0, 1].
* ``parts_on_part_fraction_<layer>``: share of firings whose centre lies on a part.
* ``parts_firings_per_image_<layer>``, ``parts_units_<layer>`` (channels that fired at least once).

A dense model fires almost everywhere, so its purity sits near chance; the comparison of sparse vs dense is
two runs, as for Table 4.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.evaluation.basis import layer_side, receptive_field_centre_px

NONE_LABEL = "none"


def cell_labels(parts: list[dict], layer: str, resolution: int, image_size: int) -> tuple[list[str], list[str]]:
    """(part_type labels, slot labels) of every cell of the layer's grid (row-major), for one image."""
    side = layer_side(layer)
    scale = resolution / image_size  # ground-truth boxes are in the stored image's pixels
    types, slots = [], []
    for y in range(side):
        for x in range(side):
            cy, cx = receptive_field_centre_px(layer, y, x, resolution)
            best, best_area = None, math.inf
            for part in parts:
                x0, y0, x1, y1 = (v * scale for v in part["bbox"])
                if x0 <= cx < x1 and y0 <= cy < y1:
                    area = (x1 - x0) * (y1 - y0)
                    if area < best_area:
                        best, best_area = part, area
            types.append(best["part_type"] if best else NONE_LABEL)
            slots.append(f"{best['object_type']}/{best['slot']}" if best else NONE_LABEL)
    return types, slots


def _purity(counts: np.ndarray) -> float:
    total = counts.sum()
    return float(counts.max(axis=1).sum() / total) if total > 0 else float("nan")


def _mutual_information_bits(counts: np.ndarray) -> tuple[float, float]:
    """(I(C; L) in bits, H(L) in bits) from a joint count table (channels x labels)."""
    total = counts.sum()
    if total == 0:
        return float("nan"), float("nan")
    joint = counts / total
    pc = joint.sum(axis=1, keepdims=True)
    pl = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (pc @ pl)[nz])).sum())
    pl_nz = pl[pl > 0]
    return mi, float(-(pl_nz * np.log2(pl_nz)).sum())


def firing_counts(activations: torch.Tensor, labels_per_image: list[list[str]], vocabulary: list[str]) -> np.ndarray:
    """(C, len(vocabulary)) counts of firings (activation > 0) per channel and label."""
    fired = (activations.detach() > 0).flatten(2).cpu().numpy()  # (B, C, S*S)
    index = {label: i for i, label in enumerate(vocabulary)}
    counts = np.zeros((fired.shape[1], len(vocabulary)), np.int64)
    for b, labels in enumerate(labels_per_image):
        onehot = np.zeros((len(labels), len(vocabulary)), np.int64)
        onehot[np.arange(len(labels)), [index[label] for label in labels]] = 1
        counts += fired[b].astype(np.int64) @ onehot
    return counts


def summarise(counts_type: np.ndarray, type_vocab: list[str], counts_slot: np.ndarray, slot_vocab: list[str],
              layer: str, num_images: int) -> tuple[dict[str, float], dict]:
    """Metrics (see module docstring) and a per-channel table from the two count tables."""
    on_type = counts_type[:, [i for i, v in enumerate(type_vocab) if v != NONE_LABEL]]
    on_slot = counts_slot[:, [i for i, v in enumerate(slot_vocab) if v != NONE_LABEL]]
    total = counts_type.sum()
    label_totals = on_type.sum(axis=0)
    mi, h = _mutual_information_bits(counts_type)
    metrics = {
        f"parts_purity_{layer}": _purity(on_type),
        f"parts_purity_chance_{layer}": float(label_totals.max() / label_totals.sum()) if label_totals.sum() else float("nan"),
        f"parts_slot_purity_{layer}": _purity(on_slot),
        f"parts_mi_bits_{layer}": mi,
        f"parts_nmi_{layer}": mi / h if h and h > 0 else float("nan"),
        f"parts_on_part_fraction_{layer}": float(on_type.sum() / total) if total else float("nan"),
        f"parts_firings_per_image_{layer}": float(total / max(num_images, 1)),
        f"parts_units_{layer}": float((counts_type.sum(axis=1) > 0).sum()),
    }
    on_labels = [v for v in type_vocab if v != NONE_LABEL]
    units = []
    for c in range(counts_type.shape[0]):
        n_on = int(on_type[c].sum())
        if counts_type[c].sum() == 0:
            continue
        units.append({
            "channel": c,
            "firings": int(counts_type[c].sum()),
            "on_part_firings": n_on,
            "dominant_part_type": on_labels[int(on_type[c].argmax())] if n_on else None,
            "purity": float(on_type[c].max() / n_on) if n_on else None,
            "counts": {label: int(n) for label, n in zip(type_vocab, counts_type[c]) if n},
        })
    return metrics, {"layer": layer, "labels": type_vocab, "slots": slot_vocab, "units": units}


def part_interpretability(generator, cfg, data_url: str, *, layer: str = "conv8", num_images: int = 200,
                          seed: int = 0, progress: bool = False) -> tuple[dict[str, float], dict]:
    """(metrics, per-unit details) of ``layer`` on the first ``num_images`` training images of demo data."""
    from tqdm import tqdm

    from pipeline.data import DataError, iter_ground_truth, make_loader, open_dataset
    from pipeline.learning.learner import reconstruct

    info = open_dataset(data_url)
    if not info.has_ground_truth:
        raise DataError(f"{data_url} has no part ground truth (only `sparsegen make-demo-data` datasets do)")
    resolution = cfg.model.resolution
    truth = dict(iter_ground_truth(info, "train"))
    loader = make_loader(info, split="train", batch_size=cfg.training.batch_size, shuffle=False, image_size=resolution)
    type_labels, slot_labels, layer_acts, seen = [], [], [], 0
    with tqdm(total=min(num_images, loader.num_samples), desc=f"parts ({layer})", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch_number, (indices, images) in enumerate(loader):
            if seen >= num_images:
                break
            indices, images = indices[: num_images - seen], images[: num_images - seen]
            z, _ = reconstruct(generator, images, cfg, seed=seed + batch_number)
            with torch.no_grad():
                _, activations = generator(z, return_activations=True)
            layer_acts.append(activations[layer].cpu())
            for index in indices.tolist():
                parts = [p for obj in truth[index]["objects"] for p in obj["parts"]]
                types, slots = cell_labels(parts, layer, resolution, info.image_size)
                type_labels.append(types)
                slot_labels.append(slots)
            seen += len(indices)
            bar.update(len(indices))
    acts = torch.cat(layer_acts)
    type_vocab = sorted({label for labels in type_labels for label in labels} | {NONE_LABEL})
    slot_vocab = sorted({label for labels in slot_labels for label in labels} | {NONE_LABEL})
    counts_type = firing_counts(acts, type_labels, type_vocab)
    counts_slot = firing_counts(acts, slot_labels, slot_vocab)
    metrics, details = summarise(counts_type, type_vocab, counts_slot, slot_vocab, layer, seen)
    details["num_images"] = seen
    return metrics, details
