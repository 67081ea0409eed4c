"""TopImages against a brute-force reference that sorts every (image, maximum) pair."""
import numpy as np
import pytest

from netdissect_fast.topimages import TopImages


def brute_force(maxima, maps, n):
    """Sort all images per unit: value descending (NaN as -inf), then index ascending."""
    N, K = maxima.shape
    values = np.where(np.isnan(maxima), -np.inf, maxima).astype(np.float32)
    indices = np.full((K, n), -1, np.int64)
    top_values = np.full((K, n), -np.inf, np.float32)
    top_maps = np.zeros((K, n) + maps.shape[2:], np.float32)
    for k in range(K):
        order = sorted(range(N), key=lambda i: (-float(values[i, k]), i))[:n]
        indices[k, :len(order)] = order
        top_values[k, :len(order)] = values[order, k]
        top_maps[k, :len(order)] = maps[order, k]
    return indices, top_values, top_maps


def random_data(rng, N=57, K=13, shape=(3, 4), ties=True):
    maxima = rng.normal(size=(N, K)).astype(np.float32)
    if ties:  # many exact ties, including across batch boundaries, and a signed zero
        maxima = np.round(maxima, 1)
        maxima[::7, 2] = -0.0
        maxima[1::7, 2] = 0.0
    maps = rng.normal(size=(N, K) + shape).astype(np.float32)
    return maxima, maps


def feed(top, maxima, maps, rows, batch):
    for s in range(0, len(rows), batch):
        b = rows[s:s + batch]
        top.update(maxima[b], b, maps[b])


def check(top, maxima, maps):
    indices, values, ref_maps = brute_force(maxima, maps, top.n)
    np.testing.assert_array_equal(top.indices, indices)
    np.testing.assert_array_equal(top.values, values)
    np.testing.assert_array_equal(top.maps, ref_maps)


@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("n", [1, 4, 10])
def test_streaming_matches_brute_force(batch, n):
    rng = np.random.default_rng(batch * 100 + n)
    maxima, maps = random_data(rng)
    top = TopImages(maxima.shape[1], n, maps.shape[2:])
    feed(top, maxima, maps, np.arange(len(maxima)), batch)
    check(top, maxima, maps)


def test_fewer_images_than_n_leaves_empty_slots():
    rng = np.random.default_rng(1)
    maxima, maps = random_data(rng, N=3, K=4)
    top = TopImages(4, 5, maps.shape[2:])
    top.update(maxima, np.arange(3), maps)
    check(top, maxima, maps)
    assert (top.indices[:, 3:] == -1).all() and np.isneginf(top.values[:, 3:]).all()


def test_ties_prefer_lower_image_index_whatever_the_arrival_order():
    K, N = 3, 20
    maxima = np.ones((N, K), np.float32)
    maps = np.zeros((N, K, 1, 1), np.float32)
    top = TopImages(K, 4, (1, 1))
    feed(top, maxima, maps, np.arange(N)[::-1].copy(), 3)  # highest index first
    assert top.indices.tolist() == [[0, 1, 2, 3]] * K


def test_nan_ranks_below_real_values():
    maxima = np.array([[np.nan], [-np.inf], [-5.0]], np.float32)
    maps = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    top = TopImages(1, 3, (1, 1))
    top.update(maxima, np.arange(3), maps)
    assert top.indices.tolist() == [[2, 0, 1]]


@pytest.mark.parametrize("seed", range(4))
def test_merge_in_any_order_equals_one_pass(seed):
    rng = np.random.default_rng(seed)
    maxima, maps = random_data(rng, N=80)
    shards = np.array_split(rng.permutation(len(maxima)), 4)
    parts = []
    for shard in shards:
        part = TopImages(maxima.shape[1], 6, maps.shape[2:])
        feed(part, maxima, maps, shard, 7)
        parts.append(part)
    for order in (range(4), rng.permutation(4)):
        merged = TopImages(maxima.shape[1], 6, maps.shape[2:])
        for i in order:
            merged.merge(parts[i])
        check(merged, maxima, maps)
    # merging into a partly filled object and tree-shaped merges agree too
    left = TopImages.from_state(parts[0].state_dict()).merge(parts[1])
    right = TopImages.from_state(parts[3].state_dict()).merge(parts[2])
    check(left.merge(right), maxima, maps)


def test_state_round_trip_and_no_maps_mode():
    rng = np.random.default_rng(5)
    maxima, maps = random_data(rng)
    top = TopImages(maxima.shape[1], 5, maps.shape[2:])
    feed(top, maxima, maps, np.arange(len(maxima)), 8)
    state = top.state_dict()
    assert all(isinstance(v, np.ndarray) or np.isscalar(v) for v in state.values())
    again = TopImages.from_state(state)
    np.testing.assert_array_equal(again.maps, top.maps)
    np.testing.assert_array_equal(again.indices, top.indices)

    bare = TopImages(maxima.shape[1], 5)
    feed(bare, maxima, maps, np.arange(len(maxima)), 8)
    assert bare.maps is None and "maps" not in bare.state_dict()
    np.testing.assert_array_equal(bare.indices, top.indices)


def test_bad_arguments_name_the_argument():
    top = TopImages(4, 2, (2, 2))
    with pytest.raises(ValueError, match="maxima"):
        top.update(np.zeros((3, 5), np.float32), np.arange(3), np.zeros((3, 5, 2, 2)))
    with pytest.raises(ValueError, match="maps"):
        top.update(np.zeros((3, 4), np.float32), np.arange(3))
    with pytest.raises(ValueError, match="image_indices"):
        top.update(np.zeros((3, 4), np.float32), np.array([0, -1, 2]), np.zeros((3, 4, 2, 2)))
    with pytest.raises(ValueError, match="merge"):
        top.merge(TopImages(4, 2, (3, 3)))
