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

Picture (``figure_path``, ``parts_<layer>.png``): what the most informative channels fire on. Channels are
ranked by their share of I(channel; part type) (``channel_information_bits``); each row shows one channel's
basis function at its strongest firing, then the training-image windows of its strongest firings (one per
image, ``FIGURE_WINDOW_CELLS`` cells of the layer's grid around the unit's projective-field centre), each
titled with the ground-truth label at that firing. A unit that carries a part shows the same part in its row.

A dense model fires almost everywhere, so its purity sits near chance; the comparison of sparse vs dense is
two runs, as for Table 4.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.evaluation.basis import layer_side, receptive_field_centre_px

NONE_LABEL = "none"
# Side of the image window shown per firing in the figure, in cells of the layer's grid (3 cells = 12 px for
# conv8 of a 32 px image): the unit's own cell and one around it, where its basis function lies.
FIGURE_WINDOW_CELLS = 3.0


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


def channel_information_bits(counts: np.ndarray) -> np.ndarray:
    """(C,) each channel's term of I(C; L) in bits, p(c) KL(p(l | c) || p(l)); they sum to I(C; L)."""
    total = counts.sum()
    if total == 0:
        return np.zeros(counts.shape[0])
    joint = counts / total
    pc = joint.sum(axis=1, keepdims=True)
    pl = joint.sum(axis=0, keepdims=True)
    ratio = np.divide(joint, pc @ pl, out=np.ones_like(joint), where=joint > 0)
    return (joint * np.log2(ratio)).sum(axis=1)


def _mutual_information_bits(counts: np.ndarray) -> tuple[float, float]:
    """(I(C; L) in bits, H(L) in bits) from a joint count table (channels x labels)."""
    total = counts.sum()
    if total == 0:
        return float("nan"), float("nan")
    pl = counts.sum(axis=0) / total
    pl_nz = pl[pl > 0]
    return float(channel_information_bits(counts).sum()), float(-(pl_nz * np.log2(pl_nz)).sum())


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


def strongest_firings(activations: torch.Tensor, channel: int, count: int) -> list[tuple[int, int, int, float]]:
    """(image, y, x, activation) of ``channel``'s ``count`` strongest firings, at most one per image."""
    per_image = activations[:, channel].flatten(1)  # (B, S*S)
    values, flat = per_image.max(dim=1)
    side = activations.shape[-1]
    order = [int(i) for i in values.argsort(descending=True) if float(values[i]) > 0][:count]
    return [(i, *divmod(int(flat[i]), side), float(values[i])) for i in order]


def write_part_units_png(path, generator, layer: str, images: torch.Tensor, latents: torch.Tensor,
                         activations: torch.Tensor, type_labels: list[list[str]], counts_type: np.ndarray,
                         type_vocab: list[str], *, rows: int = 8, per_row: int = 8):
    """The figure of the module docstring: ``rows`` channels, ``per_row`` firings each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.evaluation.basis import Unit, basis_functions, forward_with_masks, to_display
    from pipeline.evaluation.matching import field_box

    bits = channel_information_bits(counts_type)
    on = [i for i, v in enumerate(type_vocab) if v != NONE_LABEL]
    base_rate = counts_type[:, on].sum(axis=0) / max(counts_type[:, on].sum(), 1)
    channels = [int(c) for c in np.argsort(-bits) if counts_type[c].sum() > 0][:rows]
    resolution = images.shape[-1]
    side = activations.shape[-1]
    fig = Figure(figsize=((per_row + 1) * 0.9, max(len(channels), 1) * 1.15 + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    for row, channel in enumerate(channels):
        firings = strongest_firings(activations, channel, per_row)
        n_on = int(counts_type[channel, on].sum())
        if n_on:
            dominant = int(np.argmax(counts_type[channel, on]))
            share = counts_type[channel, on][dominant] / n_on
            what = (f"{type_vocab[on[dominant]]} {share:.0%} of {n_on} on-part firings "
                    f"(base rate {base_rate[dominant]:.0%})")
        else:
            what = "no on-part firings"
        ax = fig.add_subplot(len(channels), per_row + 1, row * (per_row + 1) + 1)
        ax.set_axis_off()
        if firings:
            image_index, y, x, value = firings[0]
            _, _, masks = forward_with_masks(generator, latents[image_index : image_index + 1])
            basis = basis_functions(generator, masks, [Unit(0, layer, channel, y, x, value)])[0]
            ax.imshow(to_display(basis.image), interpolation="nearest")
        ax.set_title(f"c{channel} basis", fontsize=6)
        ax.text(0.0, 1.6, f"channel {channel}: {bits[channel]:.3f} bits; {what}", transform=ax.transAxes,
                fontsize=7, va="bottom")
        for col, (image_index, y, x, _) in enumerate(firings):
            y0, y1, x0, x1 = field_box(layer, y, x, resolution, FIGURE_WINDOW_CELLS)
            window = images[image_index, :, y0:y1, x0:x1].float().cpu().numpy()
            ax = fig.add_subplot(len(channels), per_row + 1, row * (per_row + 1) + col + 2)
            ax.imshow(np.clip(np.moveaxis(window, 0, -1) * 0.5 + 0.5, 0, 1), interpolation="nearest")
            ax.set_title(type_labels[image_index][y * side + x], fontsize=6)
            ax.set_axis_off()
    fig.suptitle(f"{layer}: the channels most informative of the ground-truth part type, and the training-image "
                 f"windows where each fires most strongly", fontsize=8)
    fig.subplots_adjust(hspace=1.3)
    fig.savefig(path, bbox_inches="tight")
    return path


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
                          seed: int = 0, progress: bool = False, figure_path=None) -> tuple[dict[str, float], dict]:
    """(metrics, per-unit details) of ``layer`` on the first ``num_images`` training images of demo data;
    with ``figure_path`` also the picture of the module docstring."""
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
    kept_images, kept_latents = [], []
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
            if figure_path is not None:
                kept_images.append(images.cpu())
                kept_latents.append(z)
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
    if figure_path is not None:
        write_part_units_png(figure_path, generator, layer, torch.cat(kept_images), torch.cat(kept_latents), acts,
                             type_labels, counts_type, type_vocab)
    return metrics, details
