"""Bounded memory at full-Broden scale (issue 6): K=2048 units, 7x7 maps, streamed
for N images through ndf.score (quantile pass, then tally pass) without ever
holding the layer. Prints the peak resident memory for a small and a full-size N:
the difference is the exact-quantile tail buffers, not the activations (a float32
cache of this layer at N=63,305 would be 25 GB).

    python bench/bench_memory.py [--images 63305] [--small 6400]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import machine_info, peak_rss_mib  # noqa: E402


def run(n_images: int, threads: int) -> None:
    import netdissect_fast as ndf
    from bench_tally import BenchDataset, make_acts

    rng = np.random.default_rng(0)
    labels = BenchDataset(rng, 256)
    K, B = 2048, 64

    class Streamed:  # n_images rows whose labels cycle through 256 generated images
        categories, num_labels = labels.categories, labels.num_labels
        primary_category, label_names, seg_shape = labels.primary_category, labels.label_names, labels.seg_shape
        path = "synthetic"

        def __len__(self):
            return n_images

        def label_batch(self, idx):
            return labels.label_batch(np.asarray(idx) % 256)

    pool = [make_acts(rng, B, K, 7, 7) for _ in range(8)]

    def batches():
        for i, s in enumerate(range(0, n_images, B)):
            e = min(n_images, s + B)
            a, b = pool[i % 8], pool[(3 * i + 1) % 8]
            x = np.maximum(0.8 * a + 0.6 * np.roll(b, i % 64, axis=0) - 0.3, 0).astype(np.float32)
            yield np.arange(s, e), x[: e - s]

    base = peak_rss_mib()
    t0 = time.perf_counter()
    res = ndf.score(batches, Streamed(), progress=False, threads=threads, top_n=10)
    dt = time.perf_counter() - t0
    print(f"N={n_images}: {dt:.1f} s, peak RSS {peak_rss_mib():.0f} MiB (before scoring {base:.0f} MiB), "
          f"exact thresholds: {res.meta['settings']['quantile_exact']}, "
          f"mask pixels counted: {int(res.cat_activation.max(axis=1).sum()):,}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=63305)
    ap.add_argument("--small", type=int, default=6400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run(args.child, args.threads)
        return
    print(machine_info(args.threads))
    for n in (args.small, args.images):  # each size in a fresh process: peak RSS is per process
        subprocess.run([sys.executable, __file__, "--child", str(n), "--threads", str(args.threads)], check=True)


if __name__ == "__main__":
    main()
