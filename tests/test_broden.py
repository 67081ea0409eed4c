"""Broden reader: the contract of docs/ARCHITECTURE.md and every validation error."""
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from netdissect_fast.broden import Broden, BrodenError, BrodenWarning
from netdissect_fast.datasets import LABEL, encode_label_png, make_broden


@pytest.fixture
def broken(small_broden, tmp_path):
    """A private copy of the small dataset, to break."""
    root = tmp_path / "broden"
    shutil.copytree(small_broden.path, root, ignore=shutil.ignore_patterns(".ndf_cache"))
    return root


def _lines(root, name="index.csv"):
    return (root / name).read_text().splitlines()


def _write_lines(root, lines, name="index.csv"):
    (root / name).write_text("\n".join(lines) + "\n")


def _first_png(root, row=1, column="object"):
    header = _lines(root)[0].split(",")
    return root / "images" / _lines(root)[row].split(",")[header.index(column)].split(";")[0]


def test_contract(small_broden):
    ds = Broden(small_broden, store=None)
    L = ds.num_labels
    assert ds.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert L == len(ds.label_names) == max(LABEL.values()) + 1 and ds.label_names[0] == "-"
    assert ds.label_names[LABEL["window"]] == "window"
    assert ds.primary_category.dtype == np.int16 and ds.primary_category.shape == (L,)
    assert ds.primary_category[0] == -1 and not ds.label_keep[0]
    assert np.array_equal(ds.label_keep, ds.primary_category >= 0)
    assert not ds.label_keep[LABEL["black"] + 20]          # an unused filler label: in no category
    assert ds.primary_category[LABEL["street"]] == ds.categories.index("scene")
    assert ds.primary_category[LABEL["roof"]] == ds.categories.index("part")
    assert len(ds.image_paths) == len(ds) and ds.image(3).mode == "RGB"
    assert ds.image_paths[3].endswith(".jpg") and ds.image(3).size == ds.image_shape[::-1]
    assert all(p.dtype == np.int32 and p.shape == ds.seg_shape for _, p in ds.planes(0))
    with pytest.raises(IndexError):
        ds.planes(len(ds))


def test_selection_drops_rows_and_labels(small_broden):
    tex = Broden(small_broden, categories=["texture"], store=None)
    with_texture = [i for i, t in enumerate(small_broden.truth)
                    if any(c == "texture" for c, _ in t["image_labels"])]
    assert 0 < len(tex) == len(with_texture) < 40
    assert tex.image_paths == [Broden(small_broden, store=None).image_paths[i] for i in with_texture]
    assert tex.label_keep.sum() == 4 and tex.planes(0) == []
    obj = Broden(small_broden, categories=("part", "object"), store=None)
    assert obj.categories == ["object", "part"]                  # category.csv order
    assert obj.label_keep[LABEL["window"]] and obj.label_keep[LABEL["wheel"]]
    assert not obj.label_keep[LABEL["brick"]] and not obj.label_keep[LABEL["black"]]
    with pytest.raises(ValueError, match="'colour'"):
        Broden(small_broden, categories=["object", "colour"])


def test_primary_category_uses_coverage_ties_go_later(broken):
    # window: object and part; make part cover more, then tie.
    def set_coverage(cat, value):
        lines = _lines(broken, f"c_{cat}.csv")
        for k, line in enumerate(lines):
            f = line.split(",")
            if f[2] == "window":
                f[4] = value
                lines[k] = ",".join(f)
        _write_lines(broken, lines, f"c_{cat}.csv")
    set_coverage("object", "0.5")
    set_coverage("part", "0.7")
    assert Broden(broken, store=None).primary_category[LABEL["window"]] == 2
    set_coverage("part", "0.5")
    assert Broden(broken, store=None).primary_category[LABEL["window"]] == 2   # tie: later
    set_coverage("object", "0.9")
    assert Broden(broken, store=None).primary_category[LABEL["window"]] == 1
    # Selecting only one of its categories decides it.
    assert Broden(broken, categories=["part"], store=None).primary_category[LABEL["window"]] == 0


def test_store_and_decoded_batches_agree(small_broden):
    with Broden(small_broden) as packed:
        decoded = Broden(small_broden, store=None)
        for idx in (np.arange(40), [7, 3, 3, 39, 0], [12]):
            a, b = packed.label_batch(idx), decoded.label_batch(idx)
            for name in a.__dataclass_fields__:
                assert np.array_equal(getattr(a, name), getattr(b, name)), name
            a.validate(packed.num_labels)
        clone = pickle.loads(pickle.dumps(packed))    # e.g. for DataLoader workers
        assert np.array_equal(clone.label_batch([5]).pixel_sets, decoded.label_batch([5]).pixel_sets)
        clone.close()


def test_fingerprint(small_broden, broken):
    a = Broden(broken, store=None)
    assert a.fingerprint() == Broden(broken, store=None).fingerprint()
    assert a.fingerprint() != Broden(broken, categories=["object"], store=None).fingerprint()
    (broken / "label.csv").write_text((broken / "label.csv").read_text() + "\n")
    assert a.fingerprint() != Broden(broken, store=None).fingerprint()


def test_variant_227(tmp_path):
    ds = Broden(make_broden(tmp_path / "b227", 4, size=227, seg_size=113))
    assert ds.seg_shape == (113, 113) and ds.label_batch([0, 3]).pixel_sets.shape == (2, 113, 113)
    ds.close()


# -- validation: every problem raises naming the file (and row); warn skips and counts --
def _break_missing_png(root):
    _first_png(root, 2).unlink()
    return "img_000002_object.png", "row 3"


def _break_unreadable_png(root):
    _first_png(root, 2).write_bytes(b"not a png")
    return "img_000002_object.png", "row 3"


def _break_png_size(root):
    with Image.open(_first_png(root, 2)) as im:
        im.resize((20, 20)).save(_first_png(root, 2))
    return "img_000002_object.png", "20x20"


def _break_png_label(root):
    plane = np.full((48, 48), 300, np.int32)
    plane[0, 0] = 4000
    encode_label_png(plane).save(_first_png(root, 2))
    return "img_000002_object.png", "label number 4000"


PNG_BREAKS = [_break_missing_png, _break_unreadable_png, _break_png_size, _break_png_label]


@pytest.mark.parametrize("breaker", PNG_BREAKS)
def test_png_problems_raise(broken, breaker):
    file, detail = breaker(broken)
    ds = Broden(broken, store=None)
    for call in (lambda: ds.planes(1), ds.validate, lambda: ds.label_batch([0, 1])):
        with pytest.raises(BrodenError, match=file) as e:
            call()
        assert detail in str(e.value) or "row 3" in str(e.value)
    with pytest.raises(BrodenError, match=file):
        Broden(broken).label_batch([0])          # the store build reads every PNG


@pytest.mark.parametrize("breaker", PNG_BREAKS)
def test_png_problems_warn_and_skip(broken, breaker, capsys):
    file, _ = breaker(broken)
    ds = Broden(broken, store=None, on_error="warn")
    with pytest.warns(BrodenWarning, match=file):
        planes = ds.planes(1)
    assert "object" not in dict(planes) and "color" in dict(planes)
    report = ds.validate()
    assert not report.ok and len(report.problems) == 1 and file in report.problems[0]
    assert "1 problem(s) skipped" in str(report) and file in capsys.readouterr().out
    with pytest.warns(BrodenWarning, match=file):
        with Broden(broken, on_error="warn") as packed:
            a = packed.label_batch(np.arange(len(packed)))
            assert len(packed.label_store.problems) == 1
    b = ds.label_batch(np.arange(len(ds)))
    assert np.array_equal(a.pixel_sets, b.pixel_sets) and np.array_equal(a.set_labels, b.set_labels)


def _break_malformed_row(root):
    lines = _lines(root)
    lines[3] = lines[3].rsplit(",", 2)[0]
    _write_lines(root, lines)
    return "index.csv row 4: malformed"


def _break_malformed_shape(root):
    lines = _lines(root)
    f = lines[3].split(",")
    f[4] = "forty"
    lines[3] = ",".join(f)
    _write_lines(root, lines)
    return "index.csv row 4: malformed ih/iw/sh/sw"


def _break_image_label(root):
    lines = _lines(root)
    f = lines[3].split(",")
    f[10] = "9999"                             # scene
    lines[3] = ",".join(f)
    _write_lines(root, lines)
    return "index.csv row 4: label 9999 (category scene) is not in label.csv"


CSV_BREAKS = [_break_malformed_row, _break_malformed_shape, _break_image_label]


@pytest.mark.parametrize("breaker", CSV_BREAKS)
def test_csv_row_problems(broken, breaker):
    message = re.escape(breaker(broken))
    with pytest.raises(BrodenError, match=message):
        Broden(broken)
    with pytest.warns(BrodenWarning, match=message):
        ds = Broden(broken, store=None, on_error="warn")
    assert len(ds) == 39 and len(ds.problems) == 1
    assert "img_000003.jpg" not in " ".join(ds.image_paths)
    assert len(ds.validate().problems) == 1     # counted once, not warned again


def test_unknown_category_in_label_csv(broken):
    lines = _lines(broken, "label.csv")
    lines[5] = lines[5].replace("color(", "colour(")
    _write_lines(broken, lines, "label.csv")
    with pytest.raises(BrodenError, match=r"label.csv row 6: unknown category 'colour'"):
        Broden(broken)


def test_c_file_label_not_in_label_csv(broken):
    (broken / "c_texture.csv").write_text((broken / "c_texture.csv").read_text() + "9,500,bogus,1,1\n")
    with pytest.raises(BrodenError, match=r"c_texture.csv row \d+: label number 500 is not in label.csv"):
        Broden(broken)


def test_missing_files(broken):
    (broken / "c_part.csv").unlink()
    with pytest.raises(BrodenError, match="c_part.csv"):
        Broden(broken)
    assert len(Broden(broken, categories=["object"], store=None)) == 40
    jpg = broken / "images" / _lines(broken)[5].split(",")[0]
    jpg.unlink()
    ds = Broden(broken, categories=["object"], store=None)
    with pytest.raises(BrodenError, match="img_000005.jpg"):
        ds.image(4)
    with pytest.raises(BrodenError, match="img_000005.jpg.*row 6"):
        ds.validate()
    with pytest.raises(BrodenError, match="not a directory"):
        Broden(broken / "nowhere")


def test_shapes_must_be_uniform(broken):
    lines = _lines(broken)
    f = lines[7].split(",")
    f[4:6] = ["40", "40"]
    lines[7] = ",".join(f)
    _write_lines(broken, lines)
    with pytest.raises(BrodenError, match=r"index.csv row 8: .*differs"):
        Broden(broken)
