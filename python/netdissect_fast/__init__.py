"""netdissect_fast: Network Dissection with exact streaming thresholds and fused
upsample + threshold + IoU tallies in C++/OpenMP and CUDA.

    import netdissect_fast as ndf
    ndf.backends()
    ds = ndf.Broden("broden1_224")
    res = ndf.score(activations, ds)        # thresholds, counts, IoU, labels
    res.summary(); res.save("out/")

Names are resolved lazily so that `import netdissect_fast` stays cheap and never
imports torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "backends": "._backend",
    "QuantileSketch": ".quantile",
    "Tally": ".tally",
    "score": ".tally",
    "DissectionResult": ".result",
    "LabelBatch": ".labels",
    "Broden": ".broden",
    "TopImages": ".topimages",
    "dissect": ".dissect",
    "datasets": ".datasets",
    "report": ".report",
}

# Names that are submodules themselves (ndf.datasets.make_broden, ndf.report.write_report).
_MODULE_EXPORTS = {"datasets", "report"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'netdissect_fast' has no attribute {name!r}")
    module = importlib.import_module(mod, __name__)
    value = module if name in _MODULE_EXPORTS else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
