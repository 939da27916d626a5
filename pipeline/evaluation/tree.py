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
enlarged with the part layer's grid and the roots' cells numbered, every basis function a TILE_PX = 60 px
tile, children joined to parents by lines; pages of at most 2,000 x 2,000 px, laid out by ``tree_layout``:
root subtrees side by side in bands, bands stacked, further roots on ``<prefix>_p2.png``, ...), and the OR view
(``or_alternatives`` / ``render_or_alternatives``): which units fire at the roots' positions over many prior
Z's, how often, each one's basis function and the g(Z) where it fires most strongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.basis import (
    Unit,
    active_units,
    basis_functions,
    display_tile,
    forward_with_masks,
    layer_side,
    propagate_between,
    receptive_field_centre_px,
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


# ----------------------------------------------------------------------------------------------------------
# Pictures. Every size below is in pixels of the final PNG, so a page's size follows from its tile count alone
# (``tree_layout``). Each basis function is a TILE_PX square (issue 14: >= 48 px); a page is at most
# PAGE_WIDTH_PX wide and PAGE_HEIGHT_PX high.
TILE_PX = 60
COLUMN_PX = 76  # pitch of the leaves: a tile and room for its label
LABEL_PX = 30  # two text lines under a tile
LINK_PX = 28  # vertical room for the parent -> child lines
BAND_GAP_PX = 22
SUBTREE_GAP_PX = 24
MARGIN_PX = 12
TITLE_PX = 34
IMAGE_PX = 256  # g(Z), enlarged (nearest)
PLAIN_IMAGE_PX = 128  # and once more without marks
LAYER_NAME_PX = 92
LEGEND_LINE_PX = 15
FONT_PX = 12
PAGE_WIDTH_PX = 2000
PAGE_HEIGHT_PX = 2000
ROW_PX = TILE_PX + LABEL_PX + LINK_PX
# Fig. 1's names of its three layers (parts at the 8x8 layer, then subparts, then primitives).
FIG1_ROLES = {"conv8": "parts", "conv16": "subparts", "conv32": "primitives"}
# One colour per root (its cell on g(Z), its tile frame and its lines), cycled.
ROOT_COLOURS = [(228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0), (166, 86, 40),
                (247, 129, 191), (0, 160, 160), (120, 120, 0), (80, 80, 80)]


def _font(size: int = FONT_PX):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _paste_tile(canvas, draw, pattern, x: int, y: int, frame, frame_width: int = 1, size: int = TILE_PX) -> None:
    """The tile centred in the ``size`` square at (x, y), a frame around the square."""
    tile = display_tile(pattern, size)
    draw.rectangle([x - frame_width, y - frame_width, x + size - 1 + frame_width, y + size - 1 + frame_width],
                   outline=frame, width=frame_width, fill=(235, 235, 235))
    canvas.paste(tile, (x + (size - tile.width) // 2, y + (size - tile.height) // 2))


def _image_with_grid(image_chw: np.ndarray, side: int, marks: list[tuple[int, int, str, tuple]], size: int = IMAGE_PX,
                     *, grid: bool = True, font_px: int = FONT_PX):
    """g(Z) enlarged (nearest) to ``size`` px with the ``side`` x ``side`` grid of the part layer and the cells of
    ``marks`` = [(y, x, label, colour)] boxed and labelled."""
    from PIL import Image, ImageDraw

    pixels = ((np.clip(np.moveaxis(image_chw, 0, -1), -1, 1) + 1) * 127.5).round().astype(np.uint8)
    picture = Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(picture, "RGBA")
    cell = size / side
    if grid:
        for i in range(1, side):
            draw.line([(round(i * cell), 0), (round(i * cell), size)], fill=(255, 255, 255, 150), width=1)
            draw.line([(0, round(i * cell)), (size, round(i * cell))], fill=(255, 255, 255, 150), width=1)
    width = 2 if cell >= 12 else 1
    for y, x, label, colour in marks:
        box = [round(x * cell), round(y * cell), round((x + 1) * cell) - 1, round((y + 1) * cell) - 1]
        draw.rectangle(box, outline=(*colour, 255), width=width)
        if label:
            font = _font(font_px)
            left, top, right, bottom = draw.textbbox((box[0] + width + 1, box[1] + width), label, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(*colour, 190))
            draw.text((box[0] + width + 1, box[1] + width), label, fill=(255, 255, 255), font=font)
    return picture


def _subtree_leaves(n: dict, cap: int | None = None) -> int:
    """Leaves of n's subtree when at most ``cap`` children (the strongest) are drawn per node."""
    kids = n["children"][:cap]
    return 1 if not kids else sum(_subtree_leaves(c, cap) for c in kids)


@dataclass
class TreePage:
    """One PNG of the tree: its size, its roots (indices into document["nodes"]) and where everything goes."""

    width_px: int
    height_px: int
    roots: list[int]
    band_tops: list[int]
    # node id -> (x, y) of the top-left corner of its TILE_PX square
    tiles: dict[int, tuple[int, int]] = field(default_factory=dict)
    # node id -> ids of the children drawn (the strongest ``children_cap``)
    links: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class TreeLayout:
    tile_px: int
    image_px: int
    tree_x_px: int  # where the tree starts, right of g(Z) and the layer names
    children_cap: int | None  # children drawn per node when fewer than the document has (None: all)
    pages: list[TreePage]


def tree_layout(document: dict, *, page_width_px: int = PAGE_WIDTH_PX,
                page_height_px: int = PAGE_HEIGHT_PX) -> TreeLayout:
    """Where ``render_tree`` puts every tile, in pixels; deterministic in the document's shape.

    The roots' subtrees are packed left to right into *bands* (one row per layer each) as long as they fit
    ``page_width_px``; bands stack below each other up to ``page_height_px``; further roots go on further pages.
    A subtree wider than a page alone is drawn with only the strongest children per node (``children_cap``).
    """
    roots, layers = document["nodes"], document["layers"]
    tree_x = MARGIN_PX + IMAGE_PX + MARGIN_PX + LAYER_NAME_PX
    band_width = page_width_px - tree_x - MARGIN_PX
    capacity = band_width // COLUMN_PX
    if capacity < 1:
        raise ValueError(f"page_width_px={page_width_px} leaves no room for one {TILE_PX} px tile")
    full = max([len(n["children"]) for n in _walk(roots)] + [0])
    cap = full
    while cap > 1 and any(_subtree_leaves(r, cap) > capacity for r in roots):
        cap -= 1
    band_px = (len(layers) - 1) * ROW_PX + TILE_PX + LABEL_PX + BAND_GAP_PX
    left_px = IMAGE_PX + PLAIN_IMAGE_PX + 14 + 11 * LEGEND_LINE_PX
    bands_per_page = max(1, (page_height_px - TITLE_PX - MARGIN_PX) // band_px)

    bands: list[list[int]] = []
    used = band_width + 1
    for index, r in enumerate(roots):
        need = _subtree_leaves(r, cap) * COLUMN_PX
        if used + SUBTREE_GAP_PX + need > band_width:
            bands.append([])
            used = -SUBTREE_GAP_PX
        bands[-1].append(index)
        used += SUBTREE_GAP_PX + need
    bands = bands or [[]]

    pages = []
    for start in range(0, len(bands), bands_per_page):
        page_bands = bands[start : start + bands_per_page]
        page = TreePage(0, 0, [i for band in page_bands for i in band], [])
        right = tree_x + 4 * COLUMN_PX  # at least room for the title
        for b, band in enumerate(page_bands):
            top = TITLE_PX + b * band_px
            page.band_tops.append(top)
            cursor = [tree_x + (COLUMN_PX - TILE_PX) // 2]

            def place(n: dict) -> float:
                """Leaves one column each, a parent centred over its children; returns the tile's centre x."""
                kids = n["children"][:cap]
                if not kids:
                    centre = cursor[0] + TILE_PX / 2
                    cursor[0] += COLUMN_PX
                else:
                    centre = float(np.mean([place(c) for c in kids]))
                page.tiles[n["id"]] = (int(round(centre - TILE_PX / 2)), top + n["depth"] * ROW_PX)
                page.links[n["id"]] = [c["id"] for c in kids]
                return centre

            for i in band:
                place(roots[i])
                cursor[0] += SUBTREE_GAP_PX
            right = max([right] + [x + TILE_PX + (COLUMN_PX - TILE_PX) // 2 for x, _ in page.tiles.values()])
        page.width_px = int(min(page_width_px, right + MARGIN_PX))
        page.height_px = int(TITLE_PX + max(left_px, len(page_bands) * band_px) + MARGIN_PX)
        pages.append(page)
    return TreeLayout(TILE_PX, IMAGE_PX, tree_x, cap if cap < full else None, pages)


def _page_path(path: Path, index: int) -> Path:
    return path if index == 0 else path.with_name(f"{path.stem}_p{index + 1}{path.suffix}")


def render_tree(document: dict, arrays: dict[str, np.ndarray], path: str | Path, *, title: str | None = None,
                page_width_px: int = PAGE_WIDTH_PX, page_height_px: int = PAGE_HEIGHT_PX) -> list[Path]:
    """PNG page(s) in the style of Fig. 1; returns their paths (``path``, then ``<stem>_p2.png``, ...).

    Left: g(Z) enlarged with the first layer's grid (8 x 8 for conv8), each root's cell boxed in its colour
    and numbered #1, #2, ... Right: the roots' trees, one row per layer (parts -> subparts -> primitives);
    each node is its basis function as a TILE_PX tile with "c<channel> (y,x)" and its support size in image
    pixels under it; lines join each unit to its children (AND: the children compose the parent). Layout:
    ``tree_layout`` (at most ``page_width_px`` x ``page_height_px`` a page).
    """
    from PIL import Image, ImageDraw

    roots, layers = document["nodes"], document["layers"]
    side = document["layer_sides"][0]
    layout = tree_layout(document, page_width_px=page_width_px, page_height_px=page_height_px)
    font, small = _font(FONT_PX), _font(FONT_PX - 1)
    colour_of = {}
    for i, r in enumerate(roots):
        for n in _walk([r]):
            colour_of[n["id"]] = (i + 1, ROOT_COLOURS[i % len(ROOT_COLOURS)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for page_index, page in enumerate(layout.pages):
        canvas = Image.new("RGB", (page.width_px, page.height_px), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        numbers = [i + 1 for i in page.roots]
        span = f"roots #{numbers[0]}-#{numbers[-1]} of {len(roots)}" if numbers else "no active roots"
        heading = title or (f"AND-OR tree of one Z ({' -> '.join(layers)}), page {page_index + 1}/{len(layout.pages)}, "
                            f"{span}")
        if layout.children_cap is not None:
            heading += f"; the strongest {layout.children_cap} children per node drawn (the JSON has all)"
        draw.text((MARGIN_PX, 9), heading, fill=(0, 0, 0), font=_font(FONT_PX + 2))

        marks = [(roots[i]["position"][0], roots[i]["position"][1], f"#{i + 1}", ROOT_COLOURS[i % len(ROOT_COLOURS)])
                 for i in page.roots]
        canvas.paste(_image_with_grid(arrays["image"], side, marks, font_px=FONT_PX - 2), (MARGIN_PX, TITLE_PX))
        plain = _image_with_grid(arrays["image"], side, [], PLAIN_IMAGE_PX, grid=False)
        canvas.paste(plain, (MARGIN_PX, TITLE_PX + IMAGE_PX + 6))
        draw.text((MARGIN_PX + PLAIN_IMAGE_PX + 8, TITLE_PX + IMAGE_PX + 6), "g(Z)\nunmarked", fill=(60, 60, 60),
                  font=small)
        legend = [f"Top: g(Z), {arrays['image'].shape[-1]} px, with the",
                  f"{side}x{side} grid of {layers[0]} (AND node);",
                  "each cell is an OR node; boxed:", "the roots drawn on this page.", "",
                  "Tiles: basis functions (one unit", "alone -> image, masks fixed),", "min-max scaled, enlarged;",
                  "under each: c<channel> (y,x) and", "its support in image px.",
                  "Lines: parent -> children (AND)."]
        for i, line in enumerate(legend):
            draw.text((MARGIN_PX, TITLE_PX + IMAGE_PX + PLAIN_IMAGE_PX + 14 + i * LEGEND_LINE_PX), line,
                      fill=(60, 60, 60), font=small)
        for top in page.band_tops:
            if top > TITLE_PX:
                draw.line([(layout.tree_x_px - LAYER_NAME_PX, top - BAND_GAP_PX // 2),
                           (page.width_px - MARGIN_PX, top - BAND_GAP_PX // 2)], fill=(215, 215, 215), width=1)
            for depth, layer in enumerate(layers):
                y = top + depth * ROW_PX + TILE_PX // 2 - 12
                x = layout.tree_x_px - LAYER_NAME_PX + 6
                draw.text((x, y), layer, fill=(0, 0, 0), font=_font(FONT_PX + 1))
                if layer in FIG1_ROLES:
                    draw.text((x, y + 16), FIG1_ROLES[layer], fill=(90, 90, 90), font=small)

        nodes = {n["id"]: n for n in _walk(roots)}
        for node_id, child_ids in page.links.items():  # lines first, tiles over them
            x, y = page.tiles[node_id]
            for child_id in child_ids:
                cx, cy = page.tiles[child_id]
                draw.line([(x + TILE_PX // 2, y + TILE_PX + LABEL_PX - 2), (cx + TILE_PX // 2, cy - 3)],
                          fill=colour_of[node_id][1], width=1)
        for node_id, (x, y) in page.tiles.items():
            n = nodes[node_id]
            number, colour = colour_of[node_id]
            root = n["depth"] == 0
            _paste_tile(canvas, draw, arrays.get(n.get("basis_key", "")), x, y, colour if root else (170, 170, 170),
                        3 if root else 1)
            label = f"{'#' + str(number) + ' ' if root else ''}c{n['channel']} ({n['position'][0]},{n['position'][1]})"
            y0, y1, x0, x1 = n.get("basis_box", (0, 0, 0, 0))
            for line_index, text in enumerate([label, f"{y1 - y0}x{x1 - x0} px"]):
                width = draw.textlength(text, font=small)
                draw.text((round(x + TILE_PX / 2 - width / 2), y + TILE_PX + 3 + line_index * 13), text,
                          fill=(0, 0, 0) if line_index == 0 else (100, 100, 100), font=small)
        page_path = _page_path(path, page_index)
        canvas.save(page_path, optimize=True)
        written.append(page_path)
    return written


@torch.no_grad()
def or_alternatives(generator, layer: str, positions: list[tuple[int, int]], *, num_latents: int = 64, top: int = 6,
                    seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """The OR nodes at grid positions of ``layer``: over ``num_latents`` prior Z's (N(0, I), ``seed``), which
    channels fire there (activation > 0 after ReLU and top-k), in what fraction of the Z's, and each one's basis
    function from the Z where it fires most strongly.

    Returns (JSON-able document, arrays): the document has one entry per position with ``alternatives``, the
    ``top`` most frequent channels (ties: stronger peak activation, then lower channel), each with
    ``frequency`` in (0, 1], ``count``, ``strongest_sample`` (index into the Z's), its ``activation`` there and
    ``basis_key``; arrays hold the basis functions by key and ``image_s<sample>``, g(Z) of each strongest
    sample.
    """
    side = layer_side(layer)
    for y, x in positions:
        if not (0 <= y < side and 0 <= x < side):
            raise ValueError(f"position {(y, x)} outside the {side}x{side} grid of {layer}")
    device = next(generator.parameters()).device
    z = torch.randn(num_latents, generator.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    images, activations, masks = forward_with_masks(generator, z)
    act = activations[layer].float().cpu()
    entries, wanted = [], []
    for y, x in positions:
        at = act[:, :, y, x]  # (num_latents, channels)
        fires = at > 0
        counts = fires.sum(0).tolist()
        peaks = at.max(0).values.tolist()
        seen = [c for c in range(at.shape[1]) if counts[c] > 0]
        order = sorted(seen, key=lambda c: (-counts[c], -peaks[c], c))[:top]
        alternatives = []
        for c in order:
            sample = int(at[:, c].argmax())
            unit = Unit(sample=sample, layer=layer, channel=c, y=y, x=x, activation=float(at[sample, c]))
            wanted.append(unit)
            alternatives.append({"channel": c, "frequency": counts[c] / num_latents, "count": counts[c],
                                 "strongest_sample": sample, "activation": unit.activation,
                                 "mean_activation_when_firing": float(at[fires[:, c], c].mean()),
                                 "basis_key": unit.key()})
        entries.append({"position": [y, x],
                        "receptive_field_centre_px": list(receptive_field_centre_px(layer, y, x, images.shape[-1])),
                        "fires_fraction": float(fires.any(1).float().mean()),
                        "distinct_channels": len(seen),
                        "active_channels_mean": float(fires.sum(1).float().mean()),
                        "alternatives": alternatives})
    arrays: dict[str, np.ndarray] = {}
    boxes: dict[str, list[int]] = {}
    for b in basis_functions(generator, masks, wanted):
        arrays[b.unit.key()] = b.image
        arrays[f"image_s{b.unit.sample}"] = images[b.unit.sample].float().cpu().numpy()
        boxes[b.unit.key()] = list(b.box)
    for entry in entries:
        for alt in entry["alternatives"]:
            alt["basis_box"] = boxes[alt["basis_key"]]
    document = {
        "kind": "sparsegen.or_alternatives",
        "version": 1,
        "layer": layer,
        "layer_side": side,
        "resolution_px": int(images.shape[-1]),
        "num_latents": num_latents,
        "seed": seed,
        "top": top,
        "definition": (
            "per grid position of the layer, over num_latents prior Z ~ N(0, I) (torch seed): the channels whose "
            "activation there is > 0 after ReLU and top-k (the OR node's alternatives) in at least one Z; "
            "frequency = fraction of the Z's in which it fires; the basis function is drawn from the Z where its "
            "activation there is largest (strongest_sample); fires_fraction = fraction of Z's with any channel "
            "active there; the top most frequent alternatives are listed."
        ),
        "positions": entries,
    }
    return document, arrays


OR_HEAD_PX = 150  # the position's column
OR_ROW_PX = TILE_PX + 4 + TILE_PX + LABEL_PX + 18


def or_layout(document: dict, *, page_width_px: int = PAGE_WIDTH_PX,
              page_height_px: int = PAGE_HEIGHT_PX) -> tuple[int, list[tuple[int, int, list[int]]]]:
    """(alternatives drawn per row, [(width_px, height_px, position indices)] per page) of the OR view."""
    rows = document["positions"]
    most = max([len(r["alternatives"]) for r in rows] + [1])
    shown = max(1, min(most, (page_width_px - 2 * MARGIN_PX - OR_HEAD_PX) // COLUMN_PX))
    width = 2 * MARGIN_PX + OR_HEAD_PX + max(shown, 4) * COLUMN_PX
    per_page = max(1, (page_height_px - TITLE_PX - 18 - MARGIN_PX) // OR_ROW_PX)
    indices = list(range(len(rows))) or [None]
    pages = []
    for start in range(0, len(indices), per_page):
        chunk = [i for i in indices[start : start + per_page] if i is not None]
        pages.append((width, TITLE_PX + 18 + OR_ROW_PX * max(len(chunk), 1) + MARGIN_PX, chunk))
    return shown, pages


def render_or_alternatives(document: dict, arrays: dict[str, np.ndarray], path: str | Path, *,
                           page_width_px: int = PAGE_WIDTH_PX, page_height_px: int = PAGE_HEIGHT_PX) -> list[Path]:
    """The OR view, one row per position: on the left "(y,x)" and how often anything fires there; then each
    alternative's basis function as a TILE_PX tile, under it the g(Z) (TILE_PX) where it fires most strongly with
    the cell boxed, and "c<channel> <frequency>", "<count>/<N> Z". Pages like ``render_tree``; returns paths."""
    from PIL import Image, ImageDraw

    rows = document["positions"]
    shown, pages = or_layout(document, page_width_px=page_width_px, page_height_px=page_height_px)
    side, n = document["layer_side"], document["num_latents"]
    font, small = _font(FONT_PX), _font(FONT_PX - 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for page_index, (width_px, height_px, chunk) in enumerate(pages):
        canvas = Image.new("RGB", (width_px, height_px), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        draw.text((MARGIN_PX, 8), f"OR alternatives of {document['layer']} over {n} prior Z's"
                  + (f", page {page_index + 1}/{len(pages)}" if len(pages) > 1 else ""),
                  fill=(0, 0, 0), font=_font(FONT_PX + 2))
        draw.text((MARGIN_PX, 26), "which units fire at each position, how often; top: basis function, below: the "
                  "g(Z) where it fires most strongly", fill=(80, 80, 80), font=small)
        for row_index, i in enumerate(chunk):
            row = rows[i]
            y0 = TITLE_PX + 18 + row_index * OR_ROW_PX
            if row_index:
                draw.line([(MARGIN_PX, y0 - 9), (width_px - MARGIN_PX, y0 - 9)], fill=(215, 215, 215), width=1)
            (py, px) = row["position"]
            tag = row.get("label")
            head = [f"position ({py},{px})" + (f"  {tag}" if tag else ""),
                    f"anything fires: {row['fires_fraction']:.0%} of Z",
                    f"channels seen: {row['distinct_channels']}",
                    f"active per Z: {row['active_channels_mean']:.1f}",
                    f"shown: top {min(shown, len(row['alternatives']))}"]
            for k, text in enumerate(head):
                draw.text((MARGIN_PX, y0 + 4 + k * LEGEND_LINE_PX), text, fill=(0, 0, 0) if k == 0 else (80, 80, 80),
                          font=font if k == 0 else small)
            for j, alt in enumerate(row["alternatives"][:shown]):
                x0 = MARGIN_PX + OR_HEAD_PX + j * COLUMN_PX + (COLUMN_PX - TILE_PX) // 2
                _paste_tile(canvas, draw, arrays.get(alt["basis_key"]), x0, y0, (170, 170, 170))
                image = arrays.get(f"image_s{alt['strongest_sample']}")
                if image is not None:
                    thumb = _image_with_grid(image, side, [(py, px, "", (255, 0, 0))], TILE_PX, grid=False)
                    canvas.paste(thumb, (x0, y0 + TILE_PX + 4))
                texts = [f"c{alt['channel']}  {alt['frequency']:.0%}", f"{alt['count']}/{n} Z"]
                for k, text in enumerate(texts):
                    tw = draw.textlength(text, font=small)
                    draw.text((round(x0 + TILE_PX / 2 - tw / 2), y0 + 2 * TILE_PX + 7 + k * 13), text,
                              fill=(0, 0, 0) if k == 0 else (100, 100, 100), font=small)
        page_path = _page_path(path, page_index)
        canvas.save(page_path, optimize=True)
        written.append(page_path)
    return written


def write_tree(generator, z: torch.Tensor, out_dir: str | Path, *, layers: list[str] | None = None, roots: int = 6,
               children: int = 3, prefix: str = "and_or_tree", or_latents: int = 64,
               or_top: int = 6) -> tuple[dict[str, Path], dict]:
    """Build the tree of ``z``; write into out_dir ``<prefix>.json``, ``<prefix>.npz``, ``<prefix>.png`` (further
    pages ``<prefix>_p2.png``, ... when the roots do not fit one 2000 x 2000 px page) and the OR view of the roots'
    positions over ``or_latents`` prior Z's: ``<prefix>_or.json``, ``<prefix>_or.npz``, ``<prefix>_or.png``
    (+ ``_or_p2.png``...). Returns (artifact name -> path, the tree document); names: tree_json, tree_npz,
    tree_png, tree_png_p2..., tree_or_json, tree_or_npz, tree_or_png, tree_or_png_p2... (OR ones only when the
    tree has roots)."""
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
        or_document, or_arrays = or_alternatives(generator, document["layers"][0], positions, num_latents=or_latents,
                                                 top=or_top)
        for entry in or_document["positions"]:
            numbers = [i + 1 for i, r in enumerate(document["nodes"]) if r["position"] == entry["position"]]
            entry["roots"] = numbers
            entry["label"] = "root " + ", ".join(f"#{k}" for k in numbers)
        or_json = out / f"{prefix}_or.json"
        or_json.write_text(json.dumps(or_document, indent=1))
        or_npz = out / f"{prefix}_or.npz"
        np.savez_compressed(or_npz, **or_arrays)
        or_pages = render_or_alternatives(or_document, or_arrays, out / f"{prefix}_or.png")
        written.update({"tree_or_json": or_json, "tree_or_npz": or_npz, "tree_or_png": or_pages[0]})
        written.update({f"tree_or_png_p{i + 2}": page for i, page in enumerate(or_pages[1:])})
    return written, document
