"""Whole-job timing of `ndf.dissect` for a small CNN on CPU.

    PYTHONPATH=python python bench/bench_dissect.py [--images 600] [--size 112] [--workers 0]

Splits the job into image decoding, forward pass, quantile sketch, top images,
cache write/read, tally, checkpoints and writing results, from the timer inside
`dissect` (meta["timings"]), and prints the dissection's own overhead (everything but
the forward pass and image decoding) as a percentage of the forward time. With
--workers 0 decoding happens in-process, so "data" is the decode time itself.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import netdissect_fast as ndf
from netdissect_fast.demo import _scene_net
from netdissect_fast.dissect import dissect


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--cache", choices=["auto", "none"], default="auto")
    p.add_argument("--dataset", help="existing Broden-format dataset (default: generate one)")
    p.add_argument("--report", action="store_true", help="also time the HTML reports")
    a = p.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = a.dataset
        if data is None:
            data = Path(tmp) / "data"
            t = time.perf_counter()
            ndf.datasets.make_broden(data, a.images, seed=0, size=a.size)
            print(f"generated {a.images} images at {a.size} px in {time.perf_counter() - t:.1f} s")
        ds = ndf.Broden(data)
        ds.label_batch([0])                                     # build/load the label store now
        model = _scene_net(5).eval()
        layers = ["features.conv3", "features.conv4"]
        t = time.perf_counter()
        results = dissect(model, layers, ds, Path(tmp) / "out", batch_size=a.batch_size,
                              device="cpu", workers=a.workers, cache=a.cache, progress=False,
                              report=a.report)
        wall = time.perf_counter() - t

    timings = next(iter(results.values())).meta["timings"]
    print(f"\ndissect of {', '.join(layers)} on {len(ds)} images ({a.size} px), "
          f"cache={a.cache}, {torch.get_num_threads()} torch threads, CPU backend: "
          f"{ndf.backends()['cpu']['detail']}")
    print(f"{'phase':<12}{'seconds':>9}{'share':>8}")
    for phase, seconds in sorted(timings.items(), key=lambda kv: -kv[1]):
        print(f"{phase:<12}{seconds:9.3f}{seconds / wall:8.1%}")
    accounted = sum(timings.values())
    print(f"{'other':<12}{wall - accounted:9.3f}{(wall - accounted) / wall:8.1%}")
    print(f"{'total':<12}{wall:9.3f}")
    forward = timings.get("forward", 0.0)
    overhead = wall - forward - timings.get("data", 0.0)
    print(f"\ndissection overhead (all but forward + image decoding): {overhead:.3f} s = "
          f"{overhead / forward:.0%} of the forward time ({forward:.3f} s)")


if __name__ == "__main__":
    main()
