"""Dissect any PyTorch model: forward hooks, an activation cache and a resumable
two-pass pipeline (SPEC §1).

    results = ndf.dissect(model, ["layer3", "layer4"], ndf.Broden("broden1_224"), "out")

Pass 1 runs the model once over the dataset; every requested layer is captured by
forward hooks in the same forward passes and feeds its QuantileSketch (thresholds) and
TopImages. Its activations also go to a per-layer HDF5 cache, so pass 2 (the Tally)
reads them back instead of running the model again (`cache="none"` runs it twice).

Everything a layer produces lives in ``out_dir/<model>/<layer>/<settings-hash>/``:

    settings.json     what the hash covers, readable
    checkpoint.pkl    resumable state: stage, image cursors, sketch / TopImages / Tally state
    activations.h5    the cache: dataset "activations" (N, K, h, w), attrs fingerprint, rows_done
    results.npz, tally.csv, summary.json, report.html   (DissectionResult.save)
    done              written last; a finished layer is loaded, never recomputed

State is checkpointed every `checkpoint_every` batches with atomic writes (temp file +
os.replace). A run that dies resumes at its last checkpoint; cache rows written after it
are replayed from the cache, so with the cache on no finished forward batch is redone.

With the float16 cache (the default) the whole dissection, thresholds included, is the
exact dissection of the float16-rounded activations, so pass 1 and pass 2 see identical
values; `cache_dtype="float32"` or `cache="none"` keep the layer's float32 values.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import _backend

__all__ = ["dissect", "iter_activations", "resolve_layers", "OUTPUT"]

OUTPUT = "@output"           # layer name of the model's own return value ("@output.0", "@output.key")
_FORMAT_VERSION = 1          # bump when the on-disk layout or the meaning of a hash changes
_FAIL_ENV = "NDF_TEST_FAIL_AFTER_BATCHES"   # test-only: raise after this many batches


# -- layers -----------------------------------------------------------------------------

@dataclass
class Layer:
    """One layer to dissect: a named module (hooked), the model output, or a callable
    ``fn(outputs) -> tensor`` where ``outputs`` maps every hooked module name (and
    "@output") to its output in the current forward pass."""
    name: str
    module: str | None = None            # named_modules() name to hook
    fn: Callable | None = None
    needs: tuple[str, ...] = ()          # extra modules a callable reads


def resolve_layers(model: nn.Module, layers) -> list[Layer]:
    """Turn the `layers` argument into Layer objects, checking module names.

    Items: a module name from ``model.named_modules()``; "@output" (or "@output.0",
    "@output.name") for the model's return value; a callable ``fn(outputs)``; a tuple
    ``(name, fn)`` or ``(name, fn, [module names fn reads])``."""
    if isinstance(layers, (str, Layer)) or callable(layers):
        layers = [layers]
    modules = dict(model.named_modules())
    resolved: list[Layer] = []
    for i, item in enumerate(layers):
        if isinstance(item, Layer):
            layer = item
        elif isinstance(item, str):
            layer = Layer(item, module=None if item.startswith(OUTPUT) else item)
        elif isinstance(item, tuple) and 2 <= len(item) <= 3 and callable(item[1]):
            layer = Layer(str(item[0]), fn=item[1], needs=tuple(item[2]) if len(item) == 3 else ())
        elif callable(item):
            name = getattr(item, "__name__", "")
            layer = Layer(name if name.isidentifier() else f"fn{i}", fn=item)
        else:
            raise TypeError(f"layers[{i}]: expected a module name, a callable or (name, callable), "
                            f"got {type(item).__name__}")
        for name in ([layer.module] if layer.module else []) + list(layer.needs):
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
                hint = (f"close matches: {', '.join(close)}" if close else
                        "top-level modules: " + ", ".join(n for n in modules if n and "." not in n))
                raise ValueError(f"layer {name!r} is not a module of {type(model).__name__} ({hint})")
        resolved.append(layer)
    names = [layer.name for layer in resolved]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"layers must be a non-empty list of distinct layers, got {names}")
    return resolved


def _as_maps(x, name: str) -> torch.Tensor:
    """A layer output as (B, K, h, w): 4-D as is, ViT tokens (B, T, K) on their square
    patch grid (a leading class token dropped when T - 1 is square), (B, K) as 1x1."""
    if isinstance(x, (tuple, list)) and x:            # e.g. transformer blocks returning (hidden,)
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer {name!r} produced a {type(x).__name__}, not a tensor")
    if x.ndim == 4:
        return x
    if x.ndim == 2:
        return x[:, :, None, None]
    if x.ndim == 3:
        B, T, K = x.shape
        for skip in (0, 1):
            g = math.isqrt(T - skip)
            if g * g == T - skip and g > 0:
                return x[:, skip:, :].transpose(1, 2).reshape(B, K, g, g)
        raise ValueError(f"layer {name!r} gives {T} tokens per image: neither T nor T-1 is a "
                         "square patch grid")
    raise ValueError(f"layer {name!r} gives a {x.ndim}-D output {tuple(x.shape)}; expected "
                     "(B, K, h, w), (B, tokens, K) or (B, K)")


def _select_output(out, name: str):
    """'@output' -> out, '@output.0' -> out[0], '@output.key' -> out['key']."""
    for part in name[len(OUTPUT):].split(".")[1:]:
        try:
            out = out[int(part)] if part.isdigit() and not isinstance(out, dict) else out[part]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"layer {name!r}: the model output has no element {part!r}") from None
    return out


class _Capture:
    """Forward hooks that keep the outputs of the hooked modules for one forward pass."""

    def __init__(self, model: nn.Module, layers: list[Layer]):
        self.model, self.layers = model, layers
        wanted = {l.module for l in layers if l.module} | {n for l in layers for n in l.needs}
        modules = dict(model.named_modules())
        self.outputs: dict = {}
        self.handles = []
        try:
            for name in sorted(wanted):
                self.handles.append(modules[name].register_forward_hook(self._hook(name)))
        except RuntimeError as e:
            self.close()
            if isinstance(model, torch.jit.ScriptModule):
                raise ValueError("TorchScript models do not support hooks: export a model whose "
                                 f"forward returns the layer and use the layer '{OUTPUT}'") from None
            raise ValueError(f"cannot hook {type(model).__name__}: {e}") from None

    def _hook(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def __call__(self, x) -> dict[str, torch.Tensor]:
        self.outputs = {}
        self.outputs[OUTPUT] = self.model(x)
        maps = {}
        for layer in self.layers:
            if layer.fn is not None:
                value = layer.fn(self.outputs)
            elif layer.module is not None:
                value = self.outputs[layer.module]
            else:
                value = _select_output(self.outputs[OUTPUT], layer.name)
            maps[layer.name] = _as_maps(value, layer.name)
        self.outputs = {}
        return maps

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# -- images -------------------------------------------------------------------------------

class _Images(torch.utils.data.Dataset):
    """Dataset rows [start, stop) as uint8 (3, H, W) tensors at `size`; normalisation
    happens on the model device. Holds only paths, so it pickles cheaply into workers."""

    def __init__(self, dataset, start: int, stop: int, size: tuple[int, int]):
        paths = getattr(dataset, "image_paths", None)
        self.paths = list(paths) if paths is not None else None
        self.dataset = None if self.paths is not None else dataset
        self.start, self.stop, self.size = start, stop, size

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        from PIL import Image
        row = self.start + i
        if self.paths is not None:
            try:
                with Image.open(self.paths[row]) as f:
                    img = f.convert("RGB")
            except OSError as e:
                raise OSError(f"image {row} ({self.paths[row]!r}) cannot be read: {e}") from None
        else:
            img = self.dataset.image(row).convert("RGB")
        h, w = self.size
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), row


def _default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Timer:
    """Seconds per phase; on CUDA each phase is synchronised so time lands where it is spent."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, start: float) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - start
        return now


def iter_activations(model: nn.Module, layers, dataset, *, start: int = 0, batch_size: int = 64,
                     device="auto", image_size=None, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), workers: int | None = None,
                     timer: _Timer | None = None) -> Iterator[tuple[int, int, dict]]:
    """Run `model` over dataset rows [start, N) and yield ``(first_row, stop_row,
    {layer name: (B, K, h, w) tensor on the model device})`` per batch; all layers come
    from the same forward pass. The model must already be on `device` and in eval mode."""
    device = _resolve_device(device)
    layers = layers if layers and isinstance(layers[0], Layer) else resolve_layers(model, layers)
    size = _image_size(dataset, image_size)
    workers = _default_workers() if workers is None else int(workers)
    loader = torch.utils.data.DataLoader(
        _Images(dataset, start, len(dataset), size), batch_size=batch_size, shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda")
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    mean_t = torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1)
    timer = timer or _Timer(device)
    capture = _Capture(model, layers)
    try:
        with torch.inference_mode():
            t = time.perf_counter()
            for images, rows in loader:
                t = timer.add("data", t)
                x = images.to(device, non_blocking=True).to(dtype).div_(255).sub_(mean_t).div_(std_t)
                maps = capture(x)
                t = timer.add("forward", t)
                yield int(rows[0]), int(rows[-1]) + 1, maps
                t = time.perf_counter()
    finally:
        capture.close()


def _image_size(dataset, image_size) -> tuple[int, int]:
    if image_size is None:
        shape = getattr(dataset, "image_shape", None)
        if shape is None:
            raise ValueError("image_size is required: the dataset has no image_shape")
        return int(shape[0]), int(shape[1])
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _all_finite(x: torch.Tensor) -> bool:
    """torch.isfinite(x).all() without a full-size bool temporary: min and max are both
    finite exactly when every value is (aminmax propagates NaN); ~20x cheaper on float16."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


# -- on-disk state -------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", name) or "_"


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Job:
    """One layer's progress through the two passes."""
    layer: Layer
    dir: Path
    settings: dict
    cache_fp: str                      # what cached activations depend on
    stage: str = "pass1"               # pass1 -> pass2 -> done
    p1: int = 0                        # images fed to sketch + TopImages
    p2: int = 0                        # images fed to the Tally
    shape: tuple | None = None         # (K, h, w)
    sketch: object = None
    top: object = None
    tally: object = None
    thresholds: np.ndarray | None = None
    h5: object = None                  # open h5py.File of the cache
    cache: object = None               # its "activations" dataset
    result: object = None
    extra: dict = field(default_factory=dict)

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pkl"

    @property
    def cache_path(self) -> Path:
        return self.dir / "activations.h5"

    def save_checkpoint(self) -> None:
        state = {"version": _FORMAT_VERSION, "settings": self.settings, "stage": self.stage,
                 "p1": self.p1, "p2": self.p2, "shape": self.shape,
                 "sketch": self.sketch.to_bytes() if self.stage == "pass1" and self.sketch else None,
                 "top": self.top.state_dict() if self.top is not None else None,
                 "thresholds": self.thresholds,
                 "tally": self.tally.state_dict() if self.tally is not None else None}
        _atomic_write(self.checkpoint_path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load_checkpoint(self, dataset, kernels: str) -> None:
        """Restore from checkpoint.pkl when it belongs to these settings; else start over."""
        from .quantile import QuantileSketch
        from .tally import Tally
        from .topimages import TopImages
        try:
            with open(self.checkpoint_path, "rb") as f:
                state = pickle.load(f)   # our own file in the user's output directory
        except FileNotFoundError:
            return
        except Exception:
            self.checkpoint_path.unlink(missing_ok=True)   # torn or foreign: start over
            return
        if state.get("version") != _FORMAT_VERSION or state.get("settings") != self.settings:
            return
        self.stage, self.p1, self.p2, self.shape = state["stage"], state["p1"], state["p2"], state["shape"]
        self.top = TopImages.from_state(state["top"]) if state["top"] is not None else None
        self.thresholds = state["thresholds"]
        if state["sketch"] is not None:
            self.sketch = QuantileSketch.from_bytes(state["sketch"], device=kernels)
        if state["tally"] is not None:
            self.tally = Tally.from_state(state["tally"], dataset, device=kernels)

    def reset(self) -> None:
        self.close_cache()
        self.stage, self.p1, self.p2, self.shape = "pass1", 0, 0, None
        self.sketch = self.top = self.tally = self.thresholds = None
        self.checkpoint_path.unlink(missing_ok=True)
        self.cache_path.unlink(missing_ok=True)

    def close_cache(self) -> None:
        if self.h5 is not None:
            self.h5.close()
        self.h5 = self.cache = None


# -- the pipeline ---------------------------------------------------------------------------

def _layer_receptive_field(model, layer, size, dataset, device, given):
    """[[stride_y, stride_x], [offset_y, offset_x]] in segmentation pixels."""
    from . import receptive
    if given is not None:
        (s, o) = given
        s = (s, s) if isinstance(s, (int, float)) else tuple(s)
        o = (o, o) if isinstance(o, (int, float)) else tuple(o)
        return [[float(s[0]), float(s[1])], [float(o[0]), float(o[1])]]
    was_training = model.training
    model.eval().to(device)
    capture = _Capture(model, [layer])
    try:
        rf = receptive.estimate(model, capture, layer.name, size, device)
    finally:
        capture.close()
        model.train(was_training)
    (sy, sx), (oy, ox) = receptive.to_segmentation(rf, size, dataset.seg_shape)
    return [[float(sy), float(sx)], [float(oy), float(ox)]]


def dissect(model: nn.Module, layers, dataset, out_dir, *, q: float | None = None,
            rule: str = "paper", upsample: str = "bilinear", batch_size: int = 64,
            device="auto", cache: str = "auto", cache_dtype: str = "float16",
            image_size=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            iou_threshold: float = 0.04, top_n: int = 10, progress: bool = True,
            model_name: str | None = None, workers: int | None = None,
            checkpoint_every: int = 50, keep_cache: bool = False, report: bool = True,
            receptive_field=None) -> dict:
    """Dissect `layers` of `model` on `dataset`; returns {layer name: DissectionResult}.

    q: threshold quantile (default 0.995; 994/999 under rule="netdissect-lite", SPEC §3).
    layers: see `resolve_layers`. cache: "auto" writes pass-1 activations to HDF5 and
    reads them in pass 2; "none" runs the model twice. cache_dtype: "float16" or
    "float32". image_size: int or (h, w), default the dataset's. workers: DataLoader
    decoding processes (default min(4, cores - 1)). checkpoint_every: batches between
    checkpoints. keep_cache: keep activations.h5 after the layer is finished. report:
    also write each layer's report.html. receptive_field: with upsample="receptive_field",
    (stride, offset) in segmentation pixels for every layer; by default each layer's is
    read off the model (netdissect_fast.receptive).
    The model is put in eval mode (its mode is restored afterwards) and moved to `device`.
    """
    from .result import DissectionResult

    if rule not in ("paper", "netdissect-lite"):
        raise ValueError(f"rule must be 'paper' or 'netdissect-lite', got {rule!r}")
    if upsample not in ("bilinear", "receptive_field"):
        raise ValueError(f"upsample must be 'bilinear' or 'receptive_field', got {upsample!r}")
    if cache not in ("auto", "none"):
        raise ValueError(f"cache must be 'auto' or 'none', got {cache!r}")
    if cache_dtype not in ("float16", "float32"):
        raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {cache_dtype!r}")
    if q is None:
        q = 994 / 999 if rule == "netdissect-lite" else 0.995
    if not 0 < q < 1:
        raise ValueError(f"q must lie in (0, 1), got {q}")
    if batch_size < 1 or checkpoint_every < 1:
        raise ValueError(f"batch_size and checkpoint_every must be >= 1, got {batch_size}, "
                         f"{checkpoint_every}")
    if len(dataset) == 0:
        raise ValueError("the dataset has no images")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    from .models import weights_fingerprint
    resolved = resolve_layers(model, layers)
    dev = _resolve_device(device)
    size = _image_size(dataset, image_size)
    model_name = _safe_name(model_name or getattr(model, "original_name", None)
                            or type(model).__name__)
    # float16-cached runs are dissections of the rounded values: a setting of its own.
    values = cache_dtype if cache == "auto" else "float32"
    common = {"version": _FORMAT_VERSION, "dataset": dataset.fingerprint(),
              "weights": weights_fingerprint(model), "image_size": list(size),
              "mean": [float(m) for m in mean], "std": [float(s) for s in std], "values": values}
    jobs = []
    for layer in resolved:
        settings = dict(common, layer=layer.name, q=float(q), rule=rule, upsample=upsample,
                        iou_threshold=float(iou_threshold), top_n=int(top_n))
        if upsample == "receptive_field":
            settings["receptive_field"] = _layer_receptive_field(model, layer, size, dataset, dev,
                                                                 receptive_field)
        directory = Path(out_dir) / model_name / _safe_name(layer.name) / _hash(settings)
        job = _Job(layer, directory, settings, cache_fp=_hash(dict(common, layer=layer.name)))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
        if (directory / "done").exists():
            job.result, job.stage = DissectionResult.load(directory), "done"
            job.result.meta["result_dir"] = str(directory)   # the folder may have moved
        jobs.append(job)

    pipeline = _Pipeline(model, jobs, dataset, dev, size, mean, std, batch_size,
                         cache == "auto", values, checkpoint_every, workers, progress, keep_cache,
                         dict(report=report, iou_threshold=float(iou_threshold)))
    was_training = model.training
    model.eval().to(dev)
    try:
        pipeline.run(meta=dict(model=model_name, dataset=str(getattr(dataset, "path", "")),
                               images=len(dataset), iou_threshold=float(iou_threshold)))
    finally:
        for job in jobs:
            job.close_cache()
        model.train(was_training)
    return {job.layer.name: job.result for job in jobs}


class _Pipeline:
    def __init__(self, model, jobs, dataset, dev, size, mean, std, batch_size,
                 use_cache, values, checkpoint_every, workers, progress, keep_cache, save_options):
        self.model, self.jobs, self.dataset, self.dev = model, jobs, dataset, dev
        self.size, self.mean, self.std, self.batch_size = size, mean, std, batch_size
        self.use_cache, self.checkpoint_every, self.workers = use_cache, checkpoint_every, workers
        self.dtype = torch.float16 if values == "float16" else torch.float32
        self.progress, self.keep_cache, self.save_options = progress, keep_cache, save_options
        self.N = len(dataset)
        # The C++/CUDA kernels run on CUDA only next to a CUDA model and a CUDA build.
        self.kernels = "cuda" if dev.type == "cuda" and _backend.cuda_usable() else "cpu"
        self.timer = _Timer(dev)
        self.batches = 0
        fail = os.environ.get(_FAIL_ENV)
        self.fail_after = int(fail) if fail else None

    # -- driver --------------------------------------------------------------------------
    def run(self, meta: dict) -> None:
        todo = [j for j in self.jobs if j.stage != "done"]
        for job in todo:
            job.load_checkpoint(self.dataset, self.kernels)
            if self.use_cache:
                self._open_cache(job)
        pass1 = [j for j in todo if j.stage == "pass1"]
        for job in pass1:
            if job.cache is not None and job.extra["rows_done"] > job.p1:
                self._replay_pass1(job)          # rows computed after the last checkpoint
        self._model_pass([j for j in pass1 if j.p1 < self.N], "pass1")
        for job in pass1:
            self._finish_pass1(job)
        if self.use_cache:
            for job in todo:
                self._replay_pass2(job)
        else:
            self._model_pass(todo, "pass2")
        for job in todo:
            self._finish(job, meta)

    def _tick(self, jobs) -> None:
        """After every batch: maybe checkpoint; maybe fail on purpose (tests)."""
        self.batches += 1
        if self.batches % self.checkpoint_every == 0:
            t = time.perf_counter()
            for job in jobs:
                job.save_checkpoint()
            self.timer.add("checkpoint", t)
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError(f"simulated failure after {self.batches} batches ({_FAIL_ENV})")

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit="img",
                    disable=not self.progress, leave=False, dynamic_ncols=True)

    # -- model passes -----------------------------------------------------------------
    def _model_pass(self, jobs: list[_Job], stage: str) -> None:
        if not jobs:
            return
        cursor = (lambda j: j.p1) if stage == "pass1" else (lambda j: j.p2)
        start = min(cursor(j) for j in jobs)
        desc = ("pass 1: thresholds" if stage == "pass1" else "pass 2: tally") + \
            f" ({len(jobs)} layer{'s' * (len(jobs) > 1)})"
        with self._bar(self.N, start, desc) as bar:
            for a, b, maps in iter_activations(
                    self.model, [j.layer for j in jobs], self.dataset, start=start,
                    batch_size=self.batch_size, device=self.dev, image_size=self.size,
                    mean=self.mean, std=self.std, workers=self.workers, timer=self.timer):
                for job in jobs:
                    c = cursor(job)
                    if c >= b:
                        continue
                    act = maps[job.layer.name][c - a:]
                    if stage == "pass1":
                        self._feed_pass1(job, act, c, b)
                    else:
                        act = act if self.kernels == "cuda" else act.cpu()
                        self._feed_tally(job, act.to(self.dtype), c, b)
                bar.update(b - a)
                self._tick(jobs)

    def _feed_pass1(self, job: _Job, act: torch.Tensor, a: int, b: int,
                    write_cache: bool = True) -> None:
        from .quantile import QuantileSketch
        from .topimages import TopImages
        B, K, h, w = act.shape
        if job.shape is None:
            job.shape = (K, h, w)
            job.sketch = QuantileSketch(K, q=job.settings["q"], total=self.N * h * w, device=self.kernels)
            job.top = TopImages(K, job.settings["top_n"], (h, w))
            if self.use_cache:
                self._create_cache(job)
        elif job.shape != (K, h, w):
            raise ValueError(f"layer {job.layer.name!r} changed shape from {job.shape} to {(K, h, w)}")
        t = time.perf_counter()
        values = act.to(self.dtype)
        if self.dtype == torch.float16 and not _all_finite(values) and torch.isfinite(act).all():
            raise ValueError(f"layer {job.layer.name!r} has activations beyond float16's range "
                             "(65504): use cache_dtype='float32'")
        maxima = np.empty((B, K), np.float32)
        maps = values.cpu()
        job.sketch.update(values if self.kernels == "cuda" else maps, maxima_out=maxima)
        t = self.timer.add("quantile", t)
        maps = maps.numpy()
        job.top.update(maxima, np.arange(a, b), maps)
        t = self.timer.add("top_images", t)
        if job.cache is not None and write_cache:
            self._write_cache(job, maps, a, b)
            self.timer.add("cache_write", t)
        job.p1 = b

    def _feed_tally(self, job: _Job, values, a: int, b: int) -> None:
        t = time.perf_counter()
        job.tally.update(values, np.arange(a, b))
        self.timer.add("tally", t)
        job.p2 = b

    def _finish_pass1(self, job: _Job) -> None:
        from .tally import Tally
        if job.stage != "pass1":
            return
        s = job.settings
        job.thresholds = np.asarray(job.sketch.thresholds())
        job.extra["rank_error_bound"] = getattr(job.sketch, "rank_error_bound", None)
        job.sketch = None
        rf = s.get("receptive_field")
        job.tally = Tally(self.dataset, job.thresholds, rule=s["rule"], upsample=s["upsample"],
                          receptive_field=None if rf is None else (tuple(rf[0]), tuple(rf[1])),
                          device=self.kernels)
        job.stage, job.p2 = "pass2", 0
        job.save_checkpoint()

    def _finish(self, job: _Job, meta: dict) -> None:
        t = time.perf_counter()
        K, h, w = job.shape
        layer_meta = dict(meta, layer=job.layer.name, units=K, map_shape=[h, w],
                          result_dir=str(job.dir),
                          settings=job.settings, settings_hash=job.dir.name,
                          rank_error_bound=job.extra.get("rank_error_bound"),
                          timings=dict(self.timer.seconds))
        result = job.tally.result(meta=layer_meta, top=job.top)
        result.save(job.dir, dataset=self.dataset, **self.save_options)
        _atomic_write(job.dir / "done", json.dumps({"finished": time.time()}).encode())
        job.checkpoint_path.unlink(missing_ok=True)
        job.close_cache()
        if not self.keep_cache:
            job.cache_path.unlink(missing_ok=True)
        job.result, job.stage, job.tally = result, "done", None
        self.timer.add("save", t)

    # -- cache ---------------------------------------------------------------------------
    def _open_cache(self, job: _Job) -> None:
        """Open an existing cache and check it fits the checkpoint; any doubt -> start over."""
        import h5py
        if not job.cache_path.exists():
            if job.p1 or job.stage != "pass1":
                job.reset()      # the cache holding earlier rows is gone
            return
        try:
            f = h5py.File(job.cache_path, "r+")
            ok = (f.attrs.get("fingerprint") == job.cache_fp and "activations" in f
                  and tuple(f["activations"].shape[1:]) == tuple(job.shape or f["activations"].shape[1:])
                  and int(f.attrs.get("rows_done", -1)) >= (job.p1 if job.stage == "pass1" else self.N))
        except Exception:
            f, ok = None, False
        if not ok:
            if f is not None:
                f.close()
            job.reset()
            return
        job.h5, job.cache = f, f["activations"]
        job.extra["rows_done"] = int(f.attrs["rows_done"])
        if job.shape is None:            # checkpoint lost but cache rows survive
            job.shape = tuple(job.cache.shape[1:])

    def _create_cache(self, job: _Job) -> None:
        import h5py
        K, h, w = job.shape
        job.cache_path.unlink(missing_ok=True)
        row_bytes = K * h * w * np.dtype(np.float16 if self.dtype == torch.float16 else np.float32).itemsize
        rows = max(1, min(self.batch_size, (64 << 20) // row_bytes))   # one batch per chunk, <= 64 MB
        f = h5py.File(job.cache_path, "w")
        f.attrs["fingerprint"] = job.cache_fp
        f.attrs["rows_done"] = 0
        job.cache = f.create_dataset("activations", (self.N, K, h, w), chunks=(rows, K, h, w),
                                     dtype="float16" if self.dtype == torch.float16 else "float32")
        job.h5 = f
        job.extra["rows_done"] = 0

    def _write_cache(self, job: _Job, maps: np.ndarray, a: int, b: int) -> None:
        job.cache[a:b] = maps
        job.h5.attrs["rows_done"] = b        # only after the rows are written
        job.h5.flush()
        job.extra["rows_done"] = b

    def _cache_batches(self, job: _Job, start: int, stop: int):
        for a in range(start, stop, self.batch_size):
            b = min(a + self.batch_size, stop)
            t = time.perf_counter()
            arr = job.cache[a:b]
            self.timer.add("cache_read", t)
            yield a, b, arr

    def _replay_pass1(self, job: _Job) -> None:
        from .quantile import QuantileSketch
        from .topimages import TopImages
        if job.sketch is None:           # no checkpoint: rebuild from row 0
            K, h, w = job.shape
            job.p1 = 0
            job.sketch = QuantileSketch(K, q=job.settings["q"], total=self.N * h * w, device=self.kernels)
            job.top = TopImages(K, job.settings["top_n"], (h, w))
        for a, b, arr in self._cache_batches(job, job.p1, job.extra["rows_done"]):
            self._feed_pass1(job, torch.from_numpy(arr).to(self.dev), a, b, write_cache=False)

    def _replay_pass2(self, job: _Job) -> None:
        if job.p2 >= self.N:
            return
        with self._bar(self.N, job.p2, f"pass 2: tally {job.layer.name}") as bar:
            for a, b, arr in self._cache_batches(job, job.p2, self.N):
                values = torch.from_numpy(arr).to(self.dev) if self.kernels == "cuda" else arr
                self._feed_tally(job, values, a, b)
                bar.update(b - a)
                self._tick([job])
