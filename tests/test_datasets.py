"""make_broden: the generated dataset is what the generator drew, in Broden's format."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from netdissect_fast.broden import Broden
from netdissect_fast.datasets import (COLOR_PROTOTYPES, LABEL, classify_colors, make_broden,
                                      make_broden_main)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_round_trip_equals_what_was_drawn(small_broden):
    ds = Broden(small_broden, store=None)
    assert len(ds) == 40 and ds.seg_shape == (48, 48) and ds.image_shape == (96, 96)
    for i, truth in enumerate(small_broden.truth):
        got = ds.planes(i)
        assert [c for c, _ in got] == [c for c, _ in truth["planes"]]
        for (_, a), (_, b) in zip(got, truth["planes"]):
            assert a.dtype == np.int32 and np.array_equal(a, b)
        assert ds.image_labels(i) == truth["image_labels"]


def test_layout_and_label_tables(small_broden):
    root = small_broden.path
    index = _read_csv(root / "index.csv")
    assert list(index[0])[:6] == ["image", "split", "ih", "iw", "sh", "sw"]
    cats = [r["name"] for r in _read_csv(root / "category.csv")]
    assert list(index[0])[6:] == cats == ["color", "object", "part", "material", "scene", "texture"]
    labels = {r["name"]: r for r in _read_csv(root / "label.csv")}
    # Shared labels: one number, several categories.
    assert labels["window"]["category"].startswith("object(") and ";part(" in labels["window"]["category"]
    assert labels["water"]["category"].startswith("material(") and ";object(" in labels["water"]["category"]
    numbers = [int(r["number"]) for r in _read_csv(root / "label.csv")]
    assert numbers == list(range(1, len(numbers) + 1))
    # Multi-plane parts, label numbers >= 256 in the PNGs (G channel used).
    part_cells = [r["part"] for r in index if r["part"]]
    assert any(c.endswith("_part_1.png") for c in part_cells)
    assert any("_part_2.png" in c for c in part_cells)
    with Image.open(root / "images" / index[0]["object"]) as im:
        rgb = np.asarray(im)
    assert im.mode == "RGB" and rgb[..., 1].max() >= 1
    assert (rgb[..., 0].astype(int) + 256 * rgb[..., 1].astype(int)).min() >= 256
    # c_<cat>.csv lists exactly the label numbers of that category.
    for cat in cats:
        coded = {int(r["number"]) for r in _read_csv(root / f"c_{cat}.csv")}
        listed = {int(r["number"]) for r in _read_csv(root / "label.csv") if f"{cat}(" in r["category"]}
        assert coded == listed


def test_scene_is_predictable_from_objects_not_background(small_broden):
    signature = {"street": {"car", "house"}, "town": {"house"}, "garden": {"house", "tree"},
                 "forest": {"tree"}, "park": {"tree", "person"}, "parking_lot": {"car", "person"},
                 "beach": {"sun", "person"}, "valley": {"mountain"},
                 "living_room": {"table", "window"}}
    background = {"sky", "wall", "road", "grass", "sand", "water", "floor"}
    seen, grounds = set(), {}
    for t in small_broden.truth:
        objects = set(t["objects"])
        # Exactly the scene's objects, besides the background and maybe a textured banner.
        assert objects - background - {"banner"} == signature[t["scene"]], t["scene"]
        seen.add(t["scene"])
        grounds.setdefault(t["scene"], set()).update(objects & background)
    assert len(seen) >= 6
    # Backgrounds are drawn independently of the scene: they cannot tell the scenes apart.
    assert sum(len(g) >= 3 for g in grounds.values()) >= 3
    summary = json.loads((small_broden.path / "generator.json").read_text())
    assert [s["scene"] for s in summary["images"]] == [t["scene"] for t in small_broden.truth]


def test_color_plane_comes_from_the_pixels(small_broden):
    protos = np.array(list(COLOR_PROTOTYPES.values()), np.uint8)[None]
    assert classify_colors(protos)[0].tolist() == [LABEL[n] for n in COLOR_PROTOTYPES]
    ds = Broden(small_broden, store=None)
    for i in (0, 7):
        color = dict(ds.planes(i))["color"]
        assert (color > 0).all() and color.max() <= 11
        small = np.asarray(ds.image(i).resize(ds.seg_shape[::-1], Image.BOX))
        # JPEG noise moves a few pixels across color boundaries, no more.
        assert (classify_colors(small) == color).mean() > 0.9


def test_deterministic_and_independent_of_workers(tmp_path):
    a = make_broden(tmp_path / "a", 12, seed=5, size=64, workers=1)
    b = make_broden(tmp_path / "b", 12, seed=5, size=64, workers=2)
    c = make_broden(tmp_path / "c", 12, seed=6, size=64, workers=1)
    files = sorted(p.relative_to(a.path) for p in a.path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.path) for p in b.path.rglob("*") if p.is_file())
    for rel in files:
        assert (a.path / rel).read_bytes() == (b.path / rel).read_bytes(), rel
    assert (a.path / "index.csv").read_bytes() != (c.path / "index.csv").read_bytes()


@pytest.mark.parametrize("size,seg", [(64, 32), (227, 113), (384, 192)])
def test_sizes(tmp_path, size, seg):
    out = make_broden(tmp_path / "d", 3, size=size, seg_size=None if size != 227 else 113)
    ds = Broden(out, store=None)
    assert ds.image_shape == (size, size) and ds.seg_shape == (seg, seg)
    assert ds.image(0).size == (size, size)
    assert all(a.shape == (seg, seg) for _, a in ds.planes(2))


def test_arguments_and_cli(tmp_path, capsys):
    tmp_path.joinpath("x").write_text("")
    with pytest.raises(FileExistsError):
        make_broden(tmp_path, 2, size=64)
    with pytest.raises(ValueError, match="n_images"):
        make_broden(tmp_path / "e", 0)
    assert make_broden_main([str(tmp_path / "cli"), "-n", "4", "--size", "64", "--workers", "1"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert len(Broden(tmp_path / "cli", store=None)) == 4
