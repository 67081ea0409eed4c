"""Time write_report for K = 2048 units x 10 top images (ResNet-50 layer4 scale).

    PYTHONPATH=python python bench/bench_report.py [--units 2048] [--images 4000] [--workdir DIR]

Images are synthetic 224x224 JPEGs (made once in the work folder and reused); every
unit's top images are drawn at random from them, so about min(images, 10·K) distinct
images must be decoded, as with diverse real top images. Also times TopImages.update
for batches of 64 images over a pass. Printed figures: wall time (median of
--repeats runs after one warm-up) and CPU time per run (all threads), which is less
sensitive to other load on a shared machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE.parent / "tests"))     # the report tests' fixture builders

from _timing import machine_info, measure, peak_rss_mib  # noqa: E402
from netdissect_fast import report                        # noqa: E402
from netdissect_fast.topimages import TopImages           # noqa: E402
from test_report import StubDataset, make_fake_result, make_images  # noqa: E402


def random_top(rng, units, n, n_images, map_shape):
    """A filled TopImages: n distinct random images per unit, values descending."""
    top = TopImages(units, n, map_shape)
    top.indices[...] = np.argpartition(rng.random((units, n_images)), n, axis=1)[:, :n]
    top.values[...] = -np.sort(-rng.gamma(2.0, 1.0, (units, n)).astype(np.float32), axis=1)
    top.maps[...] = rng.gamma(1.0, 1.0, (units, n) + map_shape).astype(np.float32)
    return top


def bench_topimages(units=2048, batch=64, batches=990, seed=0):
    """Per-batch cost of TopImages.update over one Broden-sized pass (63,305 images)."""
    rng = np.random.default_rng(seed)
    top = TopImages(units, 10, (7, 7))
    maps = rng.random((batch, units, 7, 7), dtype=np.float32)
    times = []
    for b in range(batches):
        maxima = rng.random((batch, units), dtype=np.float32)
        t0 = time.perf_counter()
        top.update(maxima, np.arange(b * batch, (b + 1) * batch), maps)
        times.append(time.perf_counter() - t0)
    times = np.array(times) * 1e3
    print(f"TopImages.update K={units} B={batch}: first {times[0]:.1f} ms, "
          f"median {np.median(times):.2f} ms, mean {times.mean():.2f} ms over {batches} batches "
          f"(random maxima)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2048)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keeps the generated images between runs (default: a temp folder)")
    args = parser.parse_args(argv)

    print(machine_info())
    bench_topimages(args.units)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        image_dir = work / f"images_{args.images}"
        t0 = time.perf_counter()
        if len(list(image_dir.glob("*.jpg"))) == args.images:
            dataset = StubDataset(sorted(image_dir.glob("*.jpg")), (224, 224))
        else:
            dataset = make_images(image_dir, args.images, size=224)
        print(f"dataset: {args.images} images 224x224 ready in {time.perf_counter() - t0:.1f} s")
        rng = np.random.default_rng(0)
        top = random_top(rng, args.units, args.top, args.images, (7, 7))
        result_dir = make_fake_result(work / "result", image_dir, K=args.units,
                                      n_images=args.images, top=top, top_n=args.top,
                                      thresholds=np.full(args.units, 1.5, np.float32))
        distinct = len(np.unique(top.indices))
        cpu0 = time.process_time()
        timing = measure("write_report", lambda: report.write_report(result_dir, dataset),
                         repeats=args.repeats, warmup=1)
        cpu = (time.process_time() - cpu0) / (args.repeats + 1)
        path = result_dir / "report.html"
        size = sum(f.stat().st_size for f in (path.parent / "report_images").iterdir())
        print(f"write_report K={args.units} x {args.top} images ({distinct} distinct): "
              f"median {timing.median:.2f} s wall (runs {', '.join(f'{r:.2f}' for r in timing.runs)}), "
              f"{cpu:.2f} s CPU per run; strips {size / 2**20:.1f} MiB, "
              f"html {path.stat().st_size / 2**10:.0f} KiB; peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
