"""HTML report and comparison page, on a fake but consistent saved result.

`make_images` and `make_fake_result` are also used by test_browser.py and
bench/bench_report.py.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from netdissect_fast import report
from netdissect_fast.topimages import TopImages


class StubDataset:
    """The part of the Broden reader the report uses."""

    def __init__(self, paths, image_shape):
        self.image_paths = [str(p) for p in paths]
        self.image_shape = tuple(image_shape)
        self.seg_shape = (image_shape[0] // 2, image_shape[1] // 2)

    def __len__(self):
        return len(self.image_paths)

    def image(self, i):
        with Image.open(self.image_paths[i]) as im:
            return im.convert("RGB")


def make_images(folder, n, size=64, seed=0, solid=None):
    """n JPEGs (smooth colour gradients, or one solid colour) -> StubDataset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        if solid is not None:
            rgb = np.full((size, size, 3), solid, np.uint8)
        else:
            a, b, c = rng.uniform(0, 2 * np.pi, 3)
            rgb = np.stack([np.sin(3 * x + a), np.cos(4 * y + b), np.sin(2 * (x + y) + c)], -1)
            rgb = ((rgb + 1) * 127.5).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(rgb).save(path, quality=90)
        paths.append(path)
    return StubDataset(paths, (size, size))


CATEGORIES = ["color", "object", "part", "scene"]


def make_fake_result(folder, dataset_path, K=20, n_images=30, top_n=5, map_shape=(7, 7),
                     seed=0, model="fakenet", layer="layer4", maps=None, thresholds=None, top=None):
    """A saved result with the layout of DissectionResult.save: random activations, top
    images from TopImages, thresholds at a high quantile, random IoUs (some units above
    0.04, some below), summary.json consistent with the arrays.

    For large K, pass ``top`` (a filled TopImages) and ``thresholds`` instead of
    making all activation maps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if top is None:
        if maps is None:
            maps = rng.gamma(1.0, 1.0, size=(n_images, K) + tuple(map_shape)).astype(np.float32)
        top = TopImages(K, top_n, map_shape)
        for s in range(0, n_images, 16):
            batch = maps[s:s + 16]
            top.update(batch.max(axis=(2, 3)), np.arange(s, s + len(batch)), batch)
    if thresholds is None:
        per_unit = maps.transpose(1, 0, 2, 3).reshape(K, -1).astype(np.float64)
        thresholds = np.quantile(per_unit, 0.9, axis=1)

    label_names = ["-"] + [f"thing{i}" for i in range(1, 15)]
    L = len(label_names)
    primary = np.array([-1] + [i % len(CATEGORIES) for i in range(1, L)])
    iou = rng.uniform(0, 0.12, size=(K, L)) * (rng.uniform(size=(K, 1)) < 0.6)
    iou[:, 0] = 0
    intersection = rng.integers(0, 1000, size=(K, L))
    activation = intersection + rng.integers(0, 1000, size=(K, L))
    label_pixels = rng.integers(1000, 5000, size=L)
    best = np.argmax(iou, axis=1)
    units, detectors, unique = [], {c: 0 for c in CATEGORIES}, {c: set() for c in CATEGORIES}
    for k, label in enumerate(best.tolist()):
        cat = CATEGORIES[primary[label]] if primary[label] >= 0 else ""
        units.append({"unit": k, "label": label, "label_name": label_names[label],
                      "category": cat, "iou": float(iou[k, label])})
        if iou[k, label] > 0.04:
            detectors[cat] += 1
            unique[cat].add(label)
    np.savez(folder / "results.npz", thresholds=thresholds.astype(np.float32),
             intersection=intersection, activation=activation, label_pixels=label_pixels,
             iou=iou, cat_activation=rng.integers(0, 9, size=(K, len(CATEGORIES))),
             top_indices=top.indices, top_values=top.values, top_maps=top.maps)
    summary = {"meta": {"model": model, "layer": layer, "dataset": str(dataset_path),
                        "settings": {"q": 0.995, "rule": "paper", "upsample": "bilinear",
                                     "iou_threshold": 0.04}},
               "categories": CATEGORIES, "label_names": label_names,
               "primary_category": primary.tolist(), "units": units, "detectors": detectors,
               "unique_detectors": {c: len(v) for c, v in unique.items()},
               "num_units": K, "iou_threshold": 0.04}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def result(tmp_path):
    dataset = make_images(tmp_path / "images", 30)
    return make_fake_result(tmp_path / "result", tmp_path / "images"), dataset


def unit_rows(page):
    return re.findall(r'<tr class="unit" data-unit="(\d+)"[^>]*data-iou="([0-9.]+)"', page)


def test_report_has_one_row_per_unit_sorted_and_split_by_iou(result):
    result_dir, dataset = result
    path = report.write_report(result_dir, dataset)
    assert path == result_dir / "report.html"
    page = path.read_text()
    summary = json.loads((result_dir / "summary.json").read_text())
    rows = unit_rows(page)
    assert sorted(int(u) for u, _ in rows) == list(range(summary["num_units"]))

    detectors_part, below_part = page.split('<tbody class="units below">')
    shown_detectors = [(int(u), float(i)) for u, i in unit_rows(detectors_part)]
    shown_below = [(int(u), float(i)) for u, i in unit_rows(below_part)]
    expected = sorted(((u["unit"], round(u["iou"], 6)) for u in summary["units"]),
                      key=lambda t: (-t[1], t[0]))
    assert shown_detectors + shown_below == expected
    assert all(i > 0.04 for _, i in shown_detectors) and all(i <= 0.04 for _, i in shown_below)
    assert 0 < len(shown_detectors) < summary["num_units"]
    for cat, count in summary["unique_detectors"].items():
        assert re.search(rf"{cat}</td><td class=\"n\">{summary['detectors'][cat]}</td>"
                         rf"<td class=\"n\">{count}</td>", page)


def test_report_is_self_contained_and_its_files_exist(result):
    result_dir, dataset = result
    page = report.write_report(result_dir, dataset).read_text()
    assert not re.search(r"https?:|//[a-z]", page, re.I), "no network reference"
    assert "<link" not in page and "<script src" not in page
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(refs) == 20 + 2                       # one strip per unit + two charts
    for ref in refs:
        assert (result_dir / ref).is_file(), ref
    assert {Path(r).suffix for r in refs} == {".jpg", ".svg"}


def test_strip_images_have_thumbnails_side_by_side(result):
    result_dir, dataset = result
    report.write_report(result_dir, dataset)
    with Image.open(result_dir / "report_images" / "unit_0003.jpg") as im:
        assert im.size == (5 * (96 + report.STRIP_GAP) - report.STRIP_GAP, 96)


def test_top_n_and_units_without_images(result, tmp_path):
    result_dir, dataset = result
    with np.load(result_dir / "results.npz") as npz:
        arrays = dict(npz)
    arrays["top_indices"][2] = -1                    # unit 2 never got an image
    np.savez(result_dir / "results.npz", **arrays)
    path = report.write_report(result_dir, dataset, out=tmp_path / "elsewhere" / "r.html", top_n=2)
    page = path.read_text()
    assert path.parent.name == "elsewhere" and (path.parent / "r_images" / "unit_0000.jpg").is_file()
    assert not (path.parent / "r_images" / "unit_0002.jpg").exists()
    assert re.search(r'data-unit="2".*?no images', page)
    with Image.open(path.parent / "r_images" / "unit_0000.jpg") as im:
        assert im.width == 2 * 96 + report.STRIP_GAP


def test_mask_bright_inside_dim_outside(tmp_path):
    """White images; every map is high on its left half: tiles must be white on the
    left, dimmed on the right, with an outline between."""
    dataset = make_images(tmp_path / "white", 4, size=64, solid=255)
    maps = np.zeros((4, 2, 4, 4), np.float32)
    maps[:, :, :, :2] = 10
    maps[:, :, 0, 3] = np.arange(4)[:, None] * 0.1 + 11      # distinct maxima, one per image
    result_dir = make_fake_result(tmp_path / "r", tmp_path / "white", K=2, n_images=4, top_n=3,
                                  map_shape=(4, 4), maps=maps, thresholds=np.full(2, 5.0))
    report.write_report(result_dir, dataset)
    with Image.open(result_dir / "report_images" / "unit_0000.jpg") as im:
        strip = np.asarray(im.convert("L")).astype(float)
    tile = strip[:, :96]
    assert tile[40:90, 5:35].mean() > 240                        # inside: untouched
    assert abs(tile[40:90, 60:90].mean() - 255 * report.DIM) < 10   # outside: dimmed
    edge = tile[40:90, 44:52].mean()                             # the outline lies near x = 48
    assert 255 * report.DIM + 20 < edge < 240


@pytest.mark.parametrize("size", [(96, 40), (5, 3), (7, 5)])
def test_upsample_matches_torch(size):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 2, 7, 5)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(maps), size=size, mode="bilinear",
                                               align_corners=False).numpy()
    np.testing.assert_allclose(report._upsample(maps, size), expected, atol=1e-5)


def test_receptive_field_results_draw_receptive_field_masks():
    """A result counted with receptive-field upsampling is drawn with those weights:
    at segmentation size they give the surface of SPEC §2 (tests/reference.py),
    not the bilinear one; the settings come from the tally."""
    import netdissect_fast as ndf
    sys.path.insert(0, str(Path(__file__).parent))
    from reference import upsample_receptive_field
    from synthetic import random_dataset, smooth_activations
    rng = np.random.default_rng(31)
    ds = random_dataset(rng, n_images=4, seg_shape=(40, 56))
    acts = smooth_activations(rng, 4, 3, 5, 7)
    res = ndf.score(acts, ds, upsample="receptive_field", receptive_field=((8, 8), (3, 2.5)), device="cpu",
                    progress=False, top_n=0)
    settings = res.meta["settings"]
    assert settings["seg_shape"] == [40, 56] and settings["receptive_field"] == [8.0, 8.0, 3.0, 2.5]
    drawn = report._upsample(acts, (40, 56), settings)
    expected = upsample_receptive_field(acts, (40, 56), (8, 8), (3, 2.5))
    np.testing.assert_allclose(drawn, expected, atol=1e-5)
    assert np.abs(report._upsample(acts, (40, 56)) - expected).max() > 0.05  # bilinear would differ
    # at thumbnail size: the same surface, sampled at the thumbnail's pixel centres
    thumb = report._upsample(acts, (20, 28), settings)
    np.testing.assert_allclose(thumb, expected[..., 1::2, 1::2], atol=1e-5)


def test_draw_masks_outline_and_dimming():
    rgb = np.full((1, 8, 8, 3), 200, np.uint8)
    bright = report._pack_rgbx(rgb)
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:6, 2:6] = True

    def pixel(words, y, x):
        return tuple(words[..., None].view(np.uint8)[0, y, x, :3])
    out = report._draw_masks(bright, masks)
    assert pixel(out, 3, 3) == (200, 200, 200)                   # interior
    assert pixel(out, 2, 3) == report.OUTLINE_RGB                # inner edge
    assert pixel(out, 1, 3) == report.OUTLINE_RGB                # outer edge
    assert pixel(out, 0, 0) == (60, 60, 60)                      # dimmed: 200 * 77 >> 8
    full = report._draw_masks(bright, np.ones((1, 8, 8), bool))
    assert (full == bright).all()                                # no outline on the border


def test_dataset_none_opens_broden_from_meta(result, monkeypatch):
    result_dir, dataset = result
    opened = []

    class FakeBrodenModule:
        @staticmethod
        def Broden(path):
            opened.append(path)
            return dataset
    monkeypatch.setitem(sys.modules, "netdissect_fast.broden", FakeBrodenModule)
    report.write_report(result_dir)
    assert opened == [str(result_dir.parent / "images")]


def test_rerender_removes_stale_strips(result):
    result_dir, dataset = result
    stale = result_dir / "report_images" / "unit_9999.jpg"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    report.write_report(result_dir, dataset)
    assert not stale.exists()


def test_summary_without_units_is_derived_from_iou(result):
    result_dir, dataset = result
    summary = json.loads((result_dir / "summary.json").read_text())
    expected = {u["unit"]: u["label_name"] for u in summary.pop("units")}
    (result_dir / "summary.json").write_text(json.dumps(summary))
    page = report.write_report(result_dir, dataset).read_text()
    shown = dict(re.findall(r'data-unit="(\d+)" data-label="([^"]+)"', page))
    assert {int(k): v for k, v in shown.items()} == expected


def test_result_saved_without_maps_shows_plain_images(result):
    result_dir, dataset = result
    with np.load(result_dir / "results.npz") as npz:
        arrays = dict(npz)
    arrays["top_maps"] = None                        # TopImages without map_shape
    np.savez(result_dir / "results.npz", **arrays)
    page = report.write_report(result_dir, dataset).read_text()
    assert len(unit_rows(page)) == 20
    with Image.open(result_dir / "report_images" / "unit_0000.jpg") as im:
        strip = np.asarray(im).astype(int)
    first = dataset.image(int(arrays["top_indices"][0, 0])).resize((96, 96), Image.Resampling.BILINEAR)
    assert np.abs(strip[:, :96] - np.asarray(first)).mean() < 4     # undimmed, no outline


def test_inclusive_threshold_counts_equal_iou_as_detector(result):
    result_dir, dataset = result
    summary = json.loads((result_dir / "summary.json").read_text())
    summary["units"][0]["iou"] = 0.04
    summary["inclusive"] = True
    (result_dir / "summary.json").write_text(json.dumps(summary))
    page = report.write_report(result_dir, dataset).read_text()
    detectors_part = page.split('<tbody class="units below">')[0]
    assert 0 in [int(u) for u, _ in unit_rows(detectors_part)]


def test_end_to_end_with_generated_broden(tmp_path):
    """make_broden -> Broden -> score -> DissectionResult.save (which writes the report),
    then write_report again opening the dataset from the saved meta."""
    import netdissect_fast as ndf
    from netdissect_fast.datasets import make_broden
    root = make_broden(tmp_path / "broden", 16, size=64, workers=1)
    ds = ndf.Broden(str(root))
    acts = np.random.default_rng(0).gamma(1.0, 1.0, (len(ds), 6, 4, 4)).astype(np.float32)
    res = ndf.score(acts, ds, progress=False)
    result_dir = res.save(tmp_path / "result", dataset=ds)
    first = (result_dir / "report.html").read_text()
    assert len(unit_rows(first)) == 6
    (result_dir / "report.html").unlink()
    page = report.write_report(result_dir).read_text()
    assert page == first
    assert len(list((result_dir / "report_images").glob("unit_*.jpg"))) == 6


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        report.write_report(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="results.npz"):
        report.write_report(tmp_path)


def test_out_of_range_image_names_results_file(result):
    result_dir, dataset = result
    small = StubDataset(dataset.image_paths[:3], dataset.image_shape)
    with pytest.raises(ValueError, match="results.npz"):
        report.write_report(result_dir, small)


def test_comparison_page(tmp_path):
    make_images(tmp_path / "images", 30)
    dirs = [make_fake_result(tmp_path / name, tmp_path / "images", seed=i, layer=name)
            for i, name in enumerate(["layer2", "layer3", "layer4"])]
    dataset = make_images(tmp_path / "images", 30)
    report.write_report(dirs[0], dataset)
    out = report.write_comparison(dirs, tmp_path / "cmp" / "comparison.html")
    page = out.read_text()
    assert (tmp_path / "cmp" / "comparison_images" / "comparison.svg").is_file()
    assert page.count("<tr><td>") == 3
    assert '<a href="../layer2/report.html">fakenet layer2</a>' in page
    assert not re.search(r"https?:", page)
    for d in dirs:
        unique = json.loads((d / "summary.json").read_text())["unique_detectors"]
        assert f"<td class=\"n\">{sum(unique.values())}</td>" in page
    with pytest.raises(ValueError, match="result_dirs"):
        report.write_comparison([], tmp_path / "x.html")
