"""QuantileSketch against numpy.quantile on float64 copies (SPEC §1.1): exact
equality, not closeness."""
import zlib

import numpy as np
import pytest
import torch

import netdissect_fast as ndf
from netdissect_fast.quantile import tail_size


def per_unit(x):
    """(N, K, ...) -> (K, N*...) float64, the values numpy's reference sees."""
    x = np.asarray(x)
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).astype(np.float64)


def numpy_thresholds(x, q):
    return np.quantile(per_unit(x), q, axis=1)


def feed(sketch, x, bs):
    for i in range(0, len(x), bs):
        sketch.update(x[i:i + bs])
    return sketch


CASES = {
    "normal": lambda r: r.standard_normal((40, 5, 7, 7)).astype(np.float32),
    "ties": lambda r: np.round(r.standard_normal((40, 5, 7, 7)) * 2).astype(np.float32),
    "zeros": lambda r: np.zeros((30, 3, 4, 4), np.float32),
    "constant": lambda r: np.full((30, 3, 4, 4), 2.5, np.float32),
    "negative": lambda r: -np.abs(r.standard_normal((30, 4, 3, 5))).astype(np.float32),
    "signed_zero": lambda r: np.where(r.random((20, 3, 4, 4)) < 0.5, -0.0, 0.0).astype(np.float32),
    "relu": lambda r: np.maximum(r.standard_normal((50, 6, 7, 7)), 0).astype(np.float32),
    "tiny": lambda r: r.standard_normal((1, 2, 1, 1)).astype(np.float32),
    "huge_range": lambda r: (r.standard_normal((30, 3, 4, 4)) * 1e30).astype(np.float32),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("q", [0.995, 0.5, 0.9, 994 / 999])
def test_exact_matches_numpy(case, q):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x = CASES[case](rng)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    s = feed(ndf.QuantileSketch(x.shape[1], q=q, total=n, device="cpu"), x, 7)
    assert s.exact and s.rank_error_bound == 0.0
    np.testing.assert_array_equal(s.thresholds(), numpy_thresholds(x, q))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bs", [1, 5, 64])
def test_thread_count_and_batch_size_do_not_matter(threads, bs):
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((64, 9, 7, 7)), 0).astype(np.float32)
    s = feed(ndf.QuantileSketch(9, total=64 * 49, device="cpu", threads=threads), x, bs)
    np.testing.assert_array_equal(s.thresholds(), numpy_thresholds(x, 0.995))


def test_many_units_and_2d_input():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 2100)).astype(np.float32)
    s = feed(ndf.QuantileSketch(2100, total=300, device="cpu"), x, 64)
    np.testing.assert_array_equal(s.thresholds(), np.quantile(x.T.astype(np.float64), 0.995, axis=1))


def test_one_unit_many_values_compacts_repeatedly():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 1, 32, 32)).astype(np.float32)  # 2M values, keep ~10k
    s = feed(ndf.QuantileSketch(1, total=x.size, device="cpu"), x, 100)
    np.testing.assert_array_equal(s.thresholds(), numpy_thresholds(x, 0.995))


def test_larger_maps_midstream_keep_the_tail():
    """Maps larger than a tail's free room make the tails grow while they hold
    values (keep=10 here: 256 free slots, then 30x30 = 900-value maps)."""
    rng = np.random.default_rng(13)
    small = rng.standard_normal((40, 3, 4, 4)).astype(np.float32)
    big = rng.standard_normal((6, 3, 30, 30)).astype(np.float32)
    total = small.shape[0] * 16 + big.shape[0] * 900
    s = ndf.QuantileSketch(3, q=0.998, total=total, device="cpu")
    feed(s, small, 7)
    feed(s, big, 2)
    values = np.concatenate([per_unit(small), per_unit(big)], axis=1)
    np.testing.assert_array_equal(s.thresholds(), np.quantile(values, 0.998, axis=1))


def test_first_non_finite_value_is_reported_among_several():
    """Several bad values in one batch: the first in (batch position, unit) order,
    whichever thread meets it first."""
    x = np.ones((5, 70, 3, 3), np.float32)
    x[3, 2, 0, 1] = np.nan
    x[1, 60, 2, 2] = np.inf
    x[1, 65, 0, 0] = -np.inf
    for threads in (1, 2, 3):
        s = ndf.QuantileSketch(70, total=45, device="cpu", threads=threads)
        with pytest.raises(ValueError, match=r"unit 60, batch position 1, map element 8"):
            s.update(x)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_half_precision_inputs(dtype):
    rng = np.random.default_rng(4)
    x32 = (rng.standard_normal((20, 4, 5, 5)) * 3).astype(np.float32)
    if dtype == "bfloat16":
        t = torch.from_numpy(x32).to(torch.bfloat16)
        ref = t.float().numpy()
        batches = t
    else:
        batches = x32.astype(np.float16)
        ref = batches.astype(np.float32)
    s = feed(ndf.QuantileSketch(4, total=20 * 25, device="cpu"), batches, 6)
    np.testing.assert_array_equal(s.thresholds(), numpy_thresholds(ref, 0.995))


def test_half_subnormals_and_signs_decode_exactly():
    bits = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    h = h[np.isfinite(h)]
    x = h[: (h.size // 16) * 16].reshape(-1, 1, 4, 4)
    s = feed(ndf.QuantileSketch(1, q=0.5, total=x.size, device="cpu"), x, 1000)
    np.testing.assert_array_equal(s.thresholds(), np.quantile(x.astype(np.float64).ravel(), 0.5))


def test_non_contiguous_and_torch_inputs():
    rng = np.random.default_rng(5)
    big = rng.standard_normal((30, 8, 9, 9)).astype(np.float32)
    x = big[:, ::2, 1:8, 1:8]  # strided units, non-contiguous maps
    s = feed(ndf.QuantileSketch(4, total=30 * 49, device="cpu"), x, 8)
    np.testing.assert_array_equal(s.thresholds(), numpy_thresholds(x, 0.995))
    t = torch.from_numpy(big).permute(0, 1, 3, 2)  # transposed maps
    s2 = feed(ndf.QuantileSketch(8, total=30 * 81, device="cpu"), t, 8)
    np.testing.assert_array_equal(s2.thresholds(), numpy_thresholds(t.numpy(), 0.995))


def test_merge_of_shards_in_any_order_and_serialization():
    rng = np.random.default_rng(6)
    x = np.maximum(rng.standard_normal((60, 5, 6, 6)), 0).astype(np.float32)
    x[:30, 0] *= 10  # the top of unit 0 lives in one shard
    total = x.shape[0] * 36
    shards = []
    for part in np.array_split(np.arange(60), 5):
        shards.append(feed(ndf.QuantileSketch(5, total=total, device="cpu"), x[part], 4))
    ref = numpy_thresholds(x, 0.995)
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        merged = ndf.QuantileSketch.from_bytes(shards[order[0]].to_bytes(), device="cpu")
        for i in order[1:]:
            merged.merge(ndf.QuantileSketch.from_bytes(shards[i].to_bytes(), device="cpu"))
        assert merged.count == total
        np.testing.assert_array_equal(merged.thresholds(), ref)


def test_quantiles_at_other_levels():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 3, 4, 4)).astype(np.float32)
    s = feed(ndf.QuantileSketch(3, q=0.995, total=800, min_level=0.9, device="cpu"), x, 10)
    levels = [0.9, 0.95, 0.995, 1.0]
    np.testing.assert_array_equal(s.quantiles(levels), np.quantile(per_unit(x), levels, axis=1))
    with pytest.raises(ValueError, match="below min_level"):
        s.quantiles([0.5])


def test_without_total_exact_within_budget_and_bounded_beyond():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((400, 2, 50, 50)).astype(np.float32)  # 1e6 values per unit
    s = feed(ndf.QuantileSketch(2, device="cpu"), x, 50)
    assert s.exact
    np.testing.assert_array_equal(s.thresholds(), numpy_thresholds(x, 0.995))
    # A budget far too small for the tail: the answer is approximate, its bound honest.
    small = feed(ndf.QuantileSketch(2, device="cpu", memory_budget=2 * 8 * 2000), x, 50)
    assert not small.exact
    restored = ndf.QuantileSketch.from_bytes(small.to_bytes(), device="cpu")
    assert restored.keep == small.keep and restored.rank_error_bound == small.rank_error_bound
    np.testing.assert_array_equal(restored.thresholds(), small.thresholds())
    bound = small.rank_error_bound
    assert 0 < bound < 0.005
    vals = per_unit(x)
    frac_above = (vals > small.thresholds()[:, None]).mean(axis=1)
    assert np.all(np.abs(frac_above - 0.005) <= bound + 1 / vals.shape[1])


def test_fraction_above_threshold_at_a_million_values():
    rng = np.random.default_rng(9)
    x = np.maximum(rng.standard_normal((1000, 3, 32, 32)), 0).astype(np.float32)
    s = feed(ndf.QuantileSketch(3, device="cpu"), x, 100)
    frac = (per_unit(x) > s.thresholds()[:, None]).mean(axis=1)
    assert np.all(np.abs(frac - 0.005) <= 1e-4)


def test_maxima_out():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    m = np.empty((6, 4), np.float32)
    ndf.QuantileSketch(4, total=54, device="cpu").update(x, maxima_out=m)
    np.testing.assert_array_equal(m, x.reshape(6, 4, -1).max(axis=2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_unit_and_position(bad):
    x = np.zeros((4, 3, 2, 2), np.float32)
    x[2, 1, 1, 0] = bad
    s = ndf.QuantileSketch(3, total=16, device="cpu")
    with pytest.raises(ValueError, match=r"unit 1, batch position 2, map element 2"):
        s.update(x)
    with pytest.raises(RuntimeError, match="unusable"):
        s.update(np.zeros((1, 3, 2, 2), np.float32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="units"):
        ndf.QuantileSketch(0)
    with pytest.raises(ValueError, match="q must be"):
        ndf.QuantileSketch(3, q=1.5)
    with pytest.raises(ValueError, match="total"):
        ndf.QuantileSketch(3, total=-1)
    s = ndf.QuantileSketch(3, total=10, device="cpu")
    with pytest.raises(ValueError, match="3 units|has 4 units"):
        s.update(np.zeros((2, 4, 2, 2), np.float32))
    with pytest.raises(TypeError, match="float64"):
        s.update(np.zeros((2, 3, 2, 2), np.float64))
    with pytest.raises(TypeError, match="int32"):
        s.update(np.zeros((2, 3, 2, 2), np.int32))
    with pytest.raises(ValueError, match="shape"):
        s.update(np.zeros((2, 3, 2), np.float32))
    with pytest.raises(ValueError, match="no values"):
        s.thresholds()
    with pytest.raises(ValueError, match="serialized"):
        ndf.QuantileSketch.from_bytes(b"garbage")


def test_tail_size_matches_numpy_ranks():
    for n in [1, 2, 3, 10, 199, 200, 201, 10**6 + 7]:
        for q in [0.5, 0.995, 994 / 999]:
            prev = int(np.floor(np.float64(n - 1) * q))
            assert tail_size(n, q) == n - min(prev, n - 1)


def test_total_with_a_tail_beyond_the_budget_falls_back_with_a_bound():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((200, 2, 20, 20)).astype(np.float32)  # m = 401 per unit
    s = feed(ndf.QuantileSketch(2, total=x.shape[0] * 400, device="cpu", memory_budget=2 * 8 * 100), x, 50)
    assert s.keep == 100 and not s.exact
    assert s.rank_error_bound == (401 - 100) / 80000
    frac = (per_unit(x) > s.thresholds()[:, None]).mean(axis=1)
    assert np.all(np.abs(frac - 0.005) <= s.rank_error_bound + 1 / 80000)


@pytest.mark.parametrize("q", [0.995, 0.6])
def test_compaction_with_heavy_ties_stays_exact(q):
    """Values on a coarse grid (and half of them zero) make the buffers compact
    many times with pivots equal to many values."""
    rng = np.random.default_rng(12)
    x = np.maximum(np.round(rng.standard_normal((1500, 2, 16, 16)) * 2) / 2, 0).astype(np.float32)
    s = feed(ndf.QuantileSketch(2, q=q, total=x.shape[0] * 256, device="cpu"), x, 37)
    np.testing.assert_array_equal(s.thresholds(), numpy_thresholds(x, q))
