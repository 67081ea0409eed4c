"""Label loading rate: packed HDF5 store vs decoding the PNGs (issue 5).

Workload: a generated Broden-format dataset at 224 px (112x112 label planes, 3-5
planes per image), batches of 64 images, contiguous and random indices. Reports
images/s for the store's `take`, for the PNG decode path (`Broden(store=None)`), their
ratio, and the store's build time. The PNG path is timed twice: as `Broden(store=None)`
does it (LabelBatch.encode_image) and with the store builder's encoder
(labelstore.encode_image_fast), to separate PNG decoding from label-set encoding.

    python bench/bench_labels.py [--images 2000] [--data /tmp/ndf-bench-broden] [--workers 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import machine_info, measure, report  # noqa: E402

from netdissect_fast.broden import Broden  # noqa: E402
from netdissect_fast.datasets import make_broden  # noqa: E402
from netdissect_fast.labelstore import LabelStore, encode_chunk  # noqa: E402

B = 64


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--data", default="/tmp/ndf-bench-broden")
    p.add_argument("--workers", type=int, default=None, help="store build processes")
    a = p.parse_args(argv)
    print(machine_info())

    root = Path(a.data)
    if not (root / "index.csv").exists() or len(Broden(root, store=None)) != a.images:
        t0 = time.perf_counter()
        make_broden(root, a.images, size=224, overwrite=True, workers=a.workers)
        print(f"make_broden: {a.images} images at 224 px in {time.perf_counter() - t0:.1f} s")
    ds = Broden(root)
    t0 = time.perf_counter()
    store = LabelStore.open_or_build(ds, workers=a.workers, progress=False, rebuild=True)
    build_s = time.perf_counter() - t0
    print(f"store build: {build_s:.1f} s ({len(ds) / build_s:.0f} images/s), seg {ds.seg_shape}")

    rng = np.random.default_rng(0)
    n = len(ds)
    contiguous = [np.arange(s, s + B) for s in range(0, n - B + 1, B)]
    random = [rng.choice(n, B, replace=False) for _ in range(len(contiguous))]
    pngs = Broden(root, store=None)
    few = contiguous[:4]

    def rate(fn, batches, repeats=5):
        t = measure("", lambda: [fn(i) for i in batches], repeats=repeats)
        return len(batches) * B / t.median

    def decode_fast(idx):
        return encode_chunk(ds.job_rows(idx), ds.seg_shape, ds.known_labels, ds.label_keep,
                            ds.primary_category)[0]

    rows = [
        ("store, contiguous", f"{rate(store.take, contiguous):,.0f}"),
        ("store, random", f"{rate(store.take, random):,.0f}"),
        ("PNG decode (store=None)", f"{rate(pngs.label_batch, few, repeats=3):,.0f}"),
        ("PNG decode + encode_image_fast", f"{rate(decode_fast, few, repeats=3):,.0f}"),
    ]
    print(report(rows, ("labels, batches of 64, 112x112", "images/s")))
    ratio = float(rows[0][1].replace(",", "")) / float(rows[2][1].replace(",", ""))
    fast = float(rows[3][1].replace(",", ""))
    print(f"store / PNG decode: {ratio:.0f}x (store / PNG decode with the fast encoder: "
          f"{float(rows[0][1].replace(',', '')) / fast:.0f}x)")
    store.close()
    ds.close()


if __name__ == "__main__":
    main()
