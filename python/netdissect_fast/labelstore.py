"""The packed HDF5 label store: the LabelBatch arrays (labels.py) of a whole Broden
dataset, so a tally reads labels at memory speed instead of decoding PNGs.

File layout (format FORMAT_VERSION):

    pixel_sets         uint16 (N, sh, sw)  contiguous, uncompressed: memory-mapped for reads
    set_count          int32  (N,)         sets per image       } CSR arrays as counts;
    set_label_count    int32  (S,)         labels per set       } starts are their
    image_label_count  int32  (N,)         image-level labels   } cumulative sums
    set_labels int32, set_pixels int64, image_labels int32
    category_mask      uint32 (N,)         bit c: the image carries a label whose
                                           primary category is ds.categories[c]
    label_pixels       int64  (L,)         G of SPEC §1 over the whole dataset
    attrs: record (JSON: what it was built from), done_chunks, complete, problems

It is built in parallel, CHUNK images at a time (encode_image_fast); `done_chunks` is written after each
chunk, so an interrupted build resumes where it stopped. A store whose record differs
from the dataset's (CSV sizes/mtimes, image listing, category selection, format,
on_error) is rebuilt, never reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from .broden import parallel_map, read_row_planes
from .labels import LabelBatch, consecutive_run

FORMAT_VERSION = 1
CHUNK = 64
_GROWING = {"set_label_count": np.int32, "set_labels": np.int32, "set_pixels": np.int64,
            "image_labels": np.int32}


def default_store_path(ds) -> Path:
    """``<dataset>/.ndf_cache/labels-<hash>.h5``; a per-user cache dir when the dataset
    directory is read-only ($NDF_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache)."""
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, ds.categories]).encode()).hexdigest()[:12]
    name = f"labels-{key}.h5"
    local = ds.path / ".ndf_cache"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local / name
    except OSError:
        pass
    base = os.environ.get("NDF_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                   "netdissect_fast")
    folder = Path(base, hashlib.sha256(str(ds.path).encode()).hexdigest()[:12])
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def store_record(ds) -> dict:
    return {"format": FORMAT_VERSION, "chunk": CHUNK, "on_error": ds.on_error, **ds.source_record()}


class LabelStore:
    """A complete store opened for reading. Keeps the file open and the CSR arrays in
    memory; `take` reads only the pixel_sets slices it needs."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        f = self._file
        if not f.attrs.get("complete", False):
            self.close()
            raise ValueError(f"LabelStore: {self.path} is incomplete (build it with LabelStore.open_or_build)")
        self.record = json.loads(f.attrs["record"])
        self.problems = json.loads(f.attrs.get("problems", "[]"))
        self._pixels = f["pixel_sets"]
        n, sh, sw = self._pixels.shape
        # Contiguous and uncompressed, so the page cache serves any gather at memory
        # speed; one h5py read per image would be ~10x slower for random batches.
        offset = self._pixels.id.get_offset()
        self._pixels_map = (np.memmap(self.path, np.uint16, "r", offset, (n, sh, sw))
                            if offset is not None and self._pixels.compression is None else None)
        self.seg_shape = (sh, sw)
        starts = lambda counts: np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        # pixel_sets is not in memory: a zero-size stand-in lets LabelBatch.take slice the rest.
        self._csr = LabelBatch(
            pixel_sets=np.empty((n, 0, 0), np.uint16),
            set_start=starts(f["set_count"][:]),
            set_label_start=starts(f["set_label_count"][:]),
            set_labels=f["set_labels"][:], set_pixels=f["set_pixels"][:],
            image_label_start=starts(f["image_label_count"][:]), image_labels=f["image_labels"][:])
        self.category_mask = f["category_mask"][:]
        self.label_pixels = f["label_pixels"][:]

    def __len__(self) -> int:
        return self._csr.batch

    def take(self, indices) -> LabelBatch:
        """LabelBatch of dataset rows ``indices`` (any order, repeats allowed)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        batch = self._csr.take(idx)
        return replace(batch, pixel_sets=self.read_pixel_sets(idx))

    def read_pixel_sets(self, idx: np.ndarray) -> np.ndarray:
        if self._pixels_map is not None:
            run = consecutive_run(idx)
            if run is not None:
                return np.ascontiguousarray(self._pixels_map[run[0]:run[1]])
            return np.ascontiguousarray(self._pixels_map[idx])
        unique, inverse = np.unique(idx, return_inverse=True)   # h5py wants increasing indices
        return self._pixels[unique][inverse]

    def close(self) -> None:
        self._pixels_map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- building ----------------------------------------------------------------
    @classmethod
    def open_or_build(cls, ds, path=None, workers: int | None = None, progress: bool = True,
                      rebuild: bool = False) -> "LabelStore":
        """Open the store of Broden ``ds``; build it, resume it, or rebuild it when the
        dataset or the selection changed since it was written."""
        path = Path(path) if path is not None else default_store_path(ds)
        record = store_record(ds)
        with _build_lock(path):   # a second process waits, then finds the store complete
            if path.exists():
                reason = "rebuild requested" if rebuild else _stale_reason(path, record)
                if reason is None:
                    with h5py.File(path, "r") as f:
                        complete = bool(f.attrs.get("complete", False))
                    if complete:
                        return cls(path)
                else:
                    print(f"label store {path}: rebuilding ({reason})", file=sys.stderr)
                    path.unlink()
            build(ds, path, record, workers=workers, progress=progress)
        return cls(path)


@contextlib.contextmanager
def _build_lock(path: Path):
    """Exclusive lock on ``<store>.lock`` while a store is checked and built, so two
    processes never write one file (POSIX only; elsewhere HDF5's own file locking
    makes the second writer fail instead)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"label store {path}: waiting for another process that is building it", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stale_reason(path: Path, record: dict) -> str | None:
    """Why the store at ``path`` cannot be used for ``record`` (None: it can)."""
    try:
        with h5py.File(path, "r") as f:
            old = json.loads(f.attrs["record"])
    except (OSError, KeyError, ValueError):
        return "unreadable store"
    changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if "files" in changed:
        changed.remove("files")
        changed += sorted(k for k in set(old["files"]) | set(record["files"])
                          if old["files"].get(k) != record["files"].get(k))
    return f"changed: {', '.join(changed)}" if changed else None


def build(ds, path: Path, record: dict, workers: int | None = None, progress: bool = True) -> None:
    """Write (or continue writing) the store of ``ds`` at ``path``."""
    n, (sh, sw) = len(ds), ds.seg_shape
    n_chunks = -(-n // CHUNK)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as f:
        if "pixel_sets" not in f:
            f.attrs["record"] = json.dumps(record, sort_keys=True)
            f.attrs["complete"] = False
            f.attrs["done_chunks"] = 0
            f.attrs["problems"] = "[]"
            f.create_dataset("pixel_sets", (n, sh, sw), np.uint16)
            for name in ("set_count", "image_label_count"):
                f.create_dataset(name, (n,), np.int32)
            f.create_dataset("category_mask", (n,), np.uint32)
            for name, dtype in _GROWING.items():
                f.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(1 << 16,))
        done = int(f.attrs["done_chunks"])
        sizes = _truncate_to(f, done * CHUNK)
        problems = json.loads(f.attrs["problems"])

        jobs = [(ds.job_rows(range(k * CHUNK, min((k + 1) * CHUNK, n))), ds.seg_shape,
                 ds.known_labels, ds.label_keep, ds.primary_category) for k in range(done, n_chunks)]
        results = parallel_map(encode_chunk, jobs, workers, "label store", progress)
        for k, (batch, mask, chunk_problems) in zip(range(done, n_chunks), results):
            for p in chunk_problems:
                ds._problem(p)                 # raises unless on_error="warn"
            problems += chunk_problems
            a, b = k * CHUNK, k * CHUNK + batch.batch
            f["pixel_sets"][a:b] = batch.pixel_sets
            f["set_count"][a:b] = np.diff(batch.set_start)
            f["image_label_count"][a:b] = np.diff(batch.image_label_start)
            f["category_mask"][a:b] = mask
            for name, values in (("set_label_count", np.diff(batch.set_label_start)),
                                 ("set_labels", batch.set_labels), ("set_pixels", batch.set_pixels),
                                 ("image_labels", batch.image_labels)):
                _append(f[name], sizes, name, values)
            f.attrs["problems"] = json.dumps(problems)
            f.attrs["done_chunks"] = k + 1      # progress is recorded only once the chunk is written
            f.flush()

        f.create_dataset("label_pixels", data=_label_pixels(f, ds.num_labels, sh * sw))
        f.attrs["complete"] = True


def _truncate_to(f: h5py.File, images: int) -> dict[str, int]:
    """Drop whatever a build interrupted mid-chunk appended after the first ``images``."""
    n_sets = int(f["set_count"][:images].sum(dtype=np.int64))
    sizes = {"set_label_count": n_sets, "set_pixels": n_sets,
             "set_labels": int(f["set_label_count"][:n_sets].sum(dtype=np.int64)),
             "image_labels": int(f["image_label_count"][:images].sum(dtype=np.int64))}
    for name, size in sizes.items():
        f[name].resize((size,))
    return sizes


def _append(dset, sizes: dict, name: str, values: np.ndarray) -> None:
    start = sizes[name]
    sizes[name] = start + len(values)
    dset.resize((sizes[name],))
    dset[start:] = values


def _label_pixels(f: h5py.File, num_labels: int, image_pixels: int) -> np.ndarray:
    """G[c]: pixels over all planes (a label counted once per plane carrying it) plus
    sh*sw per image-level label."""
    per_set = f["set_label_count"][:].astype(np.int64)
    weights = np.repeat(f["set_pixels"][:], per_set)
    # float64 sums of integers are exact below 2**53 pixels.
    g = np.bincount(f["set_labels"][:], weights=weights, minlength=num_labels).astype(np.int64)
    g += np.bincount(f["image_labels"][:], minlength=num_labels).astype(np.int64) * image_pixels
    return g


def encode_chunk(rows, seg_shape, known, keep, primary):
    """Worker: decode and encode a chunk of rows → (LabelBatch, category masks, problems)."""
    encoded, masks, problems = [], [], []
    for row in rows:
        planes, row_problems = read_row_planes(row, seg_shape, known)
        problems += row_problems
        enc = encode_image_fast([a for _, a in planes], row[2], keep, seg_shape)
        present = np.concatenate([np.concatenate(enc[1]), enc[3]]).astype(np.int64)
        cats = np.unique(primary[present])
        masks.append(np.bitwise_or.reduce(np.left_shift(1, cats.astype(np.int64)), initial=0))
        encoded.append(enc)
    return LabelBatch.from_images(encoded), np.asarray(masks, np.uint32), problems


def encode_image_fast(planes, image_labels, keep: np.ndarray, seg_shape):
    """Same output as LabelBatch.encode_image, ~10x faster for up to 4 planes of 16-bit
    labels: each pixel's sorted label tuple packed into one uint64 key, so the sets are
    a 1-D np.unique (key order = the lexicographic column order encode_image uses)."""
    P = len(planes)
    if P == 0 or P > 4 or len(keep) > 65536:
        return LabelBatch.encode_image(planes, image_labels, keep=keep, seg_shape=seg_shape)
    stack = np.stack(planes).reshape(P, -1)
    stack = np.sort(np.where(keep[stack], stack, 0), axis=0).astype(np.uint64)
    key = stack[0]
    for r in range(1, P):
        key = (key << np.uint64(16)) | stack[r]
    # A leading 0 key makes the empty set exist and take id 0.
    uniq, inverse = np.unique(np.concatenate([np.zeros(1, np.uint64), key]), return_inverse=True)
    inverse = inverse.reshape(-1)[1:]
    shifts = np.uint64(16) * np.arange(P - 1, -1, -1, dtype=np.uint64)
    digits = ((uniq[:, None] >> shifts) & np.uint64(0xFFFF)).astype(np.int32)
    sets = [d[d > 0] for d in digits]
    counts = np.bincount(inverse, minlength=len(uniq)).astype(np.int64)
    img = np.asarray(sorted(int(x) for x in image_labels), np.int32)
    img = img[keep[img]] if img.size else img
    return inverse.astype(np.uint16).reshape(seg_shape), sets, counts, img
