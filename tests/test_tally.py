"""The fused tally against the dense reference of tests/reference.py (torch
interpolate, boolean masks, per-plane bincounts): every count must be equal."""
import types
import zlib

import numpy as np
import pytest
import torch

import netdissect_fast as ndf
from netdissect_fast.tally import Tally
from reference import reference_tally, upsample_bilinear, upsample_receptive_field
from synthetic import StubDataset, random_dataset, smooth_activations


@pytest.fixture(autouse=True, params=["any K", "slots from K=0"])
def slot_counter_bar(request, monkeypatch):
    """Every test twice: with the CPU's own choice (the AVX-512 slot counter only
    from 1,024 units, so the set counter at these sizes; the adds into I logged
    over the whole batch) and with the slot counter wherever the CPU has it and
    the adds applied as soon as a map's are logged."""
    if request.param == "slots from K=0":
        monkeypatch.setenv("NDF_SLOT_MIN_UNITS", "0")
        monkeypatch.setenv("NDF_ADD_LOG_LIMIT", "1")


def run(ds, acts, thresholds, rule="paper", bs=4, device="cpu", threads=None, order=None, **kw):
    t = Tally(ds, thresholds, rule=rule, device=device, threads=threads, **kw)
    idx = np.arange(len(ds)) if order is None else np.asarray(order)
    for s in range(0, len(idx), bs):
        part = idx[s:s + bs]
        t.update(acts[part], part)
    return t


def thresholds_for(acts, q=0.99):
    """Thresholds equal to activation values (ties at the threshold) plus one
    unit whose threshold is its maximum (never fires)."""
    flat = np.moveaxis(acts, 1, 0).reshape(acts.shape[1], -1).astype(np.float64)
    thr = np.quantile(flat, q, axis=1, method="lower")
    thr[-1] = flat[-1].max()
    return thr


def assert_counts(t, acts, ds, thr, rule, upsampled=None):
    I, A, G = reference_tally(acts, thr, ds.images, ds.primary_category, len(ds.categories), rule,
                              upsampled=upsampled, seg_shape=ds.seg_shape)
    np.testing.assert_array_equal(t.intersection, I)
    np.testing.assert_array_equal(t.cat_activation, A)
    np.testing.assert_array_equal(t.label_pixels, G)
    assert I.sum() > 0 or np.all(thr >= acts.max())


SHAPES = [((7, 7), (112, 112)), ((13, 13), (113, 113)), ((14, 14), (192, 192)), ((28, 28), (112, 112)),
          ((1, 1), (112, 112)), ((3, 5), (40, 57)), ((6, 4), (17, 30)), ((7, 7), (7, 7)),
          ((20, 9), (100, 45)), ((33, 8), (66, 40)),  # tall maps: fused counter up to 32 rows, span-wise past it
          ((6, 9), (40, 300))]  # over 16 chunks of 16 columns: the slot counter without ChunkEnds


@pytest.mark.parametrize("rule", ["paper", "netdissect-lite"])
@pytest.mark.parametrize("map_shape,seg_shape", SHAPES)
def test_counts_equal_dense_reference(map_shape, seg_shape, rule):
    rng = np.random.default_rng(zlib.crc32(repr((map_shape, seg_shape, rule)).encode()))
    ds = random_dataset(rng, n_images=6, seg_shape=seg_shape, block=max(3, seg_shape[0] // 8))
    acts = smooth_activations(rng, 6, 5, *map_shape)
    thr = thresholds_for(acts)
    assert_counts(run(ds, acts, thr, rule), acts, ds, thr, rule)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bs", [1, 3, 8])
def test_threads_batch_size_and_order_do_not_change_counts(threads, bs):
    rng = np.random.default_rng(11)
    ds = random_dataset(rng, n_images=8)
    acts = smooth_activations(rng, 8, 6, 7, 7)
    thr = thresholds_for(acts)
    base = run(ds, acts, thr, bs=8, threads=1)
    other = run(ds, acts, thr, bs=bs, threads=threads, order=rng.permutation(8))
    for name in ("intersection", "cat_activation", "label_pixels"):
        np.testing.assert_array_equal(getattr(other, name), getattr(base, name))


def test_merged_shards_equal_one_pass_and_state_round_trip():
    rng = np.random.default_rng(12)
    ds = random_dataset(rng, n_images=9)
    acts = smooth_activations(rng, 9, 4, 7, 7)
    thr = thresholds_for(acts)
    whole = run(ds, acts, thr)
    a = Tally(ds, thr, device="cpu").update(acts[:4], np.arange(4))
    b = Tally(ds, thr, device="cpu").update(acts[4:], np.arange(4, 9))
    a.merge(Tally.from_state(b.state_dict(), ds, device="cpu"))
    for name in ("intersection", "cat_activation", "label_pixels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(whole, name))
    assert a.images == 9


@pytest.mark.parametrize("map_shape", [(7, 7), (8, 8)])  # 8x8: whole vectors of 16, no zero-padded tail
def test_negative_activations_and_thresholds(map_shape):
    """Units whose maps are all negative and whose thresholds are negative too
    (pre-ReLU features): a map's skip test may not take 0 for "cannot exceed"."""
    rng = np.random.default_rng(15)
    ds = random_dataset(rng, n_images=6)
    acts = smooth_activations(rng, 6, 5, *map_shape)
    neg = rng.standard_normal((6, 3) + map_shape).astype(np.float32) - 4
    acts[:, :3] = np.minimum(neg, -0.5)  # every value of units 0-2 below zero
    acts[:, 3] -= acts[:, 3].max() / 2  # unit 3 of either sign
    thr = thresholds_for(acts, q=0.9)
    assert np.all(thr[:3] < 0) and np.all(acts[:, :3].max(axis=(2, 3)) < 0)
    assert_counts(run(ds, acts, thr), acts, ds, thr, "paper")


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_half_precision_activations(dtype):
    rng = np.random.default_rng(13)
    ds = random_dataset(rng, n_images=5)
    a32 = smooth_activations(rng, 5, 4, 7, 7)
    if dtype == "bfloat16":
        acts = torch.from_numpy(a32).to(torch.bfloat16)
        ref = acts.float().numpy()
    else:
        acts = a32.astype(np.float16)
        ref = acts.astype(np.float32)
    thr = thresholds_for(ref)
    assert_counts(run(ds, acts, thr), ref, ds, thr, "paper")


def test_mask_is_bit_identical_to_torch_threshold():
    """One label covering every pixel: I = |M| = count(interpolate(a) > T) exactly,
    for thresholds placed exactly on upsampled values."""
    rng = np.random.default_rng(14)
    from synthetic import StubDataset
    n, k, seg = 6, 8, (112, 112)
    images = [(np.ones((1,) + seg, np.int64), []) for _ in range(n)]
    ds = StubDataset(images, [-1, 0], ["c"], seg)
    acts = rng.standard_normal((n, k, 7, 7)).astype(np.float32)
    up = upsample_bilinear(acts, seg)
    thr = np.array([np.sort(up[:, j].ravel())[-(j + 1) * 500] for j in range(k)], np.float64)
    t = run(ds, acts, thr)
    expect = (up > thr.astype(np.float32)[None, :, None, None]).sum(axis=(0, 2, 3))
    np.testing.assert_array_equal(t.intersection[:, 1], expect)


@pytest.mark.parametrize("map_shape,seg_shape", [((7, 7), (112, 112)), ((13, 13), (113, 113)), ((5, 40), (64, 200))])
def test_maps_within_ulps_of_the_threshold(map_shape, seg_shape):
    """Values a few ulps apart around the threshold, and rows alternating above and
    below it: which pixels exceed T is decided by rounding, inside the kernel's
    skipping margin, and a cell span's mask can start at both of its edges. The
    counts must still be the dense reference's, pixel for pixel."""
    rng = np.random.default_rng(zlib.crc32(repr(map_shape).encode()))
    n, k = 5, 6
    h, w = map_shape
    ulps = rng.integers(-3, 4, (n, k, h, w)).astype(np.float32)
    acts = np.float32(1.0) + ulps * np.float32(2.0 ** -23)
    rows = np.where(np.arange(h) % 2 == 0, 1.0, -1.0).astype(np.float32)[:, None]
    acts[:, 1] = 1.0 + rows * (1e-3 + rng.random((n, h, w)).astype(np.float32) * 1e-3)  # edges hot, dip between
    cols = np.where(np.arange(w) % 3 == 0, 1.0, -1.0).astype(np.float32)[None, :]
    acts[:, 2] = 1.0 + rows * cols * np.float32(2.0 ** -22)  # lanes rising and falling in one chunk
    acts = acts.astype(np.float32)
    up = upsample_bilinear(acts, seg_shape)
    levels = [np.unique(up[:, j]) for j in range(k)]  # thresholds on upsampled values: ties too
    thr = np.array([lv[len(lv) * (j + 3) // (k + 4)] for j, lv in enumerate(levels)], np.float64)
    images = [(np.ones((1,) + seg_shape, np.int64), []) for _ in range(n)]
    whole = run(StubDataset(images, [-1, 0], ["c"], seg_shape), acts, thr)
    expect = (up > thr.astype(np.float32)[None, :, None, None]).sum(axis=(0, 2, 3))
    assert expect.min() > 0
    np.testing.assert_array_equal(whole.intersection[:, 1], expect)
    ds = random_dataset(rng, n_images=n, seg_shape=seg_shape, block=5)
    assert_counts(run(ds, acts, thr), acts, ds, thr, "paper", upsampled=up)


def test_receptive_field_mode_matches_its_reference():
    rng = np.random.default_rng(15)
    ds = random_dataset(rng, n_images=5, seg_shape=(112, 112))
    acts = smooth_activations(rng, 5, 4, 7, 7)
    thr = thresholds_for(acts)
    stride, offset = (16.0, 16.0), (10.0, 6.5)
    up = upsample_receptive_field(acts, (112, 112), stride, offset)
    t = run(ds, acts, thr, upsample="receptive_field", receptive_field=(stride, offset))
    assert_counts(t, acts, ds, thr, "paper", upsampled=up)


@pytest.mark.parametrize("rule", ["paper", "netdissect-lite"])
def test_a_label_on_two_planes_counts_twice_and_noisy_labels(rule):
    """Pixels holding the same label on two planes count twice (the reference
    counts per plane), next to single-pixel label noise on every plane."""
    rng = np.random.default_rng(18)
    sh, sw = 112, 112
    primary = np.array([-1, 0, 0, 1, 2, 1, 3, 2], np.int16)
    images = []
    for i in range(5):
        planes = rng.integers(1, 8, (3, sh // 8, sw // 8)).repeat(8, 1).repeat(8, 2)
        planes[1, 20:70, 10:90] = planes[0, 20:70, 10:90] = 5  # label 5 on planes 0 and 1
        planes[2, 30:60, 30:60] = 5                             # ... and on all three here
        noise = rng.random((3, sh, sw)) < 0.3
        planes = np.where(noise, rng.integers(0, 8, (3, sh, sw)), planes)
        images.append((planes, [int(rng.integers(1, 8))]))
    ds = StubDataset(images, primary, ["c0", "c1", "c2", "c3"], (sh, sw))
    acts = smooth_activations(rng, 5, 4, 7, 7)
    thr = thresholds_for(acts, q=0.9)
    t = run(ds, acts, thr, rule)
    assert_counts(t, acts, ds, thr, rule)
    assert t.intersection[:, 5].sum() > 0


@pytest.mark.parametrize("map_shape", [(1, 1), (2, 2)])
def test_masks_covering_every_label_set_of_their_image(map_shape):
    """Few label sets per image, masks over whole images: every set and label of an
    image is counted by one map, in every order (the kernel's touched lists fill up;
    CI runs this under AddressSanitizer)."""
    rng = np.random.default_rng(21)
    sh, sw = 48, 40
    primary = np.array([-1, 0, 1, 0], np.int16)
    images = []
    for i in range(6):
        planes = np.zeros((2, sh, sw), np.int64)
        planes[0, :, (i % 3) * 5:] = 1 + i % 2                    # unlabelled columns, then a or b
        planes[1, (i * 7) % sh:, :] = 3                          # and c on a band of rows
        planes[:, rng.random((sh, sw)) < 0.05] = 0                 # unlabelled specks
        images.append((planes, []))
    ds = StubDataset(images, primary, ["c0", "c1"], (sh, sw))
    acts = np.abs(smooth_activations(rng, 6, 3, *map_shape)) + 1.0
    thr = np.zeros(3)                                              # every pixel of every map counts
    for rule in ("paper", "netdissect-lite"):
        for bs in (1, 6):
            assert_counts(run(ds, acts, thr, rule, bs=bs), acts, ds, thr, rule)


def labels_per_image_dataset(rng, counts, seg_shape, num_labels=400):
    """One image per entry of `counts`: plane 0 holds that many distinct labels
    (every one on some pixel), plane 1 repeats plane 0 on a small patch (a label
    on two planes is two of the slot counter's slots: a few more per image), plane
    2 is sparse noise from the same labels."""
    sh, sw = seg_shape
    primary = rng.integers(-1, 3, num_labels).astype(np.int16)
    primary[0] = -1
    images = []
    for n in counts:
        pool = rng.choice(np.arange(1, num_labels), n, replace=False)
        p0 = pool[rng.integers(0, n, (-(-sh // 4), -(-sw // 4)))].repeat(4, 0).repeat(4, 1)[:sh, :sw]
        p0.flat[rng.choice(sh * sw, n, replace=False)] = pool  # every label somewhere
        p1 = np.zeros_like(p0)
        p1[sh // 4: sh // 4 + 4, :16] = p0[sh // 4: sh // 4 + 4, :16]
        p2 = np.where(rng.random((sh, sw)) < 0.003, pool[rng.integers(0, n, (sh, sw))], 0)
        images.append((np.stack([p0, p1, p2]), [int(rng.integers(1, num_labels))]))
    return StubDataset(images, primary, ["c0", "c1", "c2"], seg_shape)


@pytest.mark.parametrize("map_shape,seg_shape", [((7, 7), (112, 112)), ((13, 13), (113, 113)),
                                                 ((14, 14), (112, 120)), ((3, 5), (72, 113))])
@pytest.mark.parametrize("rule", ["paper", "netdissect-lite"])
def test_counts_for_every_number_of_labels_per_image(map_shape, seg_shape, rule):
    """From 1 to 120 labels per image: the AVX-512 counter per label slot (up to 32
    and 64 slots per image) and per label set (past that) on neighbouring images
    of one batch, with masks over partial 16-pixel words at the row ends."""
    rng = np.random.default_rng(zlib.crc32(repr((map_shape, seg_shape, rule)).encode()))
    counts = [1, 5, 20, 28, 32, 33, 45, 60, 64, 65, 80, 120]
    ds = labels_per_image_dataset(rng, counts, seg_shape)
    acts = smooth_activations(rng, len(counts), 6, *map_shape)
    thr = thresholds_for(acts, q=0.9)
    assert_counts(run(ds, acts, thr, rule, bs=5), acts, ds, thr, rule)


@pytest.mark.parametrize("seg_shape", [(255, 257), (256, 256)])
def test_whole_image_masks_at_the_16_bit_count_limit(seg_shape):
    """Masks covering whole images of 65,535 and 65,536 pixels: the slot counter's
    16-bit per-map counts hold the first, the second takes the set counter."""
    rng = np.random.default_rng(22)
    sh, sw = seg_shape
    planes = np.stack([np.full((sh, sw), 3), np.where(np.arange(sw) < sw // 2, 4, 5)[None].repeat(sh, 0)])
    ds = StubDataset([(planes, [2]), (planes[:1], [])], [-1, 0, 0, 1, 1, 0], ["c0", "c1"], seg_shape)
    acts = np.abs(smooth_activations(rng, 2, 2, 5, 5)) + 1.0
    thr = np.zeros(2)
    t = run(ds, acts, thr, "paper", bs=2)
    assert_counts(t, acts, ds, thr, "paper")
    assert t.intersection[0, 3] == 2 * sh * sw


def test_images_without_pixel_labels_and_image_level_only():
    rng = np.random.default_rng(16)
    ds = random_dataset(rng, n_images=6, max_planes=0)
    acts = smooth_activations(rng, 6, 3, 7, 7)
    thr = thresholds_for(acts)
    assert_counts(run(ds, acts, thr, "netdissect-lite"), acts, ds, thr, "netdissect-lite")


def test_score_runs_quantiles_then_tally():
    rng = np.random.default_rng(17)
    ds = random_dataset(rng, n_images=10)
    acts = smooth_activations(rng, 10, 4, 7, 7)
    res = ndf.score(acts, ds, device="cpu", progress=False, batch_size=3, top_n=0)
    ref_thr = np.quantile(np.moveaxis(acts, 1, 0).reshape(4, -1).astype(np.float64), 0.995, axis=1)
    np.testing.assert_array_equal(res.thresholds, ref_thr)
    I, A, G = reference_tally(acts, ref_thr, ds.images, ds.primary_category, 4, "paper", seg_shape=(112, 112))
    np.testing.assert_array_equal(res.intersection, I)
    np.testing.assert_array_equal(res.label_pixels, G)
    lite = ndf.score(acts, ds, rule="netdissect-lite", device="cpu", progress=False, top_n=0)
    assert lite.meta["settings"]["q"] == 994 / 999
    # iterable input and a torch tensor give the same counts
    it = ndf.score([(np.arange(s, min(10, s + 4)), acts[s:s + 4]) for s in range(0, 10, 4)], ds,
                   thresholds=ref_thr, device="cpu", progress=False, top_n=0)
    np.testing.assert_array_equal(it.intersection, I)
    tt = ndf.score(torch.from_numpy(acts), ds, device="cpu", progress=False, top_n=0)
    np.testing.assert_array_equal(tt.intersection, I)


def test_score_of_an_iterable_sizes_the_tail_for_the_dataset(monkeypatch):
    """Without a row count, the quantile tail is sized for len(dataset) images:
    exact for a pass over the dataset (or a part of it); rows beyond that (here a
    repeated batch) are flagged as approximate, never silently wrong."""
    from netdissect_fast import tally as tally_mod
    rng = np.random.default_rng(21)
    ds = random_dataset(rng, n_images=10)
    acts = smooth_activations(rng, 10, 4, 7, 7)
    totals = []

    class Recording(tally_mod.QuantileSketch):
        def __init__(self, *a, **kw):
            totals.append(kw.get("total"))
            super().__init__(*a, **kw)
    monkeypatch.setattr(tally_mod, "QuantileSketch", Recording)

    def batches(rows):
        return (lambda: ((np.array(r), acts[r]) for r in rows))
    whole = ndf.score(batches([[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]), ds, device="cpu", progress=False, top_n=0)
    assert totals[-1] == 10 * 49 and whole.meta["settings"]["quantile_exact"]
    ref = np.quantile(np.moveaxis(acts, 1, 0).reshape(4, -1).astype(np.float64), 0.995, axis=1)
    np.testing.assert_array_equal(whole.thresholds, ref)
    part = ndf.score(batches([[2, 5, 7]]), ds, device="cpu", progress=False, top_n=0)
    assert part.meta["settings"]["quantile_exact"]
    sub = np.moveaxis(acts[[2, 5, 7]], 1, 0).reshape(4, -1).astype(np.float64)
    np.testing.assert_array_equal(part.thresholds, np.quantile(sub, 0.995, axis=1))
    # 13 rows for a 10-image dataset: the tail kept for 10 is too short for 13
    more = ndf.score(batches([list(range(10)), [0, 1, 2]]), ds, device="cpu", progress=False, top_n=0)
    s = more.meta["settings"]
    assert not s["quantile_exact"] and 0 < s["rank_error_bound"] < 0.01


def test_bad_input_is_named():
    rng = np.random.default_rng(18)
    ds = random_dataset(rng, n_images=4)
    acts = smooth_activations(rng, 4, 3, 7, 7)
    thr = thresholds_for(acts)
    with pytest.raises(ValueError, match="3 units but 2 thresholds"):
        Tally(ds, thr[:2], device="cpu").update(acts, np.arange(4))
    with pytest.raises(ValueError, match="thresholds"):
        Tally(ds, [np.nan, 1, 2], device="cpu")
    with pytest.raises(ValueError, match="rule"):
        Tally(ds, thr, rule="nope")
    with pytest.raises(ValueError, match="upsample"):
        Tally(ds, thr, upsample="nearest")
    with pytest.raises(ValueError, match="image indices"):
        Tally(ds, thr, device="cpu").update(acts, np.arange(3))
    with pytest.raises(TypeError, match="float64"):
        Tally(ds, thr, device="cpu").update(acts.astype(np.float64), np.arange(4))
    bad = acts.copy()
    bad[2, 1, 3, 3] = np.inf
    t = Tally(ds, thr, device="cpu")
    with pytest.raises(ValueError, match=r"unit 1, batch position 2"):
        t.update(bad, np.arange(4))
    with pytest.raises(RuntimeError, match="unusable"):
        t.update(acts, np.arange(4))
    # a label number outside the label space, caught before anything is counted
    lb = ds.label_batch(np.arange(4))
    lb.set_labels = lb.set_labels.copy()
    lb.set_labels[0] = ds.num_labels + 5
    t = Tally(ds, thr, device="cpu")
    with pytest.raises(ValueError, match="label number outside the label space"):
        t.update(acts, np.arange(4), labels=lb)
    assert t.intersection.sum() == 0 and t.cat_activation.sum() == 0 and t.label_pixels.sum() == 0
    lb.set_labels[0] = 0  # "unlabelled" is not a label a set may hold
    with pytest.raises(ValueError, match=r"outside the label space \(0\)"):
        Tally(ds, thr, device="cpu").update(acts, np.arange(4), labels=lb)
    broken = ds.label_batch(np.arange(4))
    broken.set_label_start = broken.set_label_start.copy()
    broken.set_label_start[3] = broken.set_label_start[-1] + 100  # offsets out of order
    with pytest.raises(ValueError, match="inconsistent LabelBatch offsets"):
        Tally(ds, thr, device="cpu").update(acts, np.arange(4), labels=broken)
    huge = types.SimpleNamespace(batch=4, seg_shape=(65536, 65536))  # the per-map counts are uint32
    with pytest.raises(ValueError, match="65536x65536 pixels"):
        Tally(ds, thr, device="cpu").update(acts, np.arange(4), labels=huge)
    with pytest.raises(ValueError, match="rows but the dataset has"):
        ndf.score(acts[:3], ds, device="cpu", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        ndf.score(acts, ds, batch_size=0, device="cpu", progress=False)
    with pytest.raises(RuntimeError, match="CUDA is not usable"):
        Tally(ds, thr, device="cuda") if not ndf.backends()["cuda"]["usable"] else (_ for _ in ()).throw(
            RuntimeError("CUDA is not usable (skipped: a GPU is present)"))


def test_score_reads_h5py_and_memmap_in_batches(tmp_path):
    import h5py
    rng = np.random.default_rng(19)
    ds = random_dataset(rng, n_images=11)
    acts = smooth_activations(rng, 11, 4, 7, 7)
    ref = ndf.score(acts, ds, device="cpu", progress=False, top_n=3, batch_size=4)
    np.save(tmp_path / "a.npy", acts)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("acts", data=acts, chunks=(4, 4, 7, 7))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        dset = f["acts"]

        class Spy:  # an h5py dataset that records how many rows each read asks for
            shape, reads = dset.shape, []

            def __getitem__(self, key):
                self.reads.append(key.stop - key.start)
                return dset[key]
        spy = Spy()
        from_h5 = ndf.score(spy, ds, device="cpu", progress=False, top_n=3, batch_size=4)
    assert max(spy.reads) == 4  # never the whole array
    from_mm = ndf.score(mm, ds, device="cpu", progress=False, top_n=3, batch_size=4)
    for res in (from_h5, from_mm):
        np.testing.assert_array_equal(res.thresholds, ref.thresholds)
        np.testing.assert_array_equal(res.intersection, ref.intersection)
        np.testing.assert_array_equal(res.top.indices, ref.top.indices)
