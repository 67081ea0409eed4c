"""The tally accumulator and the one-call scorer ``ndf.score`` (SPEC §1-§3, §7).

For every (image, unit) the kernel upsamples the unit's map to the segmentation
size, thresholds it at T_k and counts, per label, the mask's overlap with the
image's labels: I (K, L); the mask size per category A (K, C, expanded to K×L by
each label's primary category) and each label's size G (L). Counts are int64 and
exact, whatever the backend, thread count, batch size, batch order or sharding.
"""
from __future__ import annotations

import mmap
from typing import Iterable

import numpy as np

from . import _backend
from .labels import LabelBatch
from .quantile import QuantileSketch

RULES = {"paper": 0, "netdissect-lite": 1}
UPSAMPLE = {"bilinear": 0, "receptive_field": 1}
NETDISSECT_LITE_Q = 994 / 999  # NetDissect-Lite reads its 1000-point quantile table at index 994

_STATUS = {1: "non-finite activation", 2: "pixel set id outside the image's sets",
           3: "label number outside the label space", 4: "image-level label outside the label space"}


def _receptive_field(receptive_field, map_shape, seg_shape):
    """(stride_y, stride_x, offset_y, offset_x) in segmentation pixels."""
    (h, w), (sh, sw) = map_shape, seg_shape
    if receptive_field is None:  # unit centres evenly spread, like bilinear
        sy, sx = sh / h, sw / w
        return (sy, sx, sy / 2 - 0.5, sx / 2 - 0.5)
    stride, offset = receptive_field
    sy, sx = (stride, stride) if np.isscalar(stride) else stride
    oy, ox = (offset, offset) if np.isscalar(offset) else offset
    if sy <= 0 or sx <= 0:
        raise ValueError(f"receptive_field stride must be positive, got {stride!r}")
    return (float(sy), float(sx), float(oy), float(ox))


def _zeros_counts(shape) -> np.ndarray:
    """An int64 zero array for I on 2 MiB pages where the OS offers them (Linux
    transparent huge pages): the kernel's first adds to a fresh 20 MB I otherwise
    take thousands of page faults, which both threads wait on together."""
    nbytes = int(np.prod(shape)) * 8
    if nbytes < (8 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, np.int64)
    huge = 2 << 20
    buf = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
    raw = np.frombuffer(buf, np.uint8)
    start = (-raw.ctypes.data) % huge  # huge pages need 2 MiB-aligned ranges
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % huge)
    except OSError:
        pass  # huge pages off: plain pages, same contents
    return raw[start:start + nbytes].view(np.int64).reshape(shape)


class Tally:
    """Accumulates I, A and G over batches. ``dataset`` is a :class:`Broden` (or
    any object with ``num_labels``, ``categories``, ``primary_category``,
    ``seg_shape`` and ``label_batch(indices)``).

    ``upsample="receptive_field"`` places unit (i, j) at (o + s·i, o + s·j) in
    segmentation pixels (SPEC §2); ``receptive_field=(s, o)`` gives stride and
    offset, each a number or a (y, x) pair. Without it, s = seg_size / map_size
    and o = s/2 - 1/2 (the centres bilinear upsampling uses)."""

    def __init__(self, dataset, thresholds, rule: str = "paper", upsample: str = "bilinear",
                 receptive_field=None, device: str = "auto", threads: int | None = None):
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}: expected one of {sorted(RULES)}")
        if upsample not in UPSAMPLE:
            raise ValueError(f"upsample={upsample!r}: expected one of {sorted(UPSAMPLE)}")
        thr = np.asarray(thresholds, np.float64)
        if thr.ndim != 1 or thr.size == 0:
            raise ValueError(f"thresholds must be a non-empty 1-D array, got shape {thr.shape}")
        if not np.isfinite(thr).all():
            bad = int(np.nonzero(~np.isfinite(thr))[0][0])
            raise ValueError(f"thresholds[{bad}] is not finite ({thr[bad]})")
        self.dataset = dataset
        self.thresholds = thr
        self._thr32 = thr.astype(np.float32)  # masks compare in float32 (SPEC §1.2)
        self.rule, self.upsample = rule, upsample
        self.receptive_field = receptive_field
        self.device = _backend.resolve_device(device)
        self.threads = threads or _backend.default_threads()
        self.units = thr.size
        self.categories = list(dataset.categories)
        if len(self.categories) > 32:
            raise ValueError("at most 32 categories are supported")
        self.primary_category = np.ascontiguousarray(dataset.primary_category, np.int16)
        self.num_labels = int(dataset.num_labels)
        if self.primary_category.shape != (self.num_labels,):
            raise ValueError("dataset.primary_category must have one entry per label number")
        pc = self.primary_category
        if pc.size and (pc.min() < -1 or pc.max() >= len(self.categories)):
            raise ValueError(f"dataset.primary_category must lie in -1..{len(self.categories) - 1}")
        self._I = _zeros_counts((self.units, self.num_labels))
        self._A = np.zeros((self.units, len(self.categories)), np.int64)
        self.label_pixels = np.zeros(self.num_labels, np.int64)
        self._kern = _backend.kernels(self.device)
        # On CUDA backends I and A accumulate on the device; _I/_A are host mirrors.
        self._device_counts = (None if self.device == "cpu"
                               else self._kern.DeviceCounts(self.units, self.num_labels, len(self.categories)))
        self._stale = False
        self.images = 0
        self.map_shape = None
        self._poisoned = None

    @property
    def intersection(self) -> np.ndarray:
        self._download()
        return self._I

    @property
    def cat_activation(self) -> np.ndarray:
        self._download()
        return self._A

    def _download(self):
        if self._device_counts is not None and self._stale:
            self._device_counts.download(self._I.ctypes.data, self._A.ctypes.data)
            self._stale = False

    def _upload(self):
        if self._device_counts is not None:
            self._device_counts.upload(self._I.ctypes.data, self._A.ctypes.data)

    def update(self, batch, image_indices, labels: LabelBatch | None = None) -> "Tally":
        """Count a (B, K, h, w) batch whose row i is dataset image ``image_indices[i]``."""
        if self._poisoned:
            raise RuntimeError(f"Tally is unusable after a rejected batch ({self._poisoned})")
        v = _backend.on_device(batch, self.device)
        if len(v.shape) != 4:
            raise ValueError(f"batch must have shape (B, K, h, w), got {tuple(v.shape)}")
        B, K, h, w = v.shape
        if K != self.units:
            raise ValueError(f"batch has {K} units but {self.units} thresholds were given")
        if h <= 0 or w <= 0:
            raise ValueError(f"batch has an empty activation map: shape {tuple(v.shape)}")
        if self.map_shape is None:
            self.map_shape = (h, w)
        elif self.map_shape != (h, w):
            raise ValueError(f"batch maps are {h}x{w}, earlier batches were {self.map_shape}")
        idx = np.asarray(image_indices, np.int64).reshape(-1)
        if idx.size != B:
            raise ValueError(f"{idx.size} image indices for a batch of {B}")
        if B == 0:
            return self
        if labels is None:
            labels = self.dataset.label_batch(idx)
        if labels.batch != B:
            raise ValueError(f"labels cover {labels.batch} images, the batch has {B}")
        sh, sw = labels.seg_shape
        if sh * sw >= 2 ** 32:  # the CPU kernel logs per-map counts as uint32
            raise ValueError(f"segmentations of {sh}x{sw} pixels: at most 2**32 - 1 pixels per image")
        rf = _receptive_field(self.receptive_field, (h, w), (sh, sw)) if self.upsample == "receptive_field" \
            else (1.0, 1.0, 0.0, 0.0)
        arrays = _label_arrays(labels)
        if self.device != "cpu" and h * w > 4096:
            raise ValueError(f"activation maps of {h}x{w} exceed the CUDA tally's 4096-element limit; "
                             "use device='cpu'")
        common = (v.ptr, v.dtype, B, K, h, w, v.strides[0], v.strides[1], self._thr32.ctypes.data,
                  tuple(a.ctypes.data for a in arrays), sh, sw, self.primary_category.ctypes.data,
                  self.num_labels, len(self.categories), RULES[self.rule], UPSAMPLE[self.upsample], rf)
        if self._device_counts is None:
            code, image, unit, value = self._kern.tally(*common, self._I.ctypes.data, self._A.ctypes.data,
                                                        self.label_pixels.ctypes.data, self.threads)
        else:
            code, image, unit, value = self._kern.tally(*common, self._device_counts, self.label_pixels.ctypes.data,
                                                        _backend.current_stream(self.device))
            self._stale = True
        if code:
            where = f"batch position {image} (dataset image {int(idx[image])})"
            if code == 1:
                self._poisoned = f"NaN/Inf in unit {unit}, {where}"
                raise ValueError(f"activations contain NaN or Inf: unit {unit}, {where}")
            raise ValueError(f"labels of {where}: {_STATUS[code]} ({value})")
        self.images += B
        return self

    def merge(self, other: "Tally") -> "Tally":
        """Add the counts of a disjoint shard."""
        if (other.units, other.num_labels, other.categories, other.rule, other.upsample) != \
                (self.units, self.num_labels, self.categories, self.rule, self.upsample):
            raise ValueError("cannot merge tallies of different units, labels, categories or settings")
        if not np.array_equal(other.thresholds, self.thresholds):
            raise ValueError("cannot merge tallies made with different thresholds")
        self._I[...] = self.intersection + other.intersection
        self._A[...] = self.cat_activation + other.cat_activation
        self._upload()
        self.label_pixels += other.label_pixels
        self.images += other.images
        self.map_shape = self.map_shape or other.map_shape
        return self

    def state_dict(self) -> dict:
        return dict(thresholds=self.thresholds, intersection=self.intersection,
                    cat_activation=self.cat_activation, label_pixels=self.label_pixels,
                    images=np.int64(self.images), rule=self.rule, upsample=self.upsample,
                    map_shape=np.array(self.map_shape or (0, 0), np.int64))

    @classmethod
    def from_state(cls, state: dict, dataset, receptive_field=None, device="auto", threads=None) -> "Tally":
        t = cls(dataset, state["thresholds"], rule=str(state["rule"]), upsample=str(state["upsample"]),
                receptive_field=receptive_field, device=device, threads=threads)
        for name in ("intersection", "cat_activation", "label_pixels"):
            arr = np.asarray(state[name], np.int64)
            if arr.shape != getattr(t, name).shape:
                raise ValueError(f"state[{name!r}] has shape {arr.shape}, expected {getattr(t, name).shape}")
            getattr(t, name)[...] = arr
        t._upload()
        t.images = int(state["images"])
        ms = tuple(int(x) for x in np.asarray(state["map_shape"]))
        t.map_shape = ms if ms != (0, 0) else None
        return t

    def result(self, meta: dict | None = None, top=None):
        from .result import DissectionResult
        meta = dict(meta or {})
        meta.setdefault("settings", {})
        meta["settings"].update(rule=self.rule, upsample=self.upsample)
        if self.upsample == "receptive_field" and self.map_shape is not None:
            # unit centres in segmentation pixels, for drawing the masks (report.py)
            seg = tuple(int(x) for x in self.dataset.seg_shape)
            meta["settings"].update(seg_shape=list(seg),
                                    receptive_field=list(_receptive_field(self.receptive_field, self.map_shape, seg)))
        return DissectionResult(
            thresholds=self.thresholds, intersection=self.intersection.copy(),
            cat_activation=self.cat_activation.copy(), label_pixels=self.label_pixels.copy(),
            categories=self.categories, label_names=list(getattr(self.dataset, "label_names",
                                                                 [str(i) for i in range(self.num_labels)])),
            primary_category=self.primary_category.copy(), rule=self.rule, top=top, meta=meta,
            images=self.images)


def _label_arrays(lb: LabelBatch):
    """The seven arrays in kernel order, contiguous and of the kernel's dtypes."""
    want = ((lb.pixel_sets, np.uint16), (lb.set_start, np.int64), (lb.set_label_start, np.int64),
            (lb.set_labels, np.int32), (lb.set_pixels, np.int64), (lb.image_label_start, np.int64),
            (lb.image_labels, np.int32))
    out = []
    for a, dt in want:
        a = np.ascontiguousarray(a, dt)
        if a.size == 0:  # a valid address even for empty arrays
            a = np.zeros(1, dt)
        out.append(a)
    # Cheap structural checks (microseconds): the kernel trusts these offsets.
    # Set ids and label numbers are checked by the kernel itself, before counting.
    set_start, set_label_start, image_label_start = out[1], out[2], out[5]
    n_sets = int(set_start[lb.batch]) if len(set_start) == lb.batch + 1 else -1
    ok = (n_sets >= 0 and set_start[0] == 0 and len(set_label_start) == n_sets + 1
          and len(lb.set_pixels) == n_sets and len(image_label_start) == lb.batch + 1
          and set_label_start[0] == 0 and image_label_start[0] == 0
          and int(set_label_start[-1]) <= len(lb.set_labels)
          and int(image_label_start[-1]) <= len(lb.image_labels)
          and not (np.diff(set_start) < 1).any() and not (np.diff(set_label_start) < 0).any()
          and not (np.diff(image_label_start) < 0).any())
    if not ok:
        raise ValueError("labels: inconsistent LabelBatch offsets (run LabelBatch.validate for details)")
    return out


# ---------------------------------------------------------------------------
# ndf.score

def _batches(activations, batch_size: int):
    """(indices, batch) pairs from an array-like, an h5py dataset, or an iterable.
    Returns (factory, n_rows or None, map_shape or None)."""
    shape = getattr(activations, "shape", None)
    if shape is not None and not isinstance(activations, (list, tuple)):
        shape = tuple(shape)
        if len(shape) != 4:
            raise ValueError(f"activations must have shape (N, K, h, w), got {shape}")
        n = shape[0]

        def gen():
            for s in range(0, n, batch_size):
                e = min(n, s + batch_size)
                yield np.arange(s, e), activations[s:e]  # h5py/memmap: reads only this slice
        return gen, n, shape[2:]
    if callable(activations):
        return (lambda: iter(activations())), None, None
    if isinstance(activations, (list, tuple)):
        return (lambda: iter(activations)), None, None
    if isinstance(activations, Iterable):
        it = iter(activations)
        used = []

        def once():
            if used:
                raise ValueError("activations is an iterator and can be read only once: pass thresholds=, "
                                 "a list, or a function returning a fresh iterator")
            used.append(True)
            return it
        return once, None, None
    raise TypeError(f"activations: unsupported type {type(activations).__name__}")


def _progress(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False)


def score(activations, dataset, q: float | None = None, rule: str = "paper", upsample: str = "bilinear",
          thresholds=None, batch_size: int = 64, device: str = "auto", progress: bool = True,
          receptive_field=None, top_n: int = 10, threads: int | None = None, meta: dict | None = None):
    """Network Dissection of one layer's activations over ``dataset`` (SPEC §7).

    ``activations``: (N, K, h, w) numpy array / memmap / torch tensor / h5py
    dataset with row i = image i of ``dataset``, or an iterable of
    ``(image_indices, batch)`` (or a callable returning one, so it can be read twice)
    covering the dataset's images once: the exact-quantile tail is sized for
    ``len(dataset)`` images (more rows make the thresholds approximate, reported in
    ``meta["settings"]["quantile_exact"]``). ``q`` defaults to 0.995, or to
    NetDissect-Lite's 994/999 with ``rule="netdissect-lite"``."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: expected one of {sorted(RULES)}")
    if q is None:
        q = NETDISSECT_LITE_Q if rule == "netdissect-lite" else 0.995
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = _backend.resolve_device(device)
    make_iter, n_rows, map_shape = _batches(activations, int(batch_size))
    if n_rows is not None and n_rows != len(dataset):
        raise ValueError(f"activations has {n_rows} rows but the dataset has {len(dataset)} images "
                         "(row i must be image i)")
    n_batches = None if n_rows is None else -(-n_rows // batch_size)
    top = None
    sketch = None
    if thresholds is None:
        for idx, batch in _progress(make_iter(), progress, "quantiles", n_batches):
            idx = np.asarray(idx, np.int64)
            if sketch is None:
                K = int(batch.shape[1])
                # An iterable is taken to cover the dataset once: its tail is sized for
                # len(dataset) images, exact for that many or fewer; more rows (repeats)
                # make the thresholds approximate, as settings["quantile_exact"] says.
                total = (n_rows if n_rows is not None else len(dataset)) * int(np.prod(batch.shape[2:]))
                sketch = QuantileSketch(K, q, total=total, device=device, threads=threads)
                top = _make_top(K, top_n, tuple(batch.shape[2:]))
            maxima = np.empty((len(idx), sketch.units), np.float32) if top is not None else None
            sketch.update(batch, maxima_out=maxima)
            if top is not None:
                top.update(maxima, idx, _host(batch))
        if sketch is None:
            raise ValueError("activations is empty")
        thresholds = sketch.thresholds()
    tally = None
    top_from_tally = sketch is None  # thresholds were given: top images come from this pass
    for idx, batch in _progress(make_iter(), progress, "tally", n_batches):
        idx = np.asarray(idx, np.int64)
        if tally is None:
            tally = Tally(dataset, thresholds, rule=rule, upsample=upsample, receptive_field=receptive_field,
                          device=device, threads=threads)
            if top_from_tally:
                top = _make_top(tally.units, top_n, tuple(batch.shape[2:]))
        tally.update(batch, idx)
        if top is not None and top_from_tally:
            host = _host(batch)
            top.update(host.reshape(host.shape[0], host.shape[1], -1).max(axis=2).astype(np.float32), idx, host)
    if tally is None:
        raise ValueError("activations is empty")
    meta = dict(meta or {})
    meta.setdefault("dataset", str(getattr(dataset, "path", "")))
    settings = meta.setdefault("settings", {})
    settings.update(q=float(q), batch_size=int(batch_size), device=device)
    if sketch is not None:
        settings.update(quantile_exact=bool(sketch.exact), rank_error_bound=float(sketch.rank_error_bound))
    return tally.result(meta=meta, top=top)


def _make_top(K: int, n: int, map_shape):
    if not n:
        return None
    from .topimages import TopImages
    return TopImages(K, n=n, map_shape=map_shape)


def _host(batch) -> np.ndarray:
    """A float32 numpy copy of a batch (for top-image maps only)."""
    if _backend.is_torch_tensor(batch):
        return batch.detach().float().cpu().numpy()
    return np.asarray(batch, np.float32)
