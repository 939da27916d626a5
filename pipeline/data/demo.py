"""Built-in demo data: images from a known compositional AND-OR grammar, with per-part ground truth.

Grammar (AND = all children present, OR = one variant chosen)::

    scene    := background (OR over a small palette, colour jitter) AND one object
    object   := face | car | house                      (OR, uniform)
    face     := head AND eye(left_eye, right_eye) AND nose AND mouth
    car      := body AND windshield AND wheel(front_wheel, rear_wheel) AND light
    house    := wall AND roof AND door AND window(left_window, right_window)
    part     := one of its type's variants (OR), drawn from primitive strokes (lines, arcs, blobs, polygons)

``PART_VARIANTS`` lists the variants per part type (2-4 each). Paired slots (both eyes, both wheels, both
windows) share one variant choice, like a symmetric object would. Every object is jittered in position
(±``OBJECT_JITTER_FRACTION`` of the image) and scale, every part by ±1.5 px, colours by a few levels, so
parts sit at *typed* positions rather than fixed pixels. Shapes are drawn at 4× and box-downsampled, so
edges are antialiased.

Ground-truth JSON (``sample["ground_truth"]`` in the shard JSON and the manifest's ``ground_truth`` column;
all boxes are ``[x0, y0, x1, y1]`` in pixels of the stored image, x1/y1 exclusive, clipped to the image)::

    {
      "grammar": "sparsegen-demo-v1",
      "background_rgb": [r, g, b],
      "objects": [
        {
          "object_type": "face",            # face | car | house
          "bbox": [x0, y0, x1, y1],          # the whole object
          "parts": [
            {
              "object_type": "face",
              "part_type": "eye",            # a key of PART_VARIANTS
              "slot": "left_eye",            # the typed position within the object
              "variant": 1,                  # index into PART_VARIANTS[part_type]
              "variant_name": "ring",
              "bbox": [x0, y0, x1, y1]
            }, ...
          ]
        }
      ]
    }

Samples are a pure function of ``(seed, global_index, size)``, so datasets are reproducible and a sample
does not depend on how many others are generated.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

from pipeline.data.shards import DEFAULT_SHARD_SIZE_IMAGES, DatasetWriter

GRAMMAR_NAME = "sparsegen-demo-v1"
SUPERSAMPLING = 4
OBJECT_JITTER_FRACTION = 0.05
PART_JITTER_PX = 1.5
OBJECT_SIZE_FRACTION = 0.80
# Flat-colour scenes deflate ~12x even at level 1, and decode as fast as uncompressed PNGs (unlike photos,
# see pipeline.data.ingest.PNG_COMPRESS_LEVEL); higher levels only cost encode time.
DEMO_PNG_COMPRESS_LEVEL = 1

PART_VARIANTS: dict[str, tuple[str, ...]] = {
    "eye": ("dot", "ring", "slit"),
    "nose": ("line", "triangle", "button"),
    "mouth": ("smile", "frown", "flat", "open"),
    "windshield": ("single", "split", "rounded"),
    "wheel": ("solid", "tyre", "spoked"),
    "light": ("round", "bar"),
    "roof": ("gable", "flat", "hip"),
    "door": ("plain", "arched"),
    "window": ("filled", "paned", "round"),
}


@dataclass(frozen=True)
class Slot:
    name: str
    part_type: str
    center: tuple[float, float]  # in object-box units (0..1)


OBJECT_SLOTS: dict[str, tuple[Slot, ...]] = {
    "face": (
        Slot("left_eye", "eye", (0.36, 0.40)),
        Slot("right_eye", "eye", (0.64, 0.40)),
        Slot("nose", "nose", (0.50, 0.56)),
        Slot("mouth", "mouth", (0.50, 0.74)),
    ),
    "car": (
        Slot("windshield", "windshield", (0.51, 0.31)),
        Slot("front_wheel", "wheel", (0.25, 0.76)),
        Slot("rear_wheel", "wheel", (0.75, 0.76)),
        Slot("light", "light", (0.92, 0.53)),
    ),
    "house": (
        Slot("roof", "roof", (0.50, 0.30)),
        Slot("door", "door", (0.50, 0.84)),
        Slot("left_window", "window", (0.30, 0.62)),
        Slot("right_window", "window", (0.70, 0.62)),
    ),
}
OBJECT_TYPES = tuple(OBJECT_SLOTS)

_BACKGROUNDS = ((228, 228, 228), (205, 222, 240), (212, 236, 206), (244, 236, 200))
_BODY_COLOURS = {
    "face": ((236, 196, 160), (200, 150, 110), (150, 105, 75)),
    "car": ((200, 40, 40), (40, 80, 190), (40, 150, 70), (230, 180, 30)),
    "house": ((230, 210, 170), (180, 90, 60), (245, 245, 235)),
}
_ROOF_COLOURS = ((150, 40, 30), (110, 70, 40), (90, 90, 100))
_DARK = (30, 30, 35)
_GLASS = (170, 215, 240)


def grammar_spec() -> dict:
    """The grammar as plain data: ``{object_type: {slot: {"part_type", "variants"}}}`` (for evaluation)."""
    return {
        obj: {s.name: {"part_type": s.part_type, "variants": list(PART_VARIANTS[s.part_type])} for s in slots}
        for obj, slots in OBJECT_SLOTS.items()
    }


class _Canvas:
    """Draws primitives on the supersampled canvas and tracks each primitive's bounding box."""

    def __init__(self, size: int, background):
        from PIL import Image, ImageDraw

        self.scale = SUPERSAMPLING
        self.size = size
        self.image = Image.new("RGB", (size * SUPERSAMPLING,) * 2, tuple(background))
        self.draw = ImageDraw.Draw(self.image)
        self.box: list[float] | None = None

    def _track(self, x0, y0, x1, y1, pad=0.0) -> None:
        box = [min(x0, x1) - pad, min(y0, y1) - pad, max(x0, x1) + pad, max(y0, y1) + pad]
        if self.box is None:
            self.box = box
        else:
            self.box = [min(self.box[0], box[0]), min(self.box[1], box[1]), max(self.box[2], box[2]), max(self.box[3], box[3])]

    def take_box(self) -> list[int]:
        """The union box since the last call, in stored-image pixels (x1/y1 exclusive, clipped)."""
        x0, y0, x1, y1 = self.box
        self.box = None
        clip = lambda v: max(0, min(self.size, v))  # noqa: E731
        return [clip(math.floor(x0)), clip(math.floor(y0)), clip(math.ceil(x1)), clip(math.ceil(y1))]

    # Coordinates below are in stored-image pixels (floats); the canvas multiplies by SUPERSAMPLING.
    def ellipse(self, cx, cy, rx, ry, fill=None, outline=None, width=0.0):
        s = self.scale
        self.draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=fill, outline=outline,
                          width=max(1, round(width * s)) if outline else 0)
        self._track(cx - rx, cy - ry, cx + rx, cy + ry)

    def line(self, points, fill, width):
        s = self.scale
        self.draw.line([(x * s, y * s) for x, y in points], fill=fill, width=max(1, round(width * s)))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        self._track(min(xs), min(ys), max(xs), max(ys), pad=width / 2)

    def arc(self, cx, cy, rx, ry, start, end, fill, width):
        """An elliptical arc; angles in degrees clockwise from 3 o'clock (PIL's convention)."""
        s = self.scale
        self.draw.arc([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], start, end, fill=fill,
                      width=max(1, round(width * s)))
        angles = [math.radians(a) for a in range(int(start), int(end) + 1, 5)]
        xs = [cx + rx * math.cos(a) for a in angles]
        ys = [cy + ry * math.sin(a) for a in angles]
        self._track(min(xs), min(ys), max(xs), max(ys), pad=width / 2)

    def polygon(self, points, fill):
        s = self.scale
        self.draw.polygon([(x * s, y * s) for x, y in points], fill=fill)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        self._track(min(xs), min(ys), max(xs), max(ys))

    def rectangle(self, x0, y0, x1, y1, fill, radius=0.0):
        s = self.scale
        if radius > 0:
            self.draw.rounded_rectangle([x0 * s, y0 * s, x1 * s, y1 * s], radius=radius * s, fill=fill)
        else:
            self.draw.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], fill=fill)
        self._track(x0, y0, x1, y1)

    def finish(self):
        return self.image.reduce(self.scale) if self.scale > 1 else self.image.copy()


def _jitter_colour(rng, colour, amount=14):
    return tuple(int(max(0, min(255, c + rng.integers(-amount, amount + 1)))) for c in colour)


def _draw_part(canvas: _Canvas, part_type: str, variant: str, cx: float, cy: float, u: float, colour) -> None:
    """One part variant centred at (cx, cy); ``u`` is the object size in pixels."""
    if part_type == "eye":
        r = 0.055 * u
        if variant == "dot":
            canvas.ellipse(cx, cy, r, r, fill=colour)
        elif variant == "ring":
            canvas.ellipse(cx, cy, r * 1.2, r * 1.2, outline=colour, width=0.35 * r)
        else:
            canvas.line([(cx - 1.3 * r, cy), (cx + 1.3 * r, cy)], fill=colour, width=0.6 * r)
    elif part_type == "nose":
        r = 0.07 * u
        if variant == "line":
            canvas.line([(cx, cy - r), (cx, cy + r)], fill=colour, width=0.35 * r)
        elif variant == "triangle":
            canvas.polygon([(cx, cy - r), (cx - 0.75 * r, cy + r), (cx + 0.75 * r, cy + r)], fill=colour)
        else:
            canvas.ellipse(cx, cy, 0.55 * r, 0.55 * r, fill=colour)
    elif part_type == "mouth":
        w, h = 0.17 * u, 0.07 * u
        if variant == "smile":
            canvas.arc(cx, cy - h, w, 1.6 * h, 20, 160, fill=colour, width=0.35 * h)
        elif variant == "frown":
            canvas.arc(cx, cy + h, w, 1.6 * h, 200, 340, fill=colour, width=0.35 * h)
        elif variant == "flat":
            canvas.line([(cx - w, cy), (cx + w, cy)], fill=colour, width=0.45 * h)
        else:
            canvas.ellipse(cx, cy, 0.6 * w, 0.8 * h, fill=colour)
    elif part_type == "windshield":
        w, h = 0.16 * u, 0.075 * u
        if variant == "single":
            canvas.rectangle(cx - w, cy - h, cx + w, cy + h, fill=colour)
        elif variant == "split":
            gap = 0.12 * w
            canvas.rectangle(cx - w, cy - h, cx - gap, cy + h, fill=colour)
            canvas.rectangle(cx + gap, cy - h, cx + w, cy + h, fill=colour)
        else:
            canvas.rectangle(cx - w, cy - h, cx + w, cy + h, fill=colour, radius=0.9 * h)
    elif part_type == "wheel":
        r = 0.12 * u
        if variant == "solid":
            canvas.ellipse(cx, cy, r, r, fill=_DARK)
        elif variant == "tyre":
            canvas.ellipse(cx, cy, r, r, fill=_DARK)
            canvas.ellipse(cx, cy, 0.45 * r, 0.45 * r, fill=colour)
        else:
            canvas.ellipse(cx, cy, r, r, outline=_DARK, width=0.3 * r)
            canvas.line([(cx - r, cy), (cx + r, cy)], fill=_DARK, width=0.2 * r)
            canvas.line([(cx, cy - r), (cx, cy + r)], fill=_DARK, width=0.2 * r)
    elif part_type == "light":
        r = 0.045 * u
        if variant == "round":
            canvas.ellipse(cx, cy, r, r, fill=colour)
        else:
            canvas.rectangle(cx - 0.6 * r, cy - 1.4 * r, cx + 0.6 * r, cy + 1.4 * r, fill=colour)
    elif part_type == "roof":
        w, h = 0.42 * u, 0.15 * u
        if variant == "gable":
            canvas.polygon([(cx - w, cy + h), (cx, cy - h), (cx + w, cy + h)], fill=colour)
        elif variant == "flat":
            canvas.rectangle(cx - w, cy + 0.35 * h, cx + w, cy + h, fill=colour)
        else:
            canvas.polygon([(cx - w, cy + h), (cx - 0.45 * w, cy - 0.7 * h), (cx + 0.45 * w, cy - 0.7 * h),
                            (cx + w, cy + h)], fill=colour)
    elif part_type == "door":
        w, h = 0.08 * u, 0.14 * u
        if variant == "plain":
            canvas.rectangle(cx - w, cy - h, cx + w, cy + h, fill=colour)
        else:
            canvas.rectangle(cx - w, cy - 0.4 * h, cx + w, cy + h, fill=colour)
            canvas.ellipse(cx, cy - 0.4 * h, w, 0.6 * h, fill=colour)
    elif part_type == "window":
        r = 0.08 * u
        if variant == "filled":
            canvas.rectangle(cx - r, cy - r, cx + r, cy + r, fill=_GLASS)
        elif variant == "paned":
            canvas.rectangle(cx - r, cy - r, cx + r, cy + r, fill=_GLASS)
            canvas.line([(cx - r, cy), (cx + r, cy)], fill=colour, width=0.22 * r)
            canvas.line([(cx, cy - r), (cx, cy + r)], fill=colour, width=0.22 * r)
        else:
            canvas.ellipse(cx, cy, r, r, fill=_GLASS)
    else:  # pragma: no cover - the grammar tables and this function are edited together
        raise ValueError(f"unknown part type {part_type}")


def _draw_body(canvas: _Canvas, object_type: str, x0: float, y0: float, u: float, rng) -> dict:
    """Draw the object's body; returns per-part-type colours to use for its parts."""
    body = _jitter_colour(rng, _BODY_COLOURS[object_type][rng.integers(len(_BODY_COLOURS[object_type]))])
    if object_type == "face":
        canvas.ellipse(x0 + 0.5 * u, y0 + 0.52 * u, 0.34 * u, 0.44 * u, fill=body)
        dark = _jitter_colour(rng, _DARK, 10)
        return {"eye": dark, "nose": tuple(max(0, c - 70) for c in body), "mouth": (150, 40, 50)}
    if object_type == "car":
        canvas.rectangle(x0 + 0.02 * u, y0 + 0.42 * u, x0 + 0.98 * u, y0 + 0.74 * u, fill=body, radius=0.06 * u)
        canvas.polygon([(x0 + 0.20 * u, y0 + 0.43 * u), (x0 + 0.31 * u, y0 + 0.17 * u),
                        (x0 + 0.71 * u, y0 + 0.17 * u), (x0 + 0.82 * u, y0 + 0.43 * u)], fill=body)
        return {"windshield": _jitter_colour(rng, _GLASS, 10), "wheel": (150, 150, 150), "light": (255, 230, 90)}
    canvas.rectangle(x0 + 0.15 * u, y0 + 0.45 * u, x0 + 0.85 * u, y0 + 0.98 * u, fill=body)
    roof = _jitter_colour(rng, _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))])
    return {"roof": roof, "door": tuple(max(0, c - 80) for c in roof), "window": _jitter_colour(rng, _DARK, 10)}


def render_sample(global_index: int, size: int = 64, seed: int = 0, omit_slots: tuple[str, ...] = ()):
    """Render one scene. Returns ``(PIL RGB image of size×size, ground-truth dict)``.

    ``omit_slots`` leaves those parts undrawn (all random draws unchanged, ground truth still lists them):
    an ablation that shows exactly which pixels a part owns.
    """
    import numpy as np

    rng = np.random.default_rng([seed, global_index])
    background = _jitter_colour(rng, _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], 10)
    canvas = _Canvas(size, background)
    object_type = OBJECT_TYPES[rng.integers(len(OBJECT_TYPES))]
    u = size * OBJECT_SIZE_FRACTION * rng.uniform(0.92, 1.05)
    x0 = (size - u) / 2 + rng.uniform(-1, 1) * OBJECT_JITTER_FRACTION * size
    y0 = (size - u) / 2 + rng.uniform(-1, 1) * OBJECT_JITTER_FRACTION * size
    colours = _draw_body(canvas, object_type, x0, y0, u, rng)
    body_box = canvas.take_box()
    variant_by_type = {t: int(rng.integers(len(PART_VARIANTS[t]))) for t in dict.fromkeys(s.part_type for s in OBJECT_SLOTS[object_type])}
    parts, boxes = [], [body_box]
    for slot in OBJECT_SLOTS[object_type]:
        variant = variant_by_type[slot.part_type]
        cx = x0 + slot.center[0] * u + rng.uniform(-PART_JITTER_PX, PART_JITTER_PX)
        cy = y0 + slot.center[1] * u + rng.uniform(-PART_JITTER_PX, PART_JITTER_PX)
        target = _Canvas(size, background) if slot.name in omit_slots else canvas  # drawn, then discarded
        _draw_part(target, slot.part_type, PART_VARIANTS[slot.part_type][variant], cx, cy, u, colours[slot.part_type])
        box = target.take_box()
        boxes.append(box)
        parts.append({
            "object_type": object_type,
            "part_type": slot.part_type,
            "slot": slot.name,
            "variant": variant,
            "variant_name": PART_VARIANTS[slot.part_type][variant],
            "bbox": box,
        })
    object_box = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    ground_truth = {
        "grammar": GRAMMAR_NAME,
        "background_rgb": list(background),
        "objects": [{"object_type": object_type, "bbox": object_box, "parts": parts}],
    }
    return canvas.finish(), ground_truth


def make_demo_data(
    out: str | os.PathLike,
    n: int,
    size: int = 64,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE_IMAGES,
    holdout_fraction: float = 0.1,
    progress: bool = False,
) -> dict:
    """Generate ``n`` demo scenes as a dataset at ``out`` (same layout and summary shape as ``ingest``)."""
    from tqdm import tqdm

    from pipeline.data.errors import DataError

    if n < 1:
        raise DataError(f"--n must be >= 1, got {n}")
    if size < 8:
        raise DataError(f"--size must be >= 8 for the demo grammar to be drawable, got {size}")
    writer = DatasetWriter(str(out), image_size=size, kind="demo", shard_size_images=shard_size,
                           holdout_fraction=holdout_fraction)
    try:
        for index in tqdm(range(n), unit="img", desc="make-demo-data", disable=not progress, dynamic_ncols=True):
            image, ground_truth = render_sample(index, size, seed)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=DEMO_PNG_COMPRESS_LEVEL)
            writer.add(buffer.getvalue(), source=f"demo:{ground_truth['objects'][0]['object_type']}",
                       original_size=(size, size), ground_truth=ground_truth)
    except BaseException:
        writer.abort()
        raise
    written = writer.close()
    return {
        "written": n,
        "skipped": 0,
        "skipped_by_reason": {},
        "converted": {},
        "image_size": size,
        "source_kind": "demo",
        "skipped_examples": [],
        **written,
    }
