"""The fused upsample + threshold + tally (issue 4).

Workload: K=2048 units, 7x7 maps -> 112x112 segmentations, Broden-like labels
(4 planes: ~30 labels per image, ~4 labels per pixel, 1198 label numbers),
thresholds at q=0.995. Also K=256 at 13x13 and 14x14 (-> 112x112).

Measured in the same run: our tally with 1 and 2 threads (steady state: one
Tally per thread count, its counts already in memory, as in a long run; and once
with a fresh Tally, whose first adds fault in I's pages), quantile + tally
together (fresh objects, as a run starts), the time to read the activations
twice (torch.sum), and the two baselines — the straightforward torch pipeline
(interpolate everything, threshold, bincount) and the NetDissect-Lite loop (per
image and unit: max-skip, PIL float bilinear resize, numpy bincount) — timed on
a slice and extrapolated.

    python bench/bench_tally.py [--images 1000] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import machine_info, measure, report  # noqa: E402

import netdissect_fast as ndf  # noqa: E402
from netdissect_fast.labels import LabelBatch  # noqa: E402
from netdissect_fast.tally import Tally  # noqa: E402

L_LABELS, CATS = 1198, ["color", "object", "part", "material", "scene", "texture"]


class BenchDataset:
    """Broden-like labels held in memory (the interface Tally reads)."""

    def __init__(self, rng, n, seg=(112, 112)):
        self.seg_shape = seg
        self.num_labels = L_LABELS
        self.categories = CATS
        # Broden's category sizes: 11 colours, 32 materials, 47 textures; the rest
        # split between objects, parts and scenes as in broden1_227.
        sizes = {"color": 11, "object": 500, "part": 150, "material": 32, "scene": 457, "texture": 47}
        cat_of = np.repeat(np.arange(6), [sizes[c] for c in CATS])
        assert len(cat_of) == L_LABELS - 1
        self.primary_category = np.concatenate([[-1], rng.permutation(cat_of)]).astype(np.int16)
        self.label_names = [f"l{i}" for i in range(L_LABELS)]
        by_cat = [np.nonzero(self.primary_category == c)[0] for c in range(6)]
        sh, sw = seg
        encoded, self.planes, self.image_labels = [], [], []
        for _ in range(n):
            planes = []
            for c, n_seg in ((0, 10), (1, 8), (2, 6), (3, 6)):  # color, object, part, material
                labs = rng.choice(by_cat[c], n_seg)
                seeds = rng.integers(0, 14, (n_seg, 2))
                yy, xx = np.mgrid[0:14, 0:14]
                d = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
                coarse = labs[np.argmin(d, axis=0)]
                plane = coarse.repeat(8, 0).repeat(8, 1)[:sh, :sw]
                if c == 0:  # colour labels are per pixel: some noise
                    noise = rng.random((sh, sw)) < 0.02
                    plane = np.where(noise, rng.choice(by_cat[0], (sh, sw)), plane)
                planes.append(plane)
            planes = np.stack(planes)
            img = [int(rng.choice(by_cat[4])), int(rng.choice(by_cat[5]))]
            self.planes.append(planes)
            self.image_labels.append(img)
            encoded.append(LabelBatch.encode_image(planes, img, self.primary_category >= 0))
        self.store = LabelBatch.from_images(encoded)

    def __len__(self):
        return len(self.planes)

    def label_batch(self, idx):
        return self.store.take(idx)


def make_acts(rng, n, K, h, w):
    base = rng.standard_normal((n, K, h + 2, w + 2), dtype=np.float32)
    smooth = (base[:, :, :-2, :-2] + base[:, :, 1:-1, 1:-1] + base[:, :, 2:, 2:]) / 3
    scale = rng.uniform(0.5, 4.0, (1, K, 1, 1)).astype(np.float32)
    return np.maximum(smooth[:, :, :h, :w] * scale, 0).astype(np.float32)


def run_tally(ds, acts, thr, threads, B=64, t=None):
    """Every image through Tally `t` (a fresh one when None)."""
    t = t if t is not None else Tally(ds, thr, device="cpu", threads=threads)
    for s in range(0, len(acts), B):
        idx = np.arange(s, min(len(acts), s + B))
        t.update(acts[s:s + B], idx, labels=ds.label_batch(idx))
    return t


def torch_pipeline(ds, acts, thr, n_img):
    """Straightforward: interpolate all maps, threshold, bincount per plane."""
    import torch
    K = acts.shape[1]
    L = ds.num_labels
    I = torch.zeros(K * L, dtype=torch.int64)
    T = torch.from_numpy(thr.astype(np.float32))[None, :, None, None]
    for i in range(n_img):
        up = torch.nn.functional.interpolate(torch.from_numpy(acts[i:i + 1]), size=ds.seg_shape,
                                             mode="bilinear", align_corners=False)
        mask = (up > T)[0]  # (K, sh, sw)
        for p in torch.from_numpy(ds.planes[i]):
            k_idx, y, x = torch.nonzero(mask, as_tuple=True)
            I += torch.bincount(k_idx * L + p[y, x].long(), minlength=K * L)
        sizes = mask.reshape(K, -1).sum(dim=1)
        for lab in ds.image_labels[i]:  # image-level labels cover the whole image
            I[torch.arange(K) * L + lab] += sizes
    I = I.reshape(K, L)
    I[:, 0] = 0  # label 0 = unlabelled
    return I


def netdissect_lite_loop(ds, acts, thr, n_img):
    """NetDissect-Lite's tally: per (image, unit) max-skip, PIL 'F' bilinear resize, bincount."""
    from PIL import Image
    K = acts.shape[1]
    L = ds.num_labels
    I = np.zeros((K, L), np.int64)
    sh, sw = ds.seg_shape
    for i in range(n_img):
        pixels = ds.planes[i]
        for k in range(K):
            fm = acts[i, k]
            if fm.max() > thr[k]:
                mask = np.asarray(Image.fromarray(fm, mode="F").resize((sw, sh), Image.BILINEAR))
                idx = np.argwhere(mask > thr[k])
                bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=L)
                bt[0] = 0
                I[k] += bt
                I[k, ds.image_labels[i]] += len(idx)
    return I


def read_twice_seconds(acts, repeats):
    import torch
    t = torch.from_numpy(acts)
    t.sum()
    return measure("read", lambda: (t.sum(), t.sum()), repeats=repeats).median


def bench_config(rng, args, K, h, w, n_images, baselines):
    ds = args.ds
    acts = make_acts(rng, n_images, K, h, w)
    total = n_images * h * w
    qs = ndf.QuantileSketch(K, total=total, device="cpu", threads=args.threads)
    for s in range(0, n_images, 64):
        qs.update(acts[s:s + 64])
    thr = qs.thresholds()
    # Steady state: the same Tally for every run, so its 20 MB of counts were
    # faulted in by the warm-up (a fresh I costs ~2-8 ms on this VM, once per
    # dissection: ~0.1 ms per 1,000 images of Broden's 63,305).
    # The threaded rows first, after 3 warm-up runs: on this VM a core left idle
    # for seconds (as the 1-thread row and the baselines leave the second) comes
    # back tens of milliseconds late in the next few runs' parallel regions,
    # which showed up as 60-90 ms runs in the 2-thread row.
    warm1, warm2 = (Tally(ds, thr, device="cpu", threads=n) for n in (1, args.threads))
    t2 = measure("tally2", lambda: run_tally(ds, acts, thr, args.threads, t=warm2), repeats=args.repeats,
                 warmup=3).median
    t2_fresh = measure("tally2 fresh", lambda: run_tally(ds, acts, thr, args.threads), repeats=args.repeats).median
    t1 = measure("tally1", lambda: run_tally(ds, acts, thr, 1, t=warm1), repeats=args.repeats).median

    def both():
        q = ndf.QuantileSketch(K, total=total, device="cpu", threads=args.threads)
        for s in range(0, n_images, 64):
            q.update(acts[s:s + 64])
        run_tally(ds, acts, q.thresholds(), args.threads)
    tq = measure("quantile+tally", both, repeats=args.repeats).median
    rt = read_twice_seconds(acts, args.repeats)
    per1k = lambda t: t / n_images * 1000 * 1000  # ms per 1000 images
    rows = [(f"K={K} {h}x{w}: ndf tally, 1 thread", f"{per1k(t1):.1f}", f"{n_images / t1:,.0f}", ""),
            (f"K={K} {h}x{w}: ndf tally, {args.threads} threads", f"{per1k(t2):.1f}", f"{n_images / t2:,.0f}",
             f"{t1 / t2:.2f}x vs 1 thread"),
            (f"K={K} {h}x{w}: ndf tally, {args.threads} threads, fresh Tally", f"{per1k(t2_fresh):.1f}",
             f"{n_images / t2_fresh:,.0f}", f"{per1k(t2_fresh) - per1k(t2):+.1f} ms: I's first touch"),
            (f"K={K} {h}x{w}: ndf quantile + tally", f"{per1k(tq):.1f}", f"{n_images / tq:,.0f}",
             f"{tq / rt:.1f}x reading the activations twice ({per1k(rt):.1f} ms)")]
    if baselines:
        n_b = args.baseline_images
        tref = Tally(ds, thr, device="cpu", threads=args.threads)
        tref.update(acts[:n_b], np.arange(n_b), labels=ds.label_batch(np.arange(n_b)))
        t0 = time.perf_counter()
        I_torch = torch_pipeline(ds, acts, thr, n_b)
        t_torch = (time.perf_counter() - t0) / n_b
        assert np.array_equal(I_torch.numpy(), tref.intersection), "torch pipeline disagrees"
        t0 = time.perf_counter()
        I_ndl = netdissect_lite_loop(ds, acts, thr, n_b)
        t_ndl = (time.perf_counter() - t0) / n_b
        diff = int(np.abs(I_ndl - tref.intersection).sum())
        rows.append((f"K={K} {h}x{w}: torch interpolate+threshold+bincount ({n_b} images)",
                     f"{t_torch * 1e6:.0f}", f"{1 / t_torch:.1f}", f"ndf is {t_torch / (t2 / n_images):,.0f}x faster"))
        rows.append((f"K={K} {h}x{w}: NetDissect-Lite numpy+PIL loop ({n_b} images)",
                     f"{t_ndl * 1e6:.0f}", f"{1 / t_ndl:.1f}",
                     f"ndf is {t_ndl / (t2 / n_images):,.0f}x faster; PIL's masks differ by {diff} pixel-labels"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each of our rows (the median is shown); more steadies a noisy machine")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(machine_info(args.threads))
    t0 = time.perf_counter()
    args.ds = BenchDataset(rng, args.images)
    lb = args.ds.store
    print(f"labels: {args.images} images, {lb.set_start[-1] / args.images:.0f} label sets/image, "
          f"{len(set(lb.set_labels.tolist()))} distinct labels, 4 planes (made in {time.perf_counter() - t0:.0f} s)")
    rows = bench_config(rng, args, 2048, 7, 7, args.images, baselines=True)
    rows += bench_config(rng, args, 256, 13, 13, args.images, baselines=False)
    rows += bench_config(rng, args, 256, 14, 14, args.images, baselines=False)
    print(report(rows, ("configuration", "ms per 1000 images", "images/s", "ratio")))


if __name__ == "__main__":
    main()
