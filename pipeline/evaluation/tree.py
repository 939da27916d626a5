"""The AND-OR tree of one Z (Fig. 1): activated units per layer, their basis functions and connections.

Nodes are units (one channel at one grid position) of consecutive sparsified layers, by default
``conv8 -> conv16 -> conv32`` (Fig. 1's layers 3 -> 2 -> 1 for 64x64 images). Definitions:

* **roots**: the ``roots`` most strongly activated units of the first layer (activation > 0 after ReLU and
  top-k), strongest first;
* **children of a unit u of layer l**: with the forward pass's ReLU/top-k masks fixed and biases off, u's
  activation alone is propagated one layer down (``basis.propagate_between``); the result is u's exact
  additive contribution to every unit v of layer l+1 (v's value = sum of its parents' contributions + the
  bias path, under the fixed masks). Inactive units of layer l+1 get 0 (their mask is 0). The children are
  the ``children`` units with the largest positive contribution. A unit reached from two parents appears
  under both (it is an AND-OR *graph*; the tree view unrolls it);
* each node carries its activation, its contribution to its parent's choice of it, the centre of its
  projective field in image pixels and its basis function (``basis.py``).

Outputs: a JSON document (``tree_to_json``), an ``.npz`` with every node's basis function (keyed by the
node's ``basis_key``) and the generated image, and a PNG figure in the style of Fig. 1 (``render_tree``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.basis import (
    Unit,
    active_units,
    basis_functions,
    forward_with_masks,
    layer_side,
    propagate_between,
    receptive_field_centre_px,
    to_display,
)

DEFAULT_TREE_LAYERS = ("conv8", "conv16", "conv32")


def default_tree_layers(layer_names: list[str]) -> list[str]:
    """Fig. 1's three layers when the model has them, else the first three spatial layers it has."""
    if all(name in layer_names for name in DEFAULT_TREE_LAYERS):
        return list(DEFAULT_TREE_LAYERS)
    spatial = [n for n in layer_names if n != "fc4"]
    return spatial[:3]


@torch.no_grad()
def build_tree(generator, z: torch.Tensor, layers: list[str] | None = None, *, roots: int = 6, children: int = 3,
               resolution: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(tree document, arrays) for one latent ``z`` of shape (latent_dim,) or (1, latent_dim)."""
    names = list(generator.layer_names)
    layers = list(layers or default_tree_layers(names))
    positions = [names.index(layer) for layer in layers]
    if any(b - a != 1 for a, b in zip(positions, positions[1:])):
        raise ValueError(f"tree layers must be consecutive layers of {names}, got {layers}")
    z = z.reshape(1, -1).to(next(generator.parameters()).device)
    images, activations, masks = forward_with_masks(generator, z)
    resolution = resolution or images.shape[-1]

    def node(unit: Unit, depth: int, contribution: float | None) -> dict:
        cy, cx = receptive_field_centre_px(unit.layer, unit.y, unit.x, resolution)
        return {"layer": unit.layer, "depth": depth, "channel": unit.channel, "position": [unit.y, unit.x],
                "activation": unit.activation, "contribution": contribution,
                "receptive_field_centre_px": [cy, cx], "children": [], "_unit": unit}

    level = [node(u, 0, None) for u in active_units(activations, layers[0], top=roots, sample=0)]
    all_nodes = list(level)
    for depth in range(len(layers) - 1):
        if not level:
            break
        layer, below = layers[depth], layers[depth + 1]
        act = torch.zeros((len(level), *activations[layer].shape[1:]), device=z.device, dtype=activations[layer].dtype)
        for i, parent in enumerate(level):
            u = parent["_unit"]
            act[i, u.channel, u.y, u.x] = u.activation
        batch_masks = {k: v.expand(len(level), *v.shape[1:]) for k, v in masks.items()}
        contributions = propagate_between(generator, layer, act, batch_masks, below)
        below_act = activations[below][0]
        next_level = []
        for parent, contrib in zip(level, contributions):
            flat = contrib.flatten()
            count = min(children, int((flat > 0).sum()))
            if count == 0:
                continue
            best = flat.topk(count)
            _, h, w = contrib.shape
            for value, index in zip(best.values.tolist(), best.indices.tolist()):
                c, rest = divmod(index, h * w)
                y, x = divmod(rest, w)
                unit = Unit(sample=0, layer=below, channel=c, y=y, x=x, activation=float(below_act[c, y, x]))
                child = node(unit, depth + 1, float(value))
                parent["children"].append(child)
                next_level.append(child)
        all_nodes.extend(next_level)
        level = next_level

    # Basis functions, one batched propagation per layer; identical units share one array.
    arrays: dict[str, np.ndarray] = {"image": images[0].float().cpu().numpy()}
    for layer in layers:
        unique = {n["_unit"].key(): n["_unit"] for n in all_nodes if n["layer"] == layer}
        for basis in basis_functions(generator, masks, list(unique.values())):
            arrays[basis.unit.key()] = basis.image
            for n in all_nodes:
                if n["_unit"].key() == basis.unit.key():
                    n["basis_key"] = basis.unit.key()
                    n["basis_box"] = list(basis.box)
    for i, n in enumerate(all_nodes):
        n["id"] = i
        del n["_unit"]
    roots_out = [n for n in all_nodes if n["depth"] == 0]
    document = {
        "kind": "sparsegen.and_or_tree",
        "version": 1,
        "layers": layers,
        "layer_sides": [layer_side(layer) for layer in layers],
        "resolution_px": resolution,
        "latent": z[0].cpu().tolist(),
        "roots_requested": roots,
        "children_per_node": children,
        "num_nodes": len(all_nodes),
        "definition": (
            "roots: strongest active units of the first layer; children of u: active units of the next layer "
            "with the largest positive contribution of u alone, propagated one layer with the forward pass's "
            "ReLU/top-k masks fixed and biases off; basis functions: the unit alone propagated to the pre-tanh "
            "image under the same masks, cropped to its non-zero support (box = [y0, y1, x0, x1], pixels)."
        ),
        "nodes": roots_out,
    }
    return document, arrays


def tree_to_json(document: dict) -> str:
    return json.dumps(document, indent=1)


def _walk(nodes: list[dict]):
    for n in nodes:
        yield n
        yield from _walk(n["children"])


def render_tree(document: dict, arrays: dict[str, np.ndarray], path: str | Path, *, title: str | None = None) -> Path:
    """A PNG in the style of Fig. 1: the generated image with the roots' positions, and the tree of basis
    functions, one row per layer, lines from each unit to its children."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    roots = document["nodes"]
    layers = document["layers"]
    # Leaf-order layout: every leaf gets a column, a parent sits above the middle of its children.
    x_of: dict[int, float] = {}
    next_column = [0.0]

    def place(n: dict) -> float:
        if not n["children"]:
            x_of[n["id"]] = next_column[0]
            next_column[0] += 1.0
        else:
            xs = [place(c) for c in n["children"]]
            x_of[n["id"]] = float(np.mean(xs))
        return x_of[n["id"]]

    for r in roots:
        place(r)
        next_column[0] += 0.5  # a gap between root subtrees
    width_units = max(next_column[0], 1.0)
    fig = Figure(figsize=(min(3.0 + 0.55 * width_units, 40.0), 1.2 + 1.3 * len(layers)), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[2.2, max(width_units * 0.55, 1.0)], wspace=0.05)
    ax_img = fig.add_subplot(grid[0, 0])
    image = np.clip((np.moveaxis(arrays["image"], 0, -1) + 1.0) / 2.0, 0.0, 1.0)
    ax_img.imshow(image, interpolation="nearest")
    for r in roots:
        cy, cx = r["receptive_field_centre_px"]
        ax_img.plot(cx - 0.5, cy - 0.5, "o", ms=5, mfc="none", mec="red")
        ax_img.annotate(f"c{r['channel']}", (cx - 0.5, cy - 0.5), color="red", fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax_img.set_title("g(Z)", fontsize=8)
    ax_img.set_axis_off()

    ax = fig.add_subplot(grid[0, 1])
    half = 0.42
    for n in _walk(roots):
        x, y = x_of[n["id"]], -float(n["depth"])
        for c in n["children"]:
            ax.plot([x, x_of[c["id"]]], [y - half, -float(c["depth"]) + half], color="0.6", lw=0.6, zorder=1)
        pattern = arrays.get(n.get("basis_key", ""), np.zeros((3, 0, 0)))
        shown = to_display(pattern)
        h, w = shown.shape[:2]
        scale = half / max(h, w, 1)
        ax.imshow(shown, extent=(x - w * scale, x + w * scale, y - h * scale, y + h * scale), interpolation="nearest",
                  zorder=2)
        label = f"c{n['channel']} ({n['position'][0]},{n['position'][1]})"
        ax.text(x, y - half - 0.04, label, ha="center", va="top", fontsize=4.5, zorder=3)
    for depth, layer in enumerate(layers):
        ax.text(-0.9, -depth, layer, ha="right", va="center", fontsize=8, fontweight="bold")
    ax.set_xlim(-1.6, width_units)
    ax.set_ylim(-len(layers) + 0.35, 0.6)
    ax.set_aspect("equal")
    ax.set_axis_off()
    fig.suptitle(title or f"AND-OR tree ({' -> '.join(layers)}): AND = all children compose the parent, "
                 "OR = which unit fires at a position", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def write_tree(generator, z: torch.Tensor, out_dir: str | Path, *, layers: list[str] | None = None, roots: int = 6,
               children: int = 3, prefix: str = "and_or_tree") -> tuple[dict[str, Path], dict]:
    """Build the tree of ``z``, write ``<prefix>.json``, ``<prefix>.npz`` and ``<prefix>.png`` into out_dir;
    returns (artifact name -> path, the tree document)."""
    document, arrays = build_tree(generator, z, layers, roots=roots, children=children)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{prefix}.json"
    json_path.write_text(tree_to_json(document))
    npz_path = out / f"{prefix}.npz"
    np.savez_compressed(npz_path, **arrays)
    png_path = render_tree(document, arrays, out / f"{prefix}.png")
    return {"tree_json": json_path, "tree_npz": npz_path, "tree_png": png_path}, document
