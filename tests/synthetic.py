"""Small in-memory datasets for kernel tests: random label planes with the
structure of Broden (segments, several planes, image-level labels, labels shared
between categories, label numbers above 255)."""
from __future__ import annotations

import numpy as np

from netdissect_fast.labels import LabelBatch


class StubDataset:
    """The part of the Broden interface that scoring uses, held in memory."""

    def __init__(self, images, primary_category, categories, seg_shape):
        self.images = images  # list of (planes (P, sh, sw), image-level labels)
        self.primary_category = np.asarray(primary_category, np.int16)
        self.categories = list(categories)
        self.num_labels = len(self.primary_category)
        self.label_names = ["-"] + [f"label{i}" for i in range(1, self.num_labels)]
        self.seg_shape = tuple(seg_shape)
        keep = self.primary_category >= 0
        self._encoded = [LabelBatch.encode_image(p, il, keep, seg_shape=self.seg_shape) for p, il in images]

    def __len__(self):
        return len(self.images)

    def label_batch(self, indices):
        return LabelBatch.from_images([self._encoded[int(i)] for i in indices])


def random_dataset(rng, n_images=8, seg_shape=(112, 112), num_labels=300, num_categories=4,
                   max_planes=3, block=14, image_level=True, empty_images=True):
    """Planes made of constant blocks with noise (segments + per-pixel labels);
    some labels ignored (primary -1), numbers up to num_labels-1 (> 255)."""
    sh, sw = seg_shape
    primary = rng.integers(-1, num_categories, num_labels)
    primary[0] = -1
    primary[num_labels - 1] = 0  # the largest number is always a real label (> 255)
    images = []
    for i in range(n_images):
        P = int(rng.integers(0 if empty_images else 1, max_planes + 1))
        if P:
            by, bx = -(-sh // block), -(-sw // block)
            coarse = rng.integers(0, num_labels, (P, by, bx))
            planes = coarse.repeat(block, 1).repeat(block, 2)[:, :sh, :sw]
            noise = rng.random((P, sh, sw)) < 0.05
            planes = np.where(noise, rng.integers(0, num_labels, (P, sh, sw)), planes)
            planes[:, : sh // 3, : sw // 3] = 0  # unlabelled corner
        else:
            planes = np.zeros((0, sh, sw), np.int64)
        lab = list(rng.integers(1, num_labels, int(rng.integers(0, 3)))) if image_level else []
        images.append((planes, lab))
    cats = [f"cat{c}" for c in range(num_categories)]
    return StubDataset(images, primary, cats, seg_shape)


def smooth_activations(rng, n, k, h, w, dtype=np.float32):
    """ReLU'd, spatially smooth maps with per-unit scales, plus exact ties."""
    base = rng.standard_normal((n, k, h + 2, w + 2))
    smooth = (base[:, :, :-2, :-2] + base[:, :, 1:-1, 1:-1] + base[:, :, 2:, 2:]) / 3
    scale = rng.uniform(0.5, 4.0, (1, k, 1, 1))
    a = np.maximum(smooth[:, :, :h, :w] * scale, 0).astype(dtype)
    if k > 1:
        a[:, 1] = np.round(a[:, 1] * 2) / 2  # many exact ties
    if k > 2:
        a[:, 2] = 0  # a unit that never fires
    return a
