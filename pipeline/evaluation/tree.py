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
node's ``basis_key``) and the generated image, PNG page(s) in the style of Fig. 1 (``render_tree``: g(Z)
with the part layer's grid and the roots' cells, 56 px basis-function tiles, at most 2,000 px a page), and
the OR view (``or_alternatives``): which units fire at the roots' positions over many prior Z's.
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


# Picture layout, in pixels of the final PNG: every basis function is a TILE_PX tile, a page is at most
# PAGE_WIDTH_PX wide (roots that do not fit go on further pages).
TILE_PX = 56
GAP_PX = 10
LABEL_PX = 14
PAGE_WIDTH_PX = 2000
IMAGE_PX = 224


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _tile(pattern: np.ndarray | None, size: int = TILE_PX):
    """A basis function (3, h, w), min-max normalised, enlarged (nearest) to ``size`` on its longer side."""
    from PIL import Image

    shown = (to_display(pattern if pattern is not None else np.zeros((3, 0, 0))) * 255).round().astype(np.uint8)
    h, w = shown.shape[:2]
    scale = size / max(h, w, 1)
    return Image.fromarray(shown).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)


def _image_with_grid(image_chw: np.ndarray, side: int, marks: list[tuple[int, int, str]], size: int = IMAGE_PX):
    """g(Z) enlarged to ``size`` px with the ``side`` x ``side`` grid of the part layer and labelled cells."""
    from PIL import Image, ImageDraw

    pixels = ((np.clip(np.moveaxis(image_chw, 0, -1), -1, 1) + 1) * 127.5).round().astype(np.uint8)
    picture = Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(picture)
    cell = size / side
    for i in range(1, side):
        draw.line([(round(i * cell), 0), (round(i * cell), size)], fill=(255, 255, 255), width=1)
        draw.line([(0, round(i * cell)), (size, round(i * cell))], fill=(255, 255, 255), width=1)
    for y, x, label in marks:
        box = [round(x * cell), round(y * cell), round((x + 1) * cell) - 1, round((y + 1) * cell) - 1]
        draw.rectangle(box, outline=(255, 0, 0), width=2)
        draw.text((box[0] + 3, box[1] + 2), label, fill=(255, 0, 0), font=_font())
    return picture


def _subtree_leaves(n: dict) -> int:
    return 1 if not n["children"] else sum(_subtree_leaves(c) for c in n["children"])


def _paginate(roots: list[dict], width_px: int) -> list[list[dict]]:
    """Roots per page so that each page's leaves fit ``width_px``; a root wider than a page gets its own."""
    pages: list[list[dict]] = [[]]
    used = 0
    for r in roots:
        need = _subtree_leaves(r) * (TILE_PX + GAP_PX) + GAP_PX
        if pages[-1] and used + need > width_px:
            pages.append([])
            used = 0
        pages[-1].append(r)
        used += need
    return pages


def render_tree(document: dict, arrays: dict[str, np.ndarray], path: str | Path, *, title: str | None = None,
                page_width_px: int = PAGE_WIDTH_PX) -> list[Path]:
    """PNG page(s) in the style of Fig. 1; returns their paths (``path``, then ``<stem>_p2.png``, ...).

    Left: g(Z) enlarged with the first layer's grid and each root's cell boxed and numbered. Right: one row per
    layer, each node its basis function as a TILE_PX tile with "#root c<channel> (y,x)" under it, lines from
    each unit to its children (AND: the children compose the parent). Pages are at most ``page_width_px`` wide.
    """
    from PIL import Image, ImageDraw

    roots, layers = document["nodes"], document["layers"]
    side = document["layer_sides"][0]
    number = {r["id"]: i + 1 for i, r in enumerate(roots)}
    left_px = IMAGE_PX + 3 * GAP_PX + 60  # the image and the layer names
    pages = _paginate(roots, page_width_px - left_px) if roots else [[]]
    row_px = TILE_PX + LABEL_PX + 3 * GAP_PX
    height_px = max(IMAGE_PX + 40, 30 + row_px * len(layers))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for page_index, page in enumerate(pages):
        x_of: dict[int, float] = {}
        cursor = [float(left_px + GAP_PX)]

        def place(n: dict) -> float:
            if not n["children"]:
                x_of[n["id"]] = cursor[0] + TILE_PX / 2
                cursor[0] += TILE_PX + GAP_PX
            else:
                x_of[n["id"]] = float(np.mean([place(c) for c in n["children"]]))
            return x_of[n["id"]]

        for r in page:
            place(r)
            cursor[0] += GAP_PX
        width_px = int(min(max(cursor[0], left_px + 200), page_width_px))
        canvas = Image.new("RGB", (width_px, height_px), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        heading = title or (f"AND-OR tree ({' -> '.join(layers)}), page {page_index + 1}/{len(pages)}: "
                            "each node = one active unit's basis function; lines = its children (AND)")
        draw.text((GAP_PX, 6), heading, fill=(0, 0, 0), font=_font())
        marks = [(r["position"][0], r["position"][1], str(number[r["id"]])) for r in page]
        canvas.paste(_image_with_grid(arrays["image"], side, marks), (GAP_PX, 30))
        draw.text((GAP_PX, 34 + IMAGE_PX), f"g(Z), {side}x{side} grid of {layers[0]}", fill=(0, 0, 0), font=_font())
        top_of = lambda depth: 30 + depth * row_px  # noqa: E731
        for depth, layer in enumerate(layers):
            draw.text((IMAGE_PX + 2 * GAP_PX, top_of(depth) + TILE_PX // 2), layer, fill=(0, 0, 0), font=_font())
        for r in page:
            stack = [(r, number[r["id"]])]
            while stack:
                n, root_number = stack.pop()
                x, top = x_of[n["id"]], top_of(n["depth"])
                for c in n["children"]:
                    draw.line([(x, top + TILE_PX + LABEL_PX), (x_of[c["id"]], top_of(c["depth"]))],
                              fill=(150, 150, 150), width=1)
                    stack.append((c, root_number))
                tile = _tile(arrays.get(n.get("basis_key", "")))
                canvas.paste(tile, (round(x - tile.width / 2), top + (TILE_PX - tile.height) // 2))
                label = f"{'#' + str(root_number) + ' ' if n['depth'] == 0 else ''}c{n['channel']} ({n['position'][0]},{n['position'][1]})"
                draw.text((round(x - TILE_PX / 2), top + TILE_PX + 2), label, fill=(0, 0, 0), font=_font())
        page_path = path if page_index == 0 else path.with_name(f"{path.stem}_p{page_index + 1}{path.suffix}")
        canvas.save(page_path)
        written.append(page_path)
    return written


@torch.no_grad()
def or_alternatives(generator, layer: str, positions: list[tuple[int, int]], *, num_latents: int = 64, top: int = 6,
                    seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """The OR nodes at grid positions of ``layer``: over ``num_latents`` prior Z's, which channels fire there
    (activation > 0 after ReLU and top-k), how often, and each one's basis function from the Z where it fires
    most strongly. Returns (JSON-able document, arrays keyed by each alternative's ``basis_key``)."""
    device = next(generator.parameters()).device
    z = torch.randn(num_latents, generator.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    _, activations, masks = forward_with_masks(generator, z)
    act = activations[layer]
    entries, wanted = [], []
    for y, x in positions:
        at = act[:, :, y, x]  # (num_latents, channels)
        fires = at > 0
        counts = fires.sum(0)
        order = [int(c) for c in counts.argsort(descending=True)[:top] if counts[c] > 0]
        alternatives = []
        for c in order:
            sample = int(at[:, c].argmax())
            unit = Unit(sample=sample, layer=layer, channel=c, y=y, x=x, activation=float(at[sample, c]))
            wanted.append(unit)
            alternatives.append({"channel": c, "frequency": float(counts[c]) / num_latents,
                                 "strongest_sample": sample, "activation": unit.activation, "basis_key": unit.key()})
        entries.append({"position": [y, x], "active_channels_mean": float(fires.sum(1).float().mean()),
                        "alternatives": alternatives})
    arrays = {b.unit.key(): b.image for b in basis_functions(generator, masks, wanted)}
    document = {"kind": "sparsegen.or_alternatives", "layer": layer, "num_latents": num_latents, "seed": seed,
                "definition": "per grid position: channels active there over prior Z's (OR alternatives), their "
                              "frequency, and the basis function of the strongest firing instance",
                "positions": entries}
    return document, arrays


def render_or_alternatives(document: dict, arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """One row per position: "(y,x)" and its alternatives as TILE_PX tiles with "c<channel> <frequency>"."""
    from PIL import Image, ImageDraw

    rows = document["positions"]
    top = max([len(r["alternatives"]) for r in rows] + [1])
    label_px = 90
    width_px = min(PAGE_WIDTH_PX, label_px + top * (TILE_PX + GAP_PX) + GAP_PX)
    row_px = TILE_PX + LABEL_PX + GAP_PX
    canvas = Image.new("RGB", (width_px, 30 + row_px * max(len(rows), 1)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP_PX, 6), f"OR alternatives of {document['layer']} over {document['num_latents']} prior Z's: "
              "which units fire at each position, how often", fill=(0, 0, 0), font=_font())
    for i, row in enumerate(rows):
        y0 = 30 + i * row_px
        draw.text((GAP_PX, y0 + TILE_PX // 2), f"({row['position'][0]},{row['position'][1]})", fill=(0, 0, 0),
                  font=_font())
        for j, alt in enumerate(row["alternatives"]):
            x0 = label_px + j * (TILE_PX + GAP_PX)
            tile = _tile(arrays.get(alt["basis_key"]))
            canvas.paste(tile, (x0 + (TILE_PX - tile.width) // 2, y0 + (TILE_PX - tile.height) // 2))
            draw.text((x0, y0 + TILE_PX + 1), f"c{alt['channel']} {alt['frequency']:.2f}", fill=(0, 0, 0), font=_font())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_tree(generator, z: torch.Tensor, out_dir: str | Path, *, layers: list[str] | None = None, roots: int = 6,
               children: int = 3, prefix: str = "and_or_tree", or_latents: int = 64) -> tuple[dict[str, Path], dict]:
    """Build the tree of ``z``; write ``<prefix>.json``, ``<prefix>.npz``, ``<prefix>.png`` (+ ``_p2.png``...
    pages) and the OR view of the roots' positions ``<prefix>_or.png`` / ``_or.json`` into out_dir; returns
    (artifact name -> path, the tree document)."""
    document, arrays = build_tree(generator, z, layers, roots=roots, children=children)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{prefix}.json"
    json_path.write_text(tree_to_json(document))
    npz_path = out / f"{prefix}.npz"
    np.savez_compressed(npz_path, **arrays)
    pages = render_tree(document, arrays, out / f"{prefix}.png")
    written = {"tree_json": json_path, "tree_npz": npz_path, "tree_png": pages[0]}
    written.update({f"tree_png_p{i + 2}": page for i, page in enumerate(pages[1:])})
    positions = list(dict.fromkeys((n["position"][0], n["position"][1]) for n in document["nodes"]))
    if positions:
        or_document, or_arrays = or_alternatives(generator, document["layers"][0], positions, num_latents=or_latents)
        or_json = out / f"{prefix}_or.json"
        or_json.write_text(json.dumps(or_document, indent=1))
        written["tree_or_json"] = or_json
        written["tree_or_png"] = render_or_alternatives(or_document, or_arrays, out / f"{prefix}_or.png")
    return written, document
