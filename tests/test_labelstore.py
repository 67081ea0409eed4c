"""Packed label store: equal to the decoded PNGs, rebuilt when stale, resumable."""
import os
import shutil

import h5py
import numpy as np
import pytest

from netdissect_fast import labelstore
from netdissect_fast.broden import Broden
from netdissect_fast.labels import LabelBatch
from netdissect_fast.labelstore import LabelStore, default_store_path, encode_image_fast


@pytest.fixture
def copy(small_broden, tmp_path):
    root = tmp_path / "broden"
    shutil.copytree(small_broden.path, root, ignore=shutil.ignore_patterns(".ndf_cache"))
    return root


def assert_same(a: LabelBatch, b: LabelBatch):
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def decoded(root, **kw):
    ds = Broden(root, store=None, **kw)
    return ds.label_batch(np.arange(len(ds)))


def test_store_equals_decoded_pngs(small_broden):
    ds = Broden(small_broden)
    store = LabelStore.open_or_build(ds, progress=False)
    everything = decoded(small_broden)
    assert_same(store.take(np.arange(40)), everything)
    for idx in ([39, 0, 5, 5, 6, 7], [3], np.arange(10, 30)):
        assert_same(store.take(idx), everything.take(idx))
    # Consecutive rows are sliced, not gathered: equal to encoding just those images.
    for a, b in ((10, 30), (0, 40), (38, 40)):
        assert_same(store.take(np.arange(a, b)), decoded(small_broden).take(np.arange(a, b)))
        assert_same(everything.take(np.arange(a, b)), Broden(small_broden, store=None).label_batch(np.arange(a, b)))
    assert len(store) == 40 and store.seg_shape == (48, 48)
    store.close()
    ds.close()


def test_totals_and_category_mask_match_the_truth(small_broden):
    with Broden(small_broden) as ds:
        store = ds.label_store
        G = np.zeros(ds.num_labels, np.int64)
        for i, truth in enumerate(small_broden.truth):
            present = set()
            for _, plane in truth["planes"]:
                kept = plane[ds.label_keep[plane]]
                G += np.bincount(kept, minlength=ds.num_labels)
                present |= set(kept.tolist())
            for _, label in truth["image_labels"]:
                G[label] += 48 * 48
                present.add(label)
            mask = sum(1 << c for c in {int(ds.primary_category[n]) for n in present})
            assert store.category_mask[i] == mask
        assert store.label_pixels.dtype == np.int64 and np.array_equal(store.label_pixels, G)


@pytest.mark.parametrize("planes", [0, 1, 2, 3, 4, 5])
def test_fast_encoder_matches_encode_image(planes):
    rng = np.random.default_rng(planes)
    keep = rng.random(70000) < 0.9
    keep[0] = False
    stack = rng.choice([0, 3, 17, 300, 65535, 40000, 12], size=(planes, 9, 7)).astype(np.int32)
    args = (list(stack), [17, 3, 300])
    want = LabelBatch.encode_image(*args, keep=keep, seg_shape=(9, 7))
    got = encode_image_fast(*args, keep, (9, 7))
    assert_same(LabelBatch.from_images([got]), LabelBatch.from_images([want]))


def test_parallel_build_equals_serial(copy, tmp_path):
    ds = Broden(copy)
    serial = LabelStore.open_or_build(ds, tmp_path / "serial.h5", workers=0, progress=False)
    parallel = LabelStore.open_or_build(ds, tmp_path / "parallel.h5", workers=2, progress=False)
    assert_same(serial.take(np.arange(40)), parallel.take(np.arange(40)))
    assert np.array_equal(serial.label_pixels, parallel.label_pixels)
    serial.close()
    parallel.close()


def test_rebuilt_when_dataset_or_selection_changes(copy, capsys):
    def store_of(**kw):
        ds = Broden(copy, **kw)
        s = LabelStore.open_or_build(ds, progress=False)
        return ds, s
    ds, s = store_of()
    path = s.path
    assert path.parent == copy / ".ndf_cache" and path.name.startswith("labels-")
    s.close()
    _, s = store_of()                              # unchanged: reused
    s.close()
    assert "rebuilding" not in capsys.readouterr().err

    # A different selection has its own store.
    _, s = store_of(categories=["object"])
    assert s.path != path and s.take([0]).set_labels.max() < 272
    s.close()

    # Change a label plane and index.csv (new mtime): rebuilt, and the new content is used.
    lines = (copy / "index.csv").read_text().splitlines()
    lines[1] = lines[1].replace("_part_1.png", "_part_1.png;" + lines[2].split(",")[7])
    (copy / "index.csv").write_text("\n".join(lines) + "\n")
    ds, s = store_of()
    assert "rebuilding (changed: index.csv" in capsys.readouterr().err
    assert_same(s.take(np.arange(40)), decoded(copy))
    s.close()

    # A new file under images/ changes the listing.
    (copy / "images" / "world" / "extra.png").write_bytes(b"")
    _, s = store_of()
    assert "changed: images" in capsys.readouterr().err
    s.close()

    # on_error is part of what the store was built with.
    _, s = store_of(on_error="warn")
    assert "changed: on_error" in capsys.readouterr().err
    s.close()


def test_rebuilt_when_a_label_png_is_rewritten_in_place(copy, capsys):
    """Same file names, same index.csv: only the content (size/mtime) of one label
    PNG changes, and the store must not serve the old labels."""
    s = LabelStore.open_or_build(Broden(copy), progress=False)
    s.close()
    lines = (copy / "index.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("object")
    a, b = (line.split(",")[col].split(";")[0] for line in lines[1:3])
    assert a and b and a != b
    target = copy / "images" / a
    stat = target.stat()
    shutil.copyfile(copy / "images" / b, target)              # plane of image 1 now under image 0's name
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    s = LabelStore.open_or_build(Broden(copy), progress=False)
    assert "changed: images" in capsys.readouterr().err
    assert_same(s.take(np.arange(40)), decoded(copy))
    s.close()


def test_a_second_builder_waits_for_the_first(copy, capsys):
    """While another process holds the build lock, open_or_build waits; it then
    uses the store that process finished instead of writing the file twice."""
    import fcntl
    import threading

    ds = Broden(copy)
    path = default_store_path(ds)
    lock = open(path.with_name(path.name + ".lock"), "a")
    fcntl.flock(lock, fcntl.LOCK_EX)                    # "the other process"
    released = threading.Event()

    def finish_and_release():
        labelstore.build(ds, path, labelstore.store_record(ds), progress=False)
        released.set()
        fcntl.flock(lock, fcntl.LOCK_UN)

    timer = threading.Timer(1.0, finish_and_release)
    timer.start()
    s = LabelStore.open_or_build(ds, progress=False)    # blocks until the lock is released
    assert released.is_set()
    err = capsys.readouterr().err
    assert "waiting for another process" in err and "rebuilding" not in err
    assert_same(s.take(np.arange(40)), decoded(copy))
    s.close()
    timer.join()
    lock.close()


def test_interrupted_build_resumes(copy, monkeypatch):
    monkeypatch.setattr(labelstore, "CHUNK", 8)        # 5 chunks for 40 images
    real = labelstore.encode_chunk
    calls = []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(labelstore, "encode_chunk", crashing)
    ds = Broden(copy)
    path = default_store_path(ds)
    with pytest.raises(KeyboardInterrupt):
        LabelStore.open_or_build(ds, progress=False, workers=0)
    with h5py.File(path, "a") as f:
        assert f.attrs["done_chunks"] == 2 and not f.attrs["complete"]
        # A crash in the middle of a chunk leaves appended data past done_chunks.
        f["set_labels"].resize((f["set_labels"].shape[0] + 5,))
        f["set_pixels"].resize((f["set_pixels"].shape[0] + 3,))
    with pytest.raises(ValueError, match="incomplete"):
        LabelStore(path)

    calls.clear()
    monkeypatch.setattr(labelstore, "encode_chunk", lambda *a: (calls.append(1), real(*a))[1])
    store = LabelStore.open_or_build(Broden(copy), progress=False, workers=0)
    assert len(calls) == 3                              # only the chunks not yet written
    assert_same(store.take(np.arange(40)), decoded(copy))
    store.close()


def test_read_only_dataset_uses_user_cache(copy, tmp_path, monkeypatch):
    monkeypatch.setenv("NDF_CACHE_DIR", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(labelstore.os, "access",
                        lambda p, mode: False if str(p).startswith(str(copy)) else real_access(p, mode))
    with Broden(copy) as ds:
        assert ds.label_store.path.is_relative_to(tmp_path / "cache")
        assert_same(ds.label_batch([1, 2]), decoded(copy).take([1, 2]))
