"""Slow, obviously-correct reference implementations used by the tests. Written
independently of the kernels: dense upsampling of every map, a boolean mask,
and per-plane bincounts (SPEC §1-§3)."""
from __future__ import annotations

import numpy as np
import torch


def upsample_bilinear(acts: np.ndarray, seg_shape) -> np.ndarray:
    """torch's own bilinear upsampling (the definition the kernels must match),
    one map at a time: torch takes (N, K, 1, 1) tensors for channels-last ones and
    then rounds differently, so each map goes in as its own (1, 1, h, w) image."""
    a = np.ascontiguousarray(acts, np.float32)
    N, K, h, w = a.shape
    t = torch.from_numpy(a.reshape(N * K, 1, h, w))
    up = torch.nn.functional.interpolate(t, size=tuple(seg_shape), mode="bilinear", align_corners=False)
    return up.numpy().reshape(N, K, *seg_shape)


def _axis_receptive_field(n_in, n_out, stride, offset):
    """Per output index: (i0, i1, w0, w1) for centres at offset + stride*i, clamped."""
    f = np.float32
    rows = []
    for p in range(n_out):
        t = f(f(f(p) - f(offset)) / f(stride))
        if n_in == 1 or t <= 0:
            rows.append((0, 0, f(1), f(0)))
        elif t >= n_in - 1:
            rows.append((n_in - 1, n_in - 1, f(1), f(0)))
        else:
            i0 = min(int(np.floor(t)), n_in - 2)
            w1 = f(min(max(f(t - f(i0)), f(0)), f(1)))
            rows.append((i0, i0 + 1, f(f(1) - w1), w1))
    return rows


def _fma32(a, b, c):
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def upsample_receptive_field(acts: np.ndarray, seg_shape, stride, offset) -> np.ndarray:
    """Receptive-field interpolation evaluated pixel by pixel with the formula of
    SPEC §2 (float32 weights, fused multiply-adds as in the bilinear case)."""
    (sh, sw), (sy, sx), (oy, ox) = seg_shape, stride, offset
    N, K, h, w = acts.shape
    ys = _axis_receptive_field(h, sh, sy, oy)
    xs = _axis_receptive_field(w, sw, sx, ox)
    a = acts.astype(np.float32)
    y0 = np.array([r[0] for r in ys]); y1 = np.array([r[1] for r in ys])
    wy0 = np.array([r[2] for r in ys], np.float32)[:, None]; wy1 = np.array([r[3] for r in ys], np.float32)[:, None]
    x0 = np.array([r[0] for r in xs]); x1 = np.array([r[1] for r in xs])
    wx0 = np.array([r[2] for r in xs], np.float32)[None, :]; wx1 = np.array([r[3] for r in xs], np.float32)[None, :]
    out = np.empty((N, K, sh, sw), np.float32)
    for n in range(N):
        for k in range(K):
            m = a[n, k]
            top = _fma32(wx0, m[y0][:, x0], (wx1 * m[y0][:, x1]).astype(np.float32))
            bot = _fma32(wx0, m[y1][:, x0], (wx1 * m[y1][:, x1]).astype(np.float32))
            out[n, k] = _fma32(wy0, top, (wy1 * bot).astype(np.float32))
    return out


def reference_tally(acts, thresholds, images, primary, num_categories, rule="paper", upsampled=None,
                    seg_shape=None):
    """Dense counts. ``images``: list of (planes (P, sh, sw) int array, image-level
    label list). Labels whose primary category is -1 are ignored.
    Returns I (K, L), A per category (K, C), G (L)."""
    primary = np.asarray(primary)
    L = len(primary)
    K = acts.shape[1]
    sh, sw = seg_shape if seg_shape is not None else np.asarray(images[0][0]).shape[1:]
    up = upsample_bilinear(acts, (sh, sw)) if upsampled is None else upsampled
    masks = up > np.asarray(thresholds, np.float64).astype(np.float32)[None, :, None, None]
    I = np.zeros((K, L), np.int64)
    A = np.zeros((K, num_categories), np.int64)
    G = np.zeros(L, np.int64)
    for x, (planes, image_labels) in enumerate(images):
        planes = np.asarray(planes, np.int64)
        planes = np.where(primary[planes] >= 0, planes, 0) if planes.size else planes
        lab_img = [l for l in image_labels if primary[l] >= 0]
        for p in planes:
            bc = np.bincount(p.ravel(), minlength=L)
            bc[0] = 0
            G += bc
        for l in lab_img:
            G[l] += sh * sw
        present = {int(primary[l]) for l in np.unique(planes) if l > 0} | {int(primary[l]) for l in lab_img}
        for k in range(K):
            m = masks[x, k]
            M = int(m.sum())
            overlap = set()
            for p in planes:
                under = p[m]
                bc = np.bincount(under, minlength=L)
                bc[0] = 0
                I[k] += bc
                overlap |= {int(primary[l]) for l in np.unique(under) if l > 0}
            for l in lab_img:
                I[k, l] += M
            cats = present if rule == "paper" else overlap | {int(primary[l]) for l in lab_img}
            for c in cats:
                A[k, c] += M
    return I, A, G
