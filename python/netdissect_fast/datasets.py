"""make_broden: a procedural world written in the Broden format (SPEC §4).

Tests and demos cannot download Broden, so this module draws real pictures of a small
world and writes them exactly as Broden lays them out. Each image is a scene (image-level
label) on a background drawn independently of the scene (sky or wall over grass, road,
sand, water + sand or floor), so only the objects in it tell the scenes apart, and a CNN
trained to classify the scenes has to learn units that detect the objects
(SCENE_OBJECTS):

    street       house (roof, door + knob, window), car (windows, wheels + hubcap)
    town         house                     garden       house, tree (trunk, crown)
    forest       two trees                 park         tree, person (head, torso, legs)
    parking_lot  car, person               beach        sun, person
    valley       mountain (snow cap)       living_room  table (legs), windows

Some images also get a material plane (brick, wood, glass, metal...), and some a
textured banner (striped / dotted / chequered / zigzagged, an image-level texture label).
Every image has a per-pixel color plane computed from the rendered pixels with an
11-name color classifier. Parts use two planes (`_part_1.png`: parts, `_part_2.png`:
parts of parts). "window" is both an object and a part, "water" and "sand" both an object
and a material (one label number each); object, part and material label numbers are all
above 255 so the PNGs need the G channel (label = R + 256 G); the scene numbers follow
them.

Geometry is defined in normalised coordinates and evaluated on the pixel-centre grids of
both the image and the segmentation, so any (size, seg_size) works (224/112, 227/113,
384/192, 64/32...). Everything is deterministic for a seed, independently of the number
of worker processes.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "part", "material")
SOURCE = "world"                       # the images/<source>/ folder

# The 11 color names of Broden and the prototype RGB each pixel is matched to.
COLOR_PROTOTYPES = {
    "black": (20, 20, 20), "blue": (40, 80, 200), "brown": (120, 75, 40),
    "green": (50, 150, 50), "grey": (128, 128, 128), "orange": (240, 140, 30),
    "pink": (240, 160, 190), "purple": (130, 50, 160), "red": (200, 35, 35),
    "white": (235, 235, 235), "yellow": (235, 215, 50),
}
# What each scene is made of: {object: (min, max) count}, nothing else but the background
# and maybe a banner. The scene is identified by its objects alone, and most objects are
# the one difference between two scenes (a car between a street and a town, a tree
# between a garden and a town, a person between a park and a forest, a house between a
# garden and a forest), so the classifier has to
# see each of them.
SCENE_OBJECTS = {
    "street": {"house": (1, 1), "car": (1, 2)},
    "town": {"house": (1, 1)},
    "garden": {"house": (1, 1), "tree": (1, 1)},
    "forest": {"tree": (2, 2)},
    "park": {"tree": (1, 1), "person": (1, 2)},
    "parking_lot": {"car": (1, 2), "person": (1, 1)},
    "beach": {"sun": (1, 1), "person": (1, 1)},
    "valley": {"mountain": (1, 1)},
    "living_room": {"table": (1, 1), "window": (1, 2)},
}
SCENES = tuple(SCENE_OBJECTS)

TEXTURES = ("striped", "dotted", "chequered", "zigzagged")
OBJECTS = ("sky", "road", "grass", "sand", "water", "floor", "wall", "house", "car", "tree",
           "person", "sun", "mountain", "table", "window", "banner")
PARTS = ("roof", "door", "window", "wheel", "head", "torso", "leg", "trunk", "crown",
         "knob", "hubcap")
MATERIALS = ("brick", "painted", "tile", "wood", "glass", "metal", "rubber", "skin", "fabric",
             "foliage", "stone", "snow", "water", "sand")
FIRST_PIXEL_LABEL = 256                # object/part/material numbers start here


def _label_table() -> tuple[list[str], dict[str, list[str]]]:
    """(names by number, categories of each name). Colors and textures first, then
    unused filler labels (in no category) up to 255, then object/part/material and the
    scenes (image-level labels above 255 are legal: index.csv holds them as text)."""
    names = ["-"]
    cats: dict[str, list[str]] = {}
    def add(name, cat):
        if name not in cats:
            names.append(name)
            cats[name] = []
        cats[name].append(cat)
    for n in COLOR_PROTOTYPES:
        add(n, "color")
    for n in TEXTURES:
        add(n, "texture")
    while len(names) < FIRST_PIXEL_LABEL:
        add(f"unused_{len(names)}", None)
    for cat, group in (("object", OBJECTS), ("part", PARTS), ("material", MATERIALS), ("scene", SCENES)):
        for n in group:
            add(n, cat)
    return names, cats


LABEL_NAMES, LABEL_CATEGORIES = _label_table()
LABEL = {n: i for i, n in enumerate(LABEL_NAMES)}


@dataclass
class GeneratedBroden:
    """What make_broden wrote. Usable as a path (``Broden(generated)``).

    ``truth[i]`` (when kept) is what the generator drew for dataset row i, in the form
    the reader returns: ``{"planes": [(category, int32 (sh, sw))...],
    "image_labels": [(category, label)...], "scene": name, "objects": [names]}``."""
    path: Path
    n_images: int
    size: int
    seg_size: int
    label_names: list[str]
    truth: list[dict] | None = field(default=None, repr=False)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


# -- drawing ----------------------------------------------------------------
Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]   # (Y (n,1), X (1,n)) -> bool (n, n)


def _rect(y0, y1, x0, x1) -> Shape:
    return lambda Y, X: (Y >= y0) & (Y < y1) & (X >= x0) & (X < x1)


def _disc(cy, cx, r) -> Shape:
    return lambda Y, X: (Y - cy) ** 2 + (X - cx) ** 2 < r * r


def _triangle(apex_y, apex_x, base_y, half_width) -> Shape:
    """Isosceles triangle pointing up, apex at (apex_y, apex_x), base on y = base_y."""
    h = base_y - apex_y
    return lambda Y, X: (Y >= apex_y) & (Y < base_y) & (np.abs(X - apex_x) <= half_width * (Y - apex_y) / h)


def _union(*shapes: Shape) -> Shape:
    def mask(Y, X):
        m = shapes[0](Y, X)
        for s in shapes[1:]:
            m = m | s(Y, X)
        return m
    return mask


class _Canvas:
    """An RGB picture and its label planes, painted together (painter's algorithm)."""

    def __init__(self, size: int, seg: int, rng: np.random.Generator):
        self.rng = rng
        self.rgb = np.zeros((size, size, 3), np.float32)
        grid = lambda n: ((np.arange(n) + 0.5) / n).astype(np.float32)
        self.image_grid = (grid(size)[:, None], grid(size)[None, :])
        self.seg_grid = (grid(seg)[:, None], grid(seg)[None, :])
        self.planes = {k: np.zeros((seg, seg), np.int32) for k in ("object", "part1", "part2", "material")}
        self.objects: list[str] = []
        self.horizon = 1.0                     # where the background's ground starts

    def jitter(self, rgb, amount=18):
        return np.clip(np.asarray(rgb, np.float32) + self.rng.uniform(-amount, amount, 3), 0, 255)

    def paint(self, shape: Shape, rgb=None, pattern: tuple | None = None, **labels):
        """Fill ``shape`` with ``rgb`` (or ``pattern = (mask_fn, rgb_a, rgb_b)``) and set
        the given planes to label numbers (0 clears)."""
        m = shape(*self.image_grid)[..., None]
        if pattern is not None:
            on, a, b = pattern
            np.copyto(self.rgb, np.where(on(*self.image_grid)[..., None], np.float32(b), np.float32(a)), where=m)
        elif rgb is not None:
            np.copyto(self.rgb, self.jitter(rgb), where=m)
        ms = shape(*self.seg_grid)
        for plane, label in labels.items():
            self.planes[plane][ms] = LABEL[label] if label else 0

    def object(self, name: str, shape: Shape, rgb=None, material: str | None = None, pattern=None):
        """A new object hides whatever was below it, its parts included."""
        self.objects.append(name)
        self.paint(shape, rgb, pattern, object=name, part1=None, part2=None, material=material)

    def part(self, name: str, shape: Shape, rgb, material: str | None = None):
        self.paint(shape, rgb, part1=name, part2=None, material=material)

    def subpart(self, name: str, shape: Shape, rgb, material: str | None = None):
        self.paint(shape, rgb, part2=name, material=material)


# Characteristic colors.
SKY, SUN, GRASS, ROAD, SAND, WATER = (110, 170, 235), (250, 220, 60), (60, 150, 50), (120, 120, 125), (225, 200, 140), (40, 90, 200)
BROWN, DARK, GLASS, SKIN, WHITE = (115, 70, 35), (25, 25, 25), (170, 210, 240), (230, 170, 140), (240, 240, 240)
BODY_COLORS = [(200, 35, 35), (40, 80, 200), (235, 235, 235), (30, 30, 30), (235, 210, 50), (240, 140, 30), (130, 50, 160)]
WALL_COLORS = [(180, 70, 50), (235, 230, 215), (230, 200, 90), (240, 170, 190)]


def _house(c: _Canvas, x0, base):
    r = c.rng
    w, h = r.uniform(0.2, 0.28), r.uniform(0.14, 0.2)
    top = base - h
    body = _rect(top, base, x0, x0 + w)
    roof = _triangle(top - r.uniform(0.07, 0.12), x0 + w / 2, top + 1e-3, w / 2 + 0.02)
    if r.random() < 0.5:
        mortar = lambda Y, X: ((Y * 40) % 1 < 0.18) | (((X * 20 + 0.5 * (np.floor(Y * 40) % 2)) % 1) < 0.1)
        c.object("house", _union(body, roof), material="brick",
                 pattern=(mortar, c.jitter((175, 65, 45)), (210, 200, 190)))
    else:
        c.object("house", _union(body, roof), WALL_COLORS[r.integers(1, len(WALL_COLORS))], material="painted")
    c.part("roof", roof, [(150, 40, 30), (70, 70, 75), BROWN][r.integers(3)], material="tile")
    dw, dh = 0.24 * w, 0.55 * h
    dx = x0 + r.uniform(0.15, 0.6) * w
    c.part("door", _rect(base - dh, base, dx, dx + dw), BROWN, material="wood")
    c.subpart("knob", _disc(base - dh / 2, dx + 0.75 * dw, 0.018), (230, 200, 60), material="metal")
    wx = dx + dw + 0.02 if dx + dw + 0.02 + 0.2 * w < x0 + w else x0 + 0.05 * w
    c.part("window", _rect(top + 0.2 * h, top + 0.5 * h, wx, wx + 0.22 * w), GLASS, material="glass")


def _car(c: _Canvas, x0, base):
    r = c.rng
    w = r.uniform(0.24, 0.32)
    wheel_r = 0.045
    bottom = base - wheel_r * 0.7
    bh, ch = r.uniform(0.08, 0.1), r.uniform(0.06, 0.08)
    body = _rect(bottom - bh, bottom, x0, x0 + w)
    cabin = _rect(bottom - bh - ch, bottom - bh, x0 + 0.2 * w, x0 + 0.8 * w)
    wheels = [(bottom, x0 + fx * w) for fx in (0.2, 0.8)]
    c.object("car", _union(body, cabin, *(_disc(y, x, wheel_r) for y, x in wheels)),
             BODY_COLORS[r.integers(len(BODY_COLORS))], material="metal")
    for a, b in ((0.25, 0.48), (0.52, 0.75)):
        c.part("window", _rect(bottom - bh - 0.8 * ch, bottom - bh - 0.1 * ch, x0 + a * w, x0 + b * w),
               GLASS, material="glass")
    for y, x in wheels:
        c.part("wheel", _disc(y, x, wheel_r), DARK, material="rubber")
        c.subpart("hubcap", _disc(y, x, wheel_r * 0.45), (170, 170, 175), material="metal")


def _person(c: _Canvas, cx, base):
    r = c.rng
    h = r.uniform(0.28, 0.38)
    head = _disc(base - h + 0.12 * h, cx, 0.12 * h)
    torso = _rect(base - 0.78 * h, base - 0.4 * h, cx - 0.18 * h, cx + 0.18 * h)
    legs = [_rect(base - 0.4 * h, base, cx - 0.16 * h, cx - 0.01 * h),
            _rect(base - 0.4 * h, base, cx + 0.01 * h, cx + 0.16 * h)]
    c.object("person", _union(head, torso, *legs))
    c.part("head", head, [SKIN, (150, 100, 60)][r.integers(2)], material="skin")
    c.part("torso", torso, BODY_COLORS[r.integers(len(BODY_COLORS))], material="fabric")
    trousers = [(40, 60, 120), DARK][r.integers(2)]
    for leg in legs:
        c.part("leg", leg, trousers, material="fabric")


def _tree(c: _Canvas, cx, base):
    r = c.rng
    th, cr = r.uniform(0.1, 0.16), r.uniform(0.075, 0.1)
    trunk = _rect(base - th, base, cx - 0.028, cx + 0.028)
    crown = _disc(base - th - cr * 0.7, cx, cr)
    c.object("tree", _union(trunk, crown))
    c.part("trunk", trunk, BROWN, material="wood")
    c.part("crown", crown, [(40, 130, 40), (70, 160, 50), (30, 100, 45)][r.integers(3)], material="foliage")


def _mountain(c: _Canvas, cx, base):
    r = c.rng
    apex, hw = base - r.uniform(0.18, 0.3), r.uniform(0.15, 0.25)
    c.object("mountain", _triangle(apex, cx, base, hw), [(120, 110, 105), (110, 85, 60)][r.integers(2)],
             material="stone")
    # The snow cap is the top 30 % of the same triangle: only its material differs.
    c.paint(_triangle(apex, cx, apex + 0.3 * (base - apex), 0.3 * hw), WHITE, material="snow")


def _table(c: _Canvas, x, b):
    r = c.rng
    w, h = r.uniform(0.35, 0.5), r.uniform(0.18, 0.24)
    top = _rect(b - h, b - h + 0.06, x, x + w)
    legs = [_rect(b - h + 0.06, b, x + 0.02, x + 0.08), _rect(b - h + 0.06, b, x + w - 0.08, x + w - 0.02)]
    c.object("table", _union(top, *legs), [BROWN, (150, 100, 50), (70, 45, 25)][r.integers(3)], material="wood")
    for leg in legs:
        c.part("leg", leg, (90, 55, 25), material="wood")


def _window(c: _Canvas, x, y):
    r = c.rng
    h, w = min(r.uniform(0.15, 0.22), c.horizon - 0.02 - y), r.uniform(0.14, 0.2)
    c.object("window", _rect(y, y + h, x, x + w), GLASS, material="glass")
    # Mullions: a cross of the frame colour, part of the window.
    frame = (235, 235, 235) if r.random() < 0.5 else BROWN
    c.paint(_union(_rect(y, y + h, x + w / 2 - 0.008, x + w / 2 + 0.008),
                   _rect(y + h / 2 - 0.008, y + h / 2 + 0.008, x, x + w)), frame)


# Backgrounds: (top, ground) pairs drawn independently of the scene, so the background
# never tells which scene an image is: only the objects in it do.
BACKGROUNDS = ("sky+grass", "sky+road", "sky+sand", "sky+water", "wall+floor")

def _background(c: _Canvas, kind: str, hz: float):
    r = c.rng
    top, ground = kind.split("+")
    if top == "sky":
        c.object("sky", _rect(0, hz, 0, 1), [SKY, (150, 195, 240), (80, 140, 220)][r.integers(3)])
    else:
        c.object("wall", _rect(0, hz, 0, 1), WALL_COLORS[r.integers(1, len(WALL_COLORS))], material="painted")
    g = _rect(hz, 1, 0, 1)
    if ground == "grass":
        c.object("grass", g, [GRASS, (90, 170, 60), (50, 120, 45)][r.integers(3)], material="foliage")
    elif ground == "road":
        c.object("road", g, [ROAD, (90, 90, 95), (150, 145, 140)][r.integers(3)], material="stone")
    elif ground == "sand":
        c.object("sand", g, SAND, material="sand")
    elif ground == "water":
        shore = hz + r.uniform(0.12, 0.25)
        c.object("water", _rect(hz, shore, 0, 1), WATER, material="water")
        c.object("sand", _rect(shore, 1, 0, 1), SAND, material="sand")
    else:
        c.object("floor", g, [BROWN, (160, 110, 60), (90, 60, 40)][r.integers(3)], material="wood")


def _compose(c: _Canvas, scene: str):
    """Draw a scene on a random background; far things (higher base) first so nearer
    ones occlude them."""
    if scene not in SCENE_OBJECTS:
        raise ValueError(f"unknown scene {scene!r}")
    r = c.rng
    hz = c.horizon = r.uniform(0.38, 0.55)
    _background(c, BACKGROUNDS[r.integers(len(BACKGROUNDS))], hz)
    draws: list[tuple[float, Callable]] = []
    for name, (lo, hi) in SCENE_OBJECTS[scene].items():
        for k in range(r.integers(lo, hi + 1)):
            if name == "sun":
                rad = r.uniform(0.09, 0.13)
                c.object("sun", _disc(r.uniform(rad + 0.02, max(rad + 0.03, hz - rad)), r.uniform(0.12, 0.88), rad), SUN)
            elif name == "mountain":
                draws.append((hz + 1e-3 * r.random(), lambda b, x=r.uniform(0.1, 0.9): _mountain(c, x, b)))
            elif name == "window":
                x = 0.05 + 0.5 * k + r.uniform(0, 0.18)
                _window(c, x, r.uniform(0.04, max(0.05, hz - 0.25)))
            elif name == "house":
                draws.append((hz + r.uniform(0.02, 0.1), lambda b, x=r.uniform(0, 0.65): _house(c, x, b)))
            elif name == "car":
                draws.append((r.uniform(hz + 0.2, 0.97), lambda b, x=r.uniform(0, 0.6): _car(c, x, b)))
            elif name == "tree":
                draws.append((r.uniform(hz + 0.08, 0.85), lambda b, x=r.uniform(0.1, 0.9): _tree(c, x, b)))
            elif name == "person":
                draws.append((r.uniform(hz + 0.3, 0.99), lambda b, x=r.uniform(0.08, 0.92): _person(c, x, b)))
            elif name == "table":
                draws.append((r.uniform(hz + 0.22, 0.95), lambda b, x=r.uniform(0.02, 0.55): _table(c, x, b)))
    for base, draw in sorted(draws, key=lambda d: d[0]):
        draw(base)


def _texture_pattern(name: str, period: float) -> Callable:
    if name == "striped":
        return lambda Y, X: (X / period) % 1 < 0.5
    if name == "dotted":
        return lambda Y, X: ((Y / period) % 1 - 0.5) ** 2 + ((X / period) % 1 - 0.5) ** 2 < 0.09
    if name == "chequered":
        return lambda Y, X: (np.floor(Y / period) + np.floor(X / period)) % 2 == 1
    if name == "zigzagged":
        return lambda Y, X: ((Y + np.abs((X / period) % 1 - 0.5) * period) / period) % 1 < 0.5
    raise ValueError(f"unknown texture {name!r}")


def _banner(c: _Canvas) -> str:
    r = c.rng
    texture = TEXTURES[r.integers(len(TEXTURES))]
    w, h = r.uniform(0.2, 0.3), r.uniform(0.15, 0.25)
    y, x = r.uniform(0.02, 1 - h - 0.02), r.uniform(0.02, 1 - w - 0.02)
    a, b = r.choice(len(BODY_COLORS), 2, replace=False)
    c.object("banner", _rect(y, y + h, x, x + w), material="fabric",
             pattern=(_texture_pattern(texture, r.uniform(0.03, 0.05)), BODY_COLORS[a], BODY_COLORS[b]))
    return texture


def classify_colors(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel color label numbers (int32) for an (h, w, 3) RGB array: the nearest of
    the 11 color prototypes."""
    protos = np.array(list(COLOR_PROTOTYPES.values()), np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; |x|^2 is the same for every p.
    d = (protos ** 2).sum(1) - 2 * rgb.astype(np.float32) @ protos.T
    numbers = np.array([LABEL[n] for n in COLOR_PROTOTYPES], np.int32)
    return numbers[d.argmin(-1)]


def encode_label_png(plane: np.ndarray) -> Image.Image:
    """label = R + 256 G (B unused)."""
    plane = np.asarray(plane)
    if plane.min() < 0 or plane.max() >= 65536:
        raise ValueError("label numbers must be in 0..65535 to fit a Broden PNG")
    rgb = np.zeros(plane.shape + (3,), np.uint8)
    rgb[..., 0] = plane & 255
    rgb[..., 1] = plane >> 8
    return Image.fromarray(rgb, "RGB")


# -- one image ----------------------------------------------------------------
def _render(root: str, i: int, seed: int, size: int, seg: int, material_fraction: float,
            texture_fraction: float, keep_truth: bool):
    """Draw and write image i. Returns its index.csv cells, per-(category, label)
    (images, area fraction) statistics, and optionally the truth."""
    rng = np.random.default_rng([seed, i])
    scene = SCENES[rng.integers(len(SCENES))]
    split = "train" if rng.random() < 0.8 else "val"
    has_material = rng.random() < material_fraction
    has_texture = rng.random() < texture_fraction
    c = _Canvas(size, seg, rng)
    _compose(c, scene)
    texture = _banner(c) if has_texture else None

    # A little lighting and sensor noise so these look like photos, not flat drawings.
    Y = c.image_grid[0][..., None]
    picture = c.rgb * (1.08 - 0.16 * Y) + 4 * rng.standard_normal(c.rgb.shape, np.float32)
    picture = np.clip(picture, 0, 255).astype(np.uint8)
    seg_rgb = np.asarray(Image.fromarray(picture).resize((seg, seg), Image.BOX))

    planes = [("color", classify_colors(seg_rgb))]
    planes.append(("object", c.planes["object"]))
    planes += [("part", c.planes[k]) for k in ("part1", "part2") if c.planes[k].any()]
    if has_material and c.planes["material"].any():
        planes.append(("material", c.planes["material"]))
    image_labels = [("scene", LABEL[scene])] + ([("texture", LABEL[texture])] if texture else [])

    name = f"{SOURCE}/img_{i + 1:06d}"
    folder = Path(root, "images", SOURCE)
    with Image.fromarray(picture) as im:
        im.save(folder / f"img_{i + 1:06d}.jpg", quality=90)
    cells: dict[str, list[str]] = {cat: [] for cat in CATEGORIES}
    k_part = 0
    for cat, plane in planes:
        if cat == "part":
            k_part += 1
            rel = f"{name}_part_{k_part}.png"
        else:
            rel = f"{name}_{cat}.png"
        encode_label_png(plane).save(Path(root, "images", rel), compress_level=1)
        cells[cat].append(rel)
    for cat, label in image_labels:
        cells[cat].append(str(label))

    stats: dict[tuple[str, int], list[float]] = {}     # (images, area fraction)
    for cat, plane in planes:
        numbers, counts = np.unique(plane[plane > 0], return_counts=True)
        for n, k in zip(numbers.tolist(), counts.tolist()):
            stats.setdefault((cat, n), [1, 0.0])[1] += k / plane.size
    for cat, label in image_labels:
        stats[(cat, label)] = [1, 1.0]
    truth = None
    if keep_truth:
        truth = {"planes": [(cat, p.astype(np.int32)) for cat, p in planes],
                 "image_labels": image_labels, "scene": scene, "objects": sorted(set(c.objects))}
    summary = {"scene": scene, "objects": sorted(set(c.objects)), "texture": texture}
    return [f"{name}.jpg", split, str(size), str(size), str(seg), str(seg)] + [
        ";".join(cells[cat]) for cat in CATEGORIES], stats, truth, summary


def _render_star(args):
    return _render(*args)


# -- the dataset ----------------------------------------------------------------
def make_broden(path, n_images: int, seed: int = 0, size: int = 224, seg_size: int | None = None,
                material_fraction: float = 0.6, texture_fraction: float = 0.3,
                workers: int | None = None, keep_truth: bool = False, overwrite: bool = False,
                progress: bool = False) -> GeneratedBroden:
    """Write a Broden-format dataset of ``n_images`` procedural pictures to ``path``.

    ``seg_size`` defaults to ``size // 2`` (112 for 224). ``workers``: processes (None:
    up to the CPU count; 0 or 1: in this process). ``keep_truth`` keeps the label planes
    drawn for every image in the returned object (memory: ~5 planes per image)."""
    seg = size // 2 if seg_size is None else int(seg_size)
    if n_images < 1:
        raise ValueError(f"make_broden: n_images must be >= 1 (got {n_images})")
    if size < 16 or not 1 <= seg <= size:
        raise ValueError(f"make_broden: need size >= 16 and 1 <= seg_size <= size (got {size}, {seg})")
    root = Path(path)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"make_broden: {root} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(root)
    (root / "images" / SOURCE).mkdir(parents=True, exist_ok=True)

    jobs = [(str(root), i, seed, size, seg, material_fraction, texture_fraction, keep_truth)
            for i in range(n_images)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n_images >= 200 else 1
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")   # safe next to threads and open files
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(_progress(pool.map(_render_star, jobs, chunksize=16), n_images, progress))
    else:
        results = [_render(*j) for j in _progress(jobs, n_images, progress)]

    _write_csvs(root, results)
    summaries = [r[3] for r in results]
    (root / "generator.json").write_text(json.dumps(
        {"generator": "netdissect_fast.datasets.make_broden", "seed": seed, "size": size,
         "seg_size": seg, "material_fraction": material_fraction,
         "texture_fraction": texture_fraction, "images": summaries}, indent=0))
    return GeneratedBroden(root, n_images, size, seg, list(LABEL_NAMES),
                           [r[2] for r in results] if keep_truth else None)


def _progress(it, total, enabled):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc="make_broden", unit="img")


def _write_csvs(root: Path, results) -> None:
    """index.csv, then category/label/c_<cat> tables from the statistics of what was drawn."""
    freq: dict[tuple[str, int], int] = {}
    cover: dict[tuple[str, int], float] = {}
    for _, stats, _, _ in results:
        for key, (f, c) in stats.items():
            freq[key] = freq.get(key, 0) + f
            cover[key] = cover.get(key, 0.0) + c
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
        w.writerows(r[0] for r in results)

    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for n, name in enumerate(LABEL_NAMES[1:], start=1):
            cats = [c for c in LABEL_CATEGORIES[name] if c]
            cell = ";".join(f"{c}({freq.get((c, n), 0)})" for c in sorted(cats))
            w.writerow([n, name, cell, sum(freq.get((c, n), 0) for c in cats),
                        f"{sum(cover.get((c, n), 0.0) for c in cats):.6g}", ""])

    cat_rows = []
    for cat in CATEGORIES:
        numbers = [n for n, name in enumerate(LABEL_NAMES) if cat in LABEL_CATEGORIES.get(name, [])]
        with open(root / f"c_{cat}.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            for code, n in enumerate(numbers, start=1):
                w.writerow([code, n, LABEL_NAMES[n], freq.get((cat, n), 0), f"{cover.get((cat, n), 0.0):.6g}"])
        images = sum(1 for r in results if r[0][6 + CATEGORIES.index(cat)])
        cat_rows.append([cat, min(numbers), max(numbers), len(numbers), images])
    with open(root / "category.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "first", "last", "count", "frequency"])
        w.writerows(cat_rows)


def make_broden_main(argv: Sequence[str] | None = None) -> int:
    """``netdissect-fast make-dataset``: write a procedural Broden-format dataset."""
    p = argparse.ArgumentParser(prog="netdissect-fast make-dataset", description=make_broden_main.__doc__)
    p.add_argument("path")
    p.add_argument("-n", "--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seg-size", type=int, default=None, help="default: size // 2")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = make_broden(a.path, a.images, seed=a.seed, size=a.size, seg_size=a.seg_size,
                      workers=a.workers, overwrite=a.overwrite, progress=True)
    print(f"wrote {out.n_images} images ({out.size}px, labels {out.seg_size}px) to {out.path}")
    return 0
