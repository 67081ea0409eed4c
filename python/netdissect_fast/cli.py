"""The `netdissect-fast` console script.

    netdissect-fast dissect --model mobilenet_v2 --weights mnv2.pth --layers features.18 \\
        --dataset broden1_224 --out results
    netdissect-fast make-dataset data/tiny --images 200 --size 112
    netdissect-fast report results/mobilenet_v2/features.18/<hash>
    netdissect-fast demo

Errors print one line (`netdissect-fast: error: ...`) and exit non-zero; `--debug`
shows the traceback instead. Heavy imports (torch) happen inside the commands.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "netdissect-fast"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _csv(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"dataset directory {text!r} does not exist")
    return text


def _open_broden(path: str, categories=None):
    from .broden import Broden
    return Broden(_existing_dir(path), categories=categories)


# -- commands ----------------------------------------------------------------------------

def cmd_dissect(a) -> int:
    from .dissect import dissect
    from .models import load_model
    dataset = _open_broden(a.dataset, a.categories)
    model, name = load_model(a.model, a.weights)
    results = dissect(model, a.layers, dataset, a.out, q=a.q, rule=a.rule, upsample=a.upsample, receptive_field=_receptive_field_arg(a.receptive_field),
                      batch_size=a.batch_size, device=a.device, cache=a.cache,
                      cache_dtype=a.cache_dtype, image_size=a.image_size, top_n=a.top_n,
                      iou_threshold=a.iou_threshold, model_name=a.model_name or name,
                      workers=a.workers, keep_cache=a.keep_cache, report=not a.no_report,
                      progress=not a.quiet)
    for layer, result in results.items():
        print_summary(layer, result, a.iou_threshold)
        print(f"  results: {result.meta['result_dir']}")
    return 0


def print_summary(layer: str, result, iou_threshold: float = 0.04) -> None:
    """Unique detectors per category, then the best detectors."""
    s = result.summary(iou_threshold)
    per_category = ", ".join(f"{c} {n}" for c, n in s["unique_detectors"].items() if n)
    print(f"{layer}: {s['total_unique_detectors']} unique detectors"
          f"{' (' + per_category + ')' if per_category else ''}, "
          f"{s['total_detectors']} of {s['num_units']} units are detectors (IoU > {iou_threshold})")


def cmd_make_dataset(a) -> int:
    from .datasets import make_broden
    out = make_broden(a.path, a.images, a.seed, size=a.size, seg_size=a.seg_size,
                      overwrite=a.overwrite, progress=not a.quiet)
    print(f"wrote {out.n_images} images ({out.size} px, labels {out.seg_size} px) to {out.path}")
    return 0


def cmd_validate_dataset(a) -> int:
    report = _open_broden(a.path, a.categories).validate(progress=not a.quiet)
    print(report)
    if not report.ok:
        raise ValueError(f"dataset {a.path!r} has problems (listed above)")
    return 0


def cmd_pack_dataset(a) -> int:
    from .labelstore import LabelStore
    dataset = _open_broden(a.path, a.categories)
    store = LabelStore.open_or_build(dataset, rebuild=True, progress=not a.quiet)
    print(f"packed label store of {len(dataset)} images: {getattr(store, 'path', '')}")
    store.close()
    return 0


def cmd_download_broden(a) -> int:
    try:
        from .download import download_broden
    except ImportError as e:
        raise RuntimeError(f"download support is not available: {e}") from None
    path = download_broden(a.dest, a.variant, a.url)
    print(f"Broden is in {path}")
    return 0


def cmd_report(a) -> int:
    from .report import write_comparison, write_report
    for d in a.result_dirs:
        if not (Path(d) / "summary.json").is_file():
            raise FileNotFoundError(f"result directory {d!r} holds no summary.json")
        print(f"report: {write_report(d)}")
    if len(a.result_dirs) > 1:
        print(f"comparison: {write_comparison(a.result_dirs, a.out)}")
    return 0


def cmd_backends(a) -> int:
    from . import _backend
    print(_backend.backends())
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo
    run_demo(a.out, n_images=a.images, progress=not a.quiet)
    return 0


# -- parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Network Dissection of PyTorch models on Broden-format "
                "datasets: per-unit concept labels and IoUs, unique detectors per layer.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    def command(name, func, help):
        s = sub.add_parser(name, help=help, description=help, parents=[common])
        s.set_defaults(func=func)
        return s

    d = command("dissect", cmd_dissect, "Dissect layers of a model on a Broden-format dataset. "
                "Interrupted runs resume; finished layers are loaded, not recomputed.")
    d.add_argument("--model", required=True, help="mobilenet_v2 | torchvision:NAME | "
                   "package.module:factory | path to a TorchScript file")
    d.add_argument("--weights", help="state_dict file (.pth/.pt or .safetensors), loaded strictly")
    d.add_argument("--layers", required=True, type=_csv,
                   help="comma-separated module names from model.named_modules() "
                   "(e.g. features.18,layer4.2.conv3), or @output for the model's return value")
    d.add_argument("--dataset", required=True, help="Broden-format dataset directory")
    d.add_argument("--categories", type=_csv, help="comma-separated categories (default all)")
    d.add_argument("--out", required=True, help="output directory; results go to "
                   "OUT/<model>/<layer>/<settings-hash>/")
    d.add_argument("--model-name", help="name results are filed under (default from --model)")
    d.add_argument("--q", type=float, default=None,
                   help="threshold quantile (default 0.995; 994/999 with --rule netdissect-lite)")
    d.add_argument("--rule", choices=["paper", "netdissect-lite"], default="paper",
                   help="which images count toward a unit's mask area (SPEC §3)")
    d.add_argument("--upsample", choices=["bilinear", "receptive_field"], default="bilinear",
                   help="how activation maps are upsampled to the segmentation size")
    d.add_argument("--receptive-field", metavar="STRIDE,OFFSET", default=None,
                   help="with --upsample receptive_field: unit i sits at OFFSET + STRIDE*i segmentation "
                        "pixels (default: read off the model for each layer)")
    d.add_argument("--iou-threshold", type=float, default=0.04,
                   help="IoU above which a unit is a detector (default 0.04)")
    d.add_argument("--top-n", type=int, default=10, help="top images kept per unit (default 10)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    d.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    d.add_argument("--workers", type=int, default=None,
                   help="image decoding processes (default min(4, cores - 1))")
    d.add_argument("--cache", choices=["auto", "none"], default="auto",
                   help="auto: cache pass-1 activations in HDF5 for pass 2; none: run the model twice")
    d.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="cache precision; the dissection uses the cached values (default float16)")
    d.add_argument("--keep-cache", action="store_true", help="keep activations.h5 when done")
    d.add_argument("--image-size", type=int, default=None,
                   help="resize images to this square size (default: the dataset's)")
    d.add_argument("--no-report", action="store_true", help="skip the HTML report")

    m = command("make-dataset", cmd_make_dataset,
                "Generate a procedural Broden-format dataset (for tests and demos).")
    m.add_argument("path", help="directory to create")
    m.add_argument("--images", "-n", type=int, default=1000, help="number of images (default 1000)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m.add_argument("--size", type=int, default=224, help="image size in pixels (default 224)")
    m.add_argument("--seg-size", type=int, default=None, help="label size (default size // 2)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing directory")

    for name, func, text in [
            ("validate-dataset", cmd_validate_dataset, "Check a Broden-format dataset's files."),
            ("pack-dataset", cmd_pack_dataset, "Build the packed label store of a dataset "
             "(done automatically on first use; this does it ahead of time).")]:
        v = command(name, func, text)
        v.add_argument("path", help="Broden-format dataset directory")
        v.add_argument("--categories", type=_csv, help="comma-separated categories (default all)")

    dl = command("download-broden", cmd_download_broden, "Download and unpack Broden.")
    dl.add_argument("dest", help="directory to download into")
    dl.add_argument("--variant", default="broden1_224", help="broden1_224 | broden1_227 | broden1_384")
    dl.add_argument("--url", default=None, help="mirror URL of the zip (default: the official one)")

    r = command("report", cmd_report, "Write HTML reports of saved results (and a comparison "
                "page when several are given).")
    r.add_argument("result_dirs", nargs="+", metavar="RESULT_DIR",
                   help="directories holding summary.json (OUT/<model>/<layer>/<hash>)")
    r.add_argument("--out", default="comparison.html",
                   help="comparison page path when several results are given (default comparison.html)")

    command("backends", cmd_backends, "Show which backends (CPU, CUDA) are compiled and usable.")

    dm = command("demo", cmd_demo, "Offline demo: generate a dataset, train a small scene "
                 "classifier, dissect two of its layers and write a report.")
    dm.add_argument("--out", default="netdissect-demo", help="output directory (default netdissect-demo)")
    dm.add_argument("--images", type=int, default=None, help="dataset size (default: the demo's)")
    return p


def _receptive_field_arg(text):
    if text is None:
        return None
    try:
        stride, offset = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--receptive-field expects STRIDE,OFFSET (two numbers), got {text!r}") from None
    if stride <= 0:
        raise ValueError(f"--receptive-field stride must be positive, got {stride}")
    return (stride, offset)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, argparse.ArgumentTypeError):
            message = str(e)
        else:
            message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
