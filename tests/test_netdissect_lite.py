"""rule="netdissect-lite" against a re-implementation of NetDissect-Lite's tally
loop, structured as that code is (per image and unit: max-skip, resize, threshold,
per-label bincount, category vector through a one-hot label→category matrix,
`tally_units_cat += |mask| * (tally_cat > 0)`), with its IoU denominator built from
the per-category unit tallies. Masks come from torch's bilinear resize (NetDissect-Lite
calls PIL's float resize, which can differ by one ulp exactly at a threshold)."""
import numpy as np
import torch

import netdissect_fast as ndf
from netdissect_fast.tally import NETDISSECT_LITE_Q, Tally
from synthetic import random_dataset, smooth_activations


def netdissect_lite_tally(acts, thresholds, images, primary, num_categories, seg_shape):
    N, K = acts.shape[:2]
    L = len(primary)
    labelcat = np.zeros((L, num_categories), np.int64)  # one-hot primary category
    for lab, c in enumerate(primary):
        if c >= 0:
            labelcat[lab, c] = 1
    tally_both = np.zeros((K, L), np.int64)
    tally_units_cat = np.zeros((K, num_categories), np.int64)
    tally_labels = np.zeros(L, np.int64)
    sh, sw = seg_shape
    for img, (planes, scalars) in enumerate(images):
        pixels = np.where(primary[planes] >= 0, planes, 0) if len(planes) else np.zeros((0, sh, sw), np.int64)
        scalars = [s for s in scalars if primary[s] >= 0]
        if len(pixels):
            tl = np.bincount(pixels.ravel(), minlength=L)
            tl[0] = 0
            tally_labels += tl
        for s in scalars:
            tally_labels[s] += sh * sw
        for unit in range(K):
            fmap = acts[img, unit]
            if fmap.max() > thresholds[unit]:
                mask = torch.nn.functional.interpolate(torch.from_numpy(fmap)[None, None], size=(sh, sw),
                                                       mode="bilinear", align_corners=False)[0, 0].numpy()
                idx = np.argwhere(mask > np.float32(thresholds[unit]))
                tally_cat = np.zeros(num_categories, np.int64)
                if len(pixels):
                    bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=L)
                    bt[0] = 0
                    tally_cat = bt[None, :] @ labelcat
                    tally_both[unit] += bt
                for s in scalars:
                    tally_cat = tally_cat + labelcat[s]
                    tally_both[unit, s] += len(idx)
                tally_units_cat[unit] += len(idx) * (np.ravel(tally_cat) > 0)
    return tally_both, tally_units_cat, tally_labels, labelcat


def test_counts_and_iou_equal_netdissect_lite_loop():
    rng = np.random.default_rng(41)
    ds = random_dataset(rng, n_images=7, seg_shape=(112, 112), block=14)
    acts = smooth_activations(rng, 7, 9, 7, 7)
    res = ndf.score(acts, ds, rule="netdissect-lite", device="cpu", progress=False, top_n=0)
    values = np.moveaxis(acts, 1, 0).reshape(9, -1).astype(np.float64)
    np.testing.assert_array_equal(res.thresholds, np.quantile(values, NETDISSECT_LITE_Q, axis=1))
    both, units_cat, labels, labelcat = netdissect_lite_tally(acts, res.thresholds, ds.images,
                                                              ds.primary_category, len(ds.categories),
                                                              ds.seg_shape)
    np.testing.assert_array_equal(res.intersection, both)
    np.testing.assert_array_equal(res.cat_activation, units_cat)
    np.testing.assert_array_equal(res.label_pixels, labels)
    # NetDissect-Lite's IoU: both / (units_cat @ labelcat.T + labels - both + 1e-10)
    ndl_iou = both / (units_cat @ labelcat.T + labels - both + 1e-10)
    np.testing.assert_allclose(res.iou, ndl_iou, rtol=1e-9, atol=0)
    assert both.sum() > 0


def test_paper_rule_differs_from_lite_only_in_a():
    rng = np.random.default_rng(42)
    ds = random_dataset(rng, n_images=6)
    acts = smooth_activations(rng, 6, 5, 7, 7)
    thr = np.quantile(np.moveaxis(acts, 1, 0).reshape(5, -1).astype(np.float64), 0.99, axis=1)
    paper = Tally(ds, thr, rule="paper", device="cpu").update(acts, np.arange(6))
    lite = Tally(ds, thr, rule="netdissect-lite", device="cpu").update(acts, np.arange(6))
    np.testing.assert_array_equal(paper.intersection, lite.intersection)
    np.testing.assert_array_equal(paper.label_pixels, lite.label_pixels)
    assert (paper.cat_activation >= lite.cat_activation).all()  # lite counts a subset of images
    assert (paper.cat_activation > lite.cat_activation).any()
